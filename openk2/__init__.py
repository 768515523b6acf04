"""openk2: an open, runnable implementation of the Kimi K2 system.

The top-level names load lazily (PEP 562), so that commands that need no model
(`openk2 sandbox run`, `openk2 params --help`, the data pipelines' CLIs) do not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "K2Config": "openk2.model.config",
    "get_preset": "openk2.model.config",
    "load_config": "openk2.model.config",
    "K2ForCausalLM": "openk2.model.transformer",
    "build_model": "openk2.model.transformer",
}

if TYPE_CHECKING:  # for type checkers and IDEs
    from openk2.model.config import K2Config, get_preset, load_config
    from openk2.model.transformer import K2ForCausalLM, build_model


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'openk2' has no attribute {name!r}")


def from_pretrained(path, dtype=None, device="cpu") -> "K2ForCausalLM":
    """Load an HF-format checkpoint directory (DeepSeek-V3, Kimi-K2, Moonlight, or openk2's own)."""
    from openk2.model.checkpoint import from_pretrained as _load

    return _load(path, dtype=dtype, device=device)


__all__ = ["K2Config", "K2ForCausalLM", "build_model", "from_pretrained", "get_preset", "load_config"]
