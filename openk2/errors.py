"""User-facing errors: one line that names the thing that is wrong."""


class OpenK2Error(Exception):
    """Base class for errors caused by bad input (configs, files, requests)."""


class ConfigError(OpenK2Error, ValueError):
    """A config (config.json, preset, hyper-parameter) is malformed or unsupported."""


class CheckpointError(OpenK2Error, ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model."""


class DataError(OpenK2Error, ValueError):
    """A data file or corpus is missing or malformed."""
