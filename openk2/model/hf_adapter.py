"""openk2 <-> Hugging Face parameter names: one table, pure functions over state dicts.

openk2's names are the HF DeepseekV3 names (``model.layers.3.self_attn.kv_b_proj.weight``,
``model.layers.3.mlp.gate.e_score_correction_bias`` ...) except for the routed experts, which
openk2 keeps stacked (one [E, out, in] tensor per projection, for grouped matmuls and Muon):

| openk2 | HF checkpoints (DeepSeek-V3, Kimi-K2, vLLM, SGLang) | transformers 5 in memory |
|---|---|---|
| ``model.layers.L.mlp.experts.gate_proj`` [E, I, H] | ``model.layers.L.mlp.experts.e.gate_proj.weight`` [I, H] | ``...experts.gate_up_proj`` [E, 2I, H], first I rows |
| ``model.layers.L.mlp.experts.up_proj`` [E, I, H] | ``model.layers.L.mlp.experts.e.up_proj.weight`` [I, H] | ``...experts.gate_up_proj``, last I rows |
| ``model.layers.L.mlp.experts.down_proj`` [E, H, I] | ``model.layers.L.mlp.experts.e.down_proj.weight`` [H, I] | ``...experts.down_proj`` [E, H, I] |

`to_hf` writes the per-expert form (what released checkpoints use and what transformers,
vLLM and SGLang read); `from_hf` reads all three. Tensors a model does not hold are skipped
on the way in: multi-token-prediction layers (``model.layers.L.*`` for L >= num_hidden_layers),
rotary ``inv_freq`` buffers and FP8 ``weight_scale_inv`` scales (the loader dequantises with them).
The shape of torchtitan's ``StateDictAdapter`` (``to_hf`` / ``from_hf``); the per-tensor
`hf_targets` lets a loader fill a model shard by shard without holding a whole state dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import torch

from openk2.model.config import K2Config

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_GATE_UP = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.gate_up_proj$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "weight_scale_inv")


class Target(NamedTuple):
    """Where (part of) an HF tensor goes: openk2 tensor `name`, at `expert` along dim 0 (None: the whole
    tensor); `half` 0 / 1 takes the first / second half of dim -2 (transformers-5 fused gate_up)."""

    name: str
    expert: int | None = None
    half: int | None = None


def is_expert_stack(name: str) -> bool:
    """True for openk2's stacked routed-expert tensors (``...mlp.experts.gate_proj`` etc.)."""
    return _STACKED.match(name) is not None


def hf_names(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One openk2 tensor under its HF name(s): an expert stack becomes E per-expert weights (views)."""
    m = _STACKED.match(name)
    if m is None:
        return [(name, tensor)]
    return [(f"{m.group(1)}.{e}.{m.group(2)}.weight", tensor[e]) for e in range(tensor.shape[0])]


def hf_targets(hf_name: str, config: K2Config) -> list[Target]:
    """Where one HF tensor goes in openk2 ([] for tensors openk2 does not hold: MTP layers, scales)."""
    if hf_name.endswith(_SKIPPED_SUFFIXES):
        return []
    lm = _LAYER.match(hf_name)
    if lm and int(lm.group(1)) >= config.num_hidden_layers:
        return []  # multi-token-prediction layers of released checkpoints
    m = _PER_EXPERT.match(hf_name)
    if m:
        return [Target(f"{m.group(1)}.{m.group(3)}", int(m.group(2)))]
    m = _FUSED_GATE_UP.match(hf_name)
    if m:
        return [Target(f"{m.group(1)}.gate_proj", None, 0), Target(f"{m.group(1)}.up_proj", None, 1)]
    if config.tie_word_embeddings and hf_name == "lm_head.weight":
        return []
    return [Target(hf_name)]


def take(tensor: torch.Tensor, target: Target) -> torch.Tensor:
    """The part of an HF tensor that `target` describes (a view)."""
    if target.half is not None:
        tensor = tensor.chunk(2, dim=-2)[target.half]
    return tensor


def to_hf(state_dict: Mapping[str, torch.Tensor], config: K2Config) -> dict[str, torch.Tensor]:
    """openk2 state dict -> HF (per-expert) state dict; a tied head is written once, as the embedding."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        for hf_name, v in hf_names(name, t):
            out[hf_name] = v
    return out


def from_hf(hf_state_dict: Mapping[str, torch.Tensor], config: K2Config) -> dict[str, torch.Tensor]:
    """HF state dict (per-expert or transformers-5 fused experts) -> openk2 state dict with stacked experts.

    Raises KeyError naming the first missing expert when a stack is incomplete.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for hf_name, t in hf_state_dict.items():
        for tg in hf_targets(hf_name, config):
            v = take(t, tg)
            if tg.expert is None:
                out[tg.name] = v
            else:
                experts.setdefault(tg.name, {})[tg.expert] = v
    for name, parts in experts.items():
        n = config.n_routed_experts
        missing = [e for e in range(n) if e not in parts]
        if missing:
            m = _STACKED.match(name)
            raise KeyError(f"{m.group(1)}.{missing[0]}.{m.group(2)}.weight")
        out[name] = torch.stack([parts[e] for e in range(n)])
    return out
