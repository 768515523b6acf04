"""QK-Clip (K2 report, Algorithm 1): cap attention logits by rescaling weights, per head.

After each optimizer step, for every attention head h with

    S_max^h = max over the batch and causal pairs (i, j) of q_i^h . k_j^h * softmax_scale > tau,

gamma_h = tau / S_max^h, and the weights that make head h's logits shrink so
that the same batch would give logits scaled by exactly gamma_h:

* MLA (K2, DeepSeek-V3): q^C rows of head h times gamma_h^alpha, k^C rows times
  gamma_h^(1 - alpha) (sqrt(gamma_h) each at the report's alpha = 0.5), q^R rows
  times gamma_h; the rotary key k^R is shared by all heads and never touched.
* MHA / GQA (Llama, Qwen2, Mistral): query rows times gamma_h / kappa_g and the
  rows of the head's key head g times kappa_g, where kappa_g =
  (max_{h in g} gamma_h)^(1 - alpha) when every query head of g exceeded tau,
  else 1. With one query head per key head (MHA) this is the report's
  gamma^alpha / gamma^(1 - alpha) split (alpha = 0.5); under GQA a head that
  stayed under tau is never scaled, not even through a shared key.

S_max^h is a running max over the forwards since the last step (gradient
accumulation micro-batches), MAX-reduced over data-parallel ranks.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from openk2.model.max_logit import max_logit  # the statistic belongs to the model; QK-Clip reads it

__all__ = ["AttentionHeads", "GQAHeads", "MLAHeads", "QKClip", "find_attention_heads", "max_logit"]

# ---------------------------------------------------------------- statistic
_HF_ATTENTION = "openk2_max_logit"
_HF_RECORDERS: weakref.WeakKeyDictionary[nn.Module, "_HFMaxLogit"] = weakref.WeakKeyDictionary()


class _BufferStat:
    """S_max kept by the attention module itself (openk2 MLAttention: `max_logit`, `track_max_logit`)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def read(self) -> torch.Tensor:
        return self.module.max_logit

    def reset(self) -> None:
        self.module.reset_max_logit()

    def track(self, enabled: bool) -> None:
        self.module.track_max_logit = enabled


class _HFMaxLogit:
    """S_max of a transformers attention module, recorded by the `openk2_max_logit` attention function."""

    def __init__(self, module: nn.Module, num_heads: int, inner):
        self.inner = inner  # the attention function the model used before (sdpa, eager, ...)
        self.enabled = False
        p = next(module.parameters())
        self.value = torch.full((num_heads,), float("-inf"), dtype=torch.float32, device=p.device)

    def read(self) -> torch.Tensor:
        return self.value

    def reset(self) -> None:
        self.value.fill_(float("-inf"))

    def track(self, enabled: bool) -> None:
        self.enabled = enabled

    @torch.no_grad()
    def observe(self, module, query, key, attention_mask, scaling, is_causal) -> None:
        m = max_logit(query, key, query.shape[-1] ** -0.5 if scaling is None else scaling, is_causal, attention_mask)
        if self.value.device != m.device:
            self.value = self.value.to(m.device)
        torch.maximum(self.value, m, out=self.value)


def _attention_with_max_logit(module, query, key, value, attention_mask, **kwargs):
    rec = _HF_RECORDERS.get(module)
    if rec is None:  # a module of the same model that QK-Clip does not watch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if rec.enabled and module.training:  # validation / generation between steps must not feed the clip
        is_causal = kwargs.get("is_causal")
        rec.observe(module, query, key, attention_mask, kwargs.get("scaling"),
                    getattr(module, "is_causal", True) if is_causal is None else is_causal)
    return rec.inner(module, query, key, value, attention_mask, **kwargs)


def _hf_route(module: nn.Module) -> tuple[str, Any]:
    """Register `openk2_max_logit_<impl>` (our function + impl's mask builder); return it and impl's function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    impl = getattr(module.config, "_attn_implementation", None) or "sdpa"
    if impl.startswith(_HF_ATTENTION):
        impl = impl[len(_HF_ATTENTION) + 1:]
    if impl == "eager":
        inner = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if inner is None:
            raise ValueError(f"QKClip: cannot find the eager attention function of {type(module).__name__}")
    else:
        inner = AttentionInterface()[impl]
    name = f"{_HF_ATTENTION}_{impl}"
    AttentionInterface.register(name, _attention_with_max_logit)
    # transformers builds the mask by implementation name: ours gets the wrapped one's (bool or additive)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name, inner


def _install_hf_recorders(model: nn.Module, modules: list[tuple[nn.Module, int]]) -> list[_HFMaxLogit]:
    recs, names = [], set()
    for m, num_heads in modules:
        name, inner = _hf_route(m)
        names.add(name)
        rec = _HF_RECORDERS.get(m)
        if rec is None:
            rec = _HFMaxLogit(m, num_heads, inner)
            _HF_RECORDERS[m] = rec
        recs.append(rec)
    if len(names) == 1 and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(names.pop())
    for m, _ in modules:  # a bare attention module, or sub-configs the call above did not reach
        m.config._attn_implementation = _hf_route(m)[0]
    return recs


# ------------------------------------------------------------ head layouts
class AttentionHeads:
    """One attention layer as QK-Clip sees it: its S_max^h and the weight rows behind head h's logits."""

    kind = "?"

    def __init__(self, name: str, module: nn.Module, num_heads: int, stat):
        self.name = name
        self.module = module
        self.num_heads = num_heads
        self.stat = stat

    def max_logit(self) -> torch.Tensor:
        return self.stat.read()

    def reset(self) -> None:
        self.stat.reset()

    def track(self, enabled: bool = True) -> None:
        self.stat.track(enabled)

    def row_scales(self, gamma: torch.Tensor, alpha: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, per-row factor) pairs that multiply head h's logits by gamma[h] (1 = head untouched)."""
        raise NotImplementedError


def _linear_rows(lin: nn.Linear, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = [(lin.weight, rows)]
    if getattr(lin, "bias", None) is not None:
        out.append((lin.bias, rows))
    return out


class MLAHeads(AttentionHeads):
    """Multi-head latent attention (openk2 MLAttention, HF DeepseekV3Attention).

    q_b_proj (or q_proj) rows: per head [q^C (nope) | q^R (rope)];
    kv_b_proj rows: per head [k^C (nope) | v]; kv_a_proj_with_mqa holds k^R.
    """

    kind = "mla"

    def __init__(self, name: str, module: nn.Module, stat):
        super().__init__(name, module, module.num_heads, stat)
        self.q_lin = module.q_proj if getattr(module, "q_lora_rank", None) is None else module.q_b_proj
        self.kv_b = module.kv_b_proj
        self.nope, self.rope, self.v = module.qk_nope_head_dim, module.qk_rope_head_dim, module.v_head_dim
        H = self.num_heads
        q_rows, kv_rows = self.q_lin.weight.shape[0], self.kv_b.weight.shape[0]
        if q_rows != H * (self.nope + self.rope) or kv_rows != H * (self.nope + self.v):
            raise ValueError(f"QKClip: {name}: projection shapes do not match the MLA head layout "
                             f"(H={H}, nope={self.nope}, rope={self.rope}, v={self.v})")

    def row_scales(self, gamma, alpha):
        # q^C * gamma^alpha and k^C * gamma^(1 - alpha): their product scales the nope logits by gamma;
        # q^R * gamma alone, since k^R is shared by every head. alpha = 0.5 is the report's sqrt split.
        H, g = self.num_heads, gamma.float()
        qc, kc = (g ** alpha)[:, None], (g ** (1.0 - alpha))[:, None]
        q = torch.cat([qc.expand(H, self.nope), g[:, None].expand(H, self.rope)], dim=1).reshape(-1)
        kv = torch.cat([kc.expand(H, self.nope), torch.ones(H, self.v, device=g.device)], dim=1).reshape(-1)
        return _linear_rows(self.q_lin, q) + _linear_rows(self.kv_b, kv)


class GQAHeads(AttentionHeads):
    """Per-head query/key projections: MHA (num_kv_heads == num_heads), GQA and MQA."""

    kind = "gqa"

    def __init__(self, name: str, module: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int, stat,
                 q_proj: nn.Linear | None = None, k_proj: nn.Linear | None = None):
        super().__init__(name, module, num_heads, stat)
        for norm in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
            if isinstance(getattr(module, norm, None), nn.Module):
                raise ValueError(f"QKClip: {name} normalises queries/keys per head ({norm}); a weight rescale "
                                 "cannot act through QK-Norm, so QK-Clip does not apply to this model")
        if num_heads % num_kv_heads:
            raise ValueError(f"QKClip: {name}: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.q_lin = q_proj if q_proj is not None else module.q_proj
        self.k_lin = k_proj if k_proj is not None else module.k_proj
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        if self.q_lin.weight.shape[0] != num_heads * head_dim or self.k_lin.weight.shape[0] != num_kv_heads * head_dim:
            raise ValueError(f"QKClip: {name}: q/k projection shapes do not match {num_heads} query heads, "
                             f"{num_kv_heads} key heads of dim {head_dim}")

    def row_scales(self, gamma, alpha):
        KV, G, D = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        g = gamma.float().view(KV, G)
        every = (g < 1).all(dim=1)  # key heads whose every query head is clipped: they may share the scale
        kappa = torch.where(every, g.amax(dim=1) ** (1 - alpha), torch.ones_like(g[:, 0]))
        q = (g / kappa[:, None]).reshape(-1)
        return _linear_rows(self.q_lin, q.repeat_interleave(D)) + _linear_rows(self.k_lin, kappa.repeat_interleave(D))


def _is_openk2_mla(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("kv_b_proj", "max_logit", "track_max_logit", "reset_max_logit"))


def _is_hf_attention(m: nn.Module) -> bool:
    return type(m).__module__.startswith("transformers.") and hasattr(m, "config") and (
        hasattr(m, "kv_b_proj") or (hasattr(m, "q_proj") and hasattr(m, "k_proj")))


def find_attention_heads(model: nn.Module) -> list[AttentionHeads]:
    """Every attention layer of `model` that QK-Clip knows: openk2 MLA, transformers MLA and MHA/GQA."""
    heads: list[AttentionHeads] = []
    hf: list[tuple[str, nn.Module, int]] = []
    for name, m in model.named_modules():
        if _is_openk2_mla(m):
            heads.append(MLAHeads(name, m, _BufferStat(m)))
        elif _is_hf_attention(m):
            cfg = m.config
            n = getattr(m, "num_heads", None) or cfg.num_attention_heads
            hf.append((name, m, n))
            heads.append(None)  # placeholder, filled once the recorders exist
    if hf:
        recs = iter(_install_hf_recorders(model, [(m, n) for _, m, n in hf]))
        it = iter(hf)
        for i, h in enumerate(heads):
            if h is not None:
                continue
            name, m, n = next(it)
            rec = next(recs)
            if hasattr(m, "kv_b_proj"):
                heads[i] = MLAHeads(name, m, rec)
            else:
                cfg = m.config
                kv = getattr(cfg, "num_key_value_heads", None) or n
                head_dim = getattr(m, "head_dim", None) or cfg.hidden_size // n
                heads[i] = GQAHeads(name, m, n, kv, head_dim, rec)
    return heads


# ------------------------------------------------------------------ rescale
def _scale_rows_(t: torch.Tensor, rows: torch.Tensor) -> None:
    """t[i, ...] *= rows[i], in place; a DTensor scales the rows of its local shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    shape = (-1,) + (1,) * (t.ndim - 1)
    rows = rows.to(device=t.device, dtype=torch.float32).view(shape)  # multiply in fp32, round once
    if isinstance(t, DTensor):
        full = rows.expand(t.shape)
        local = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
        t.to_local().mul_(local)
    else:
        t.mul_(rows)


# -------------------------------------------------------------------- QKClip
class QKClip:
    """Per-head QK-Clip over a set of attention layers.

    `step()` (MuonClip calls it after every update) reads S_max^h of every
    head, MAX-reduces it over data-parallel ranks, rescales the heads above
    tau, resets the statistic and returns the logging stats.
    """

    def __init__(self, heads: Sequence[AttentionHeads], tau: float = 100.0, alpha: float = 0.5,
                 process_group: Any = None, sync: bool = True):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"QKClip: tau must be a finite number > 0, got {tau!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"QKClip: alpha must be in [0, 1], got {alpha!r}")
        heads = list(heads)
        if not heads:
            raise ValueError("QKClip: no attention layers given (find_attention_heads found none in the model?)")
        self.heads = heads
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.process_group = process_group
        self.sync = sync
        self.num_heads = sum(h.num_heads for h in heads)
        self.ever_clipped = torch.zeros(self.num_heads, dtype=torch.bool)
        self.steps = 0
        self._warned_empty = False

    @classmethod
    def from_model(cls, model: nn.Module, tau: float = 100.0, **kwargs) -> "QKClip":
        """QK-Clip over every attention layer of `model`; turns on their max-logit statistic."""
        heads = find_attention_heads(model)
        if not heads:
            raise ValueError(f"QKClip: found no attention layer QK-Clip knows in {type(model).__name__} "
                             "(openk2 MLAttention, or transformers attention with q_proj/k_proj or kv_b_proj)")
        clip = cls(heads, tau=tau, **kwargs)
        clip.track(True)
        return clip

    def track(self, enabled: bool = True) -> None:
        for h in self.heads:
            h.track(enabled)

    def reset(self) -> None:
        for h in self.heads:
            h.reset()

    def max_logits(self) -> torch.Tensor:
        """S_max^h of every head (layer-major), reduced over data-parallel ranks when distributed."""
        s = torch.cat([h.max_logit().detach().float().reshape(-1) for h in self.heads])
        if self.sync and dist.is_available() and dist.is_initialized():
            dist.all_reduce(s, op=dist.ReduceOp.MAX, group=self.process_group)
        return s

    @torch.no_grad()
    def step(self, masters: Mapping[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
        """Clip every head whose S_max^h > tau. `masters` maps a parameter to its fp32 master copy, scaled too."""
        s = self.max_logits()
        over = s > self.tau
        gamma = torch.where(over, self.tau / s, torch.ones_like(s))
        over_cpu = over.cpu()
        s_cpu = s.cpu()
        if not self._warned_empty and bool(torch.isneginf(s_cpu).all()):
            warnings.warn("QKClip: no max-logit statistic was recorded since the last step (is tracking on and did "
                          "a forward run?); nothing is clipped", stacklevel=3)
            self._warned_empty = True
        per_layer_max, per_layer_clipped = [], []
        off = 0
        for h in self.heads:
            sl = slice(off, off + h.num_heads)
            off += h.num_heads
            per_layer_max.append(float(s_cpu[sl].max()))
            n = int(over_cpu[sl].sum())
            per_layer_clipped.append(n)
            if n:
                for param, rows in h.row_scales(gamma[sl], self.alpha):
                    master = masters.get(param) if masters else None
                    if master is not None:
                        _scale_rows_(master, rows)
                        param.copy_(master)
                    else:
                        _scale_rows_(param, rows)
        self.ever_clipped |= over_cpu
        self.steps += 1
        self.reset()
        return {
            "max_logit": max(per_layer_max),
            "max_logit_per_layer": per_layer_max,
            "heads_clipped": sum(per_layer_clipped),
            "heads_clipped_per_layer": per_layer_clipped,
            "heads_ever_clipped": int(self.ever_clipped.sum()),
            "num_heads": self.num_heads,
        }

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "alpha": self.alpha, "ever_clipped": self.ever_clipped.clone(), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ever = torch.as_tensor(state["ever_clipped"], dtype=torch.bool)
        if ever.shape != self.ever_clipped.shape:
            raise ValueError(f"QKClip: checkpoint has {ever.numel()} heads, this model {self.num_heads}")
        self.ever_clipped = ever.clone()
        self.steps = int(state.get("steps", 0))
