"""openk2: an open, runnable implementation of the Kimi K2 system."""

from openk2.model.config import K2Config, get_preset, load_config
from openk2.model.transformer import K2ForCausalLM, build_model

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device="cpu") -> K2ForCausalLM:
    """Load an HF-format checkpoint directory (DeepSeek-V3, Kimi-K2, Moonlight, or openk2's own)."""
    from openk2.model.checkpoint import from_pretrained as _load

    return _load(path, dtype=dtype, device=device)


__all__ = ["K2Config", "K2ForCausalLM", "build_model", "from_pretrained", "get_preset", "load_config"]
