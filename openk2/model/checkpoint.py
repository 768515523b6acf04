"""HF-format checkpoints (config.json + sharded safetensors + index) of openk2 models.

    model = from_pretrained("ckpt")        # DeepSeek-V3, Kimi-K2, Moonlight or openk2's own directory
    save_pretrained(model, "out")          # == model.save_pretrained("out")

The pieces: parameter names in `openk2.model.hf_adapter` (one table; `to_hf` / `from_hf` over state
dicts), files in `openk2.model.safetensors_io` (shards, index, atomic directory swap, FP8
dequantisation), the model-level load / save in `K2ForCausalLM.from_pretrained` / `.save_pretrained`.
This module only depends on them (no import cycle): it is the stable entry point.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from openk2.model.safetensors_io import dequantize_fp8, parse_size  # noqa: F401 - re-exported
from openk2.model.transformer import K2ForCausalLM


def hf_state_dict(model: K2ForCausalLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under HF DeepseekV3 names (experts split per expert)."""
    return model.hf_state_dict(dtype)


def save_pretrained(model: K2ForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "2GB",
                    dtype: torch.dtype | None = None, extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write an HF-format directory atomically (see `K2ForCausalLM.save_pretrained`)."""
    return model.save_pretrained(path, max_shard_size=max_shard_size, dtype=dtype, extra_files=extra_files)


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", strict: bool = True) -> K2ForCausalLM:
    """Load an HF-format directory into a `K2ForCausalLM` (see `K2ForCausalLM.from_pretrained`)."""
    return K2ForCausalLM.from_pretrained(path, dtype=dtype, device=device, strict=strict)
