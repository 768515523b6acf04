"""Serving K2: models the engine can run, batched decoding, constrained JSON, the OpenAI-compatible server.

    from openk2.serve import load_chat_model, create_app, Engine

The chat format lives in :mod:`openk2.chat` and the LLM clients in
:mod:`openk2.llm` (which runs this package's engine in-process for
``LocalClient``); this package imports neither of the clients.
Names are imported on first use, so `import openk2.serve` stays cheap. See docs/serving.md.
"""

from importlib import import_module

_EXPORTS = {
    "ChatModel": "chat_model",
    "load_chat_model": "backends",
    "Engine": "engine",
    "GenRequest": "engine",
    "SamplingParams": "engine",
    "generate_batch": "engine",
    "SchemaGrammar": "constrained",
    "ServerLimits": "server",
    "create_app": "server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"openk2.serve.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'openk2.serve' has no attribute {name!r}")
