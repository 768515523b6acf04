"""Small building blocks: RMSNorm, SwiGLU FFN, rotary embeddings with YaRN (interleaved or half-split pairs)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model.config import K2Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype (as HF DeepseekV3RMSNorm does).
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.promote_types(dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class _RMSNormFn(torch.autograd.Function):
    """rms_norm_reference with a hand-written backward: 5 passes over the activations instead of autograd's ~10.

    dx = r * (w*dy - xhat * mean(w*dy * xhat)), dw = sum over rows of dy * xhat,
    with xhat = x * r, r = rsqrt(mean(x^2) + eps) (fp32).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(eps))
        xhat = (h * r).to(x.dtype)
        ctx.save_for_backward(xhat, r, weight)
        ctx.x_dtype = x.dtype
        return weight * xhat

    @staticmethod
    def backward(ctx, dy):
        xhat, r, weight = ctx.saved_tensors
        dw = (dy * xhat).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            ct = r.dtype
            wdy = (dy * weight).to(ct)
            xh = xhat.to(ct)
            c = (wdy * xh).mean(-1, keepdim=True)
            dx = wdy.sub_(xh * c).mul_(r).to(ctx.x_dtype)
        return dx, dw, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x)). Also the shared expert."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.recompute = False  # selective recomputation of the SwiGLU product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if self.recompute and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(swiglu, g, u, use_reentrant=False)
        else:
            h = swiglu(g, u)
        return self.down_proj(h)


# ------------------------------------------------------------------------ RoPE
def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: K2Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary dims and the cos/sin attention factor.

    YaRN (Peng et al. 2023) as transformers computes it: interpolate low
    frequencies by `factor`, keep high ones, blend linearly in between;
    cos/sin are multiplied by mscale(factor, mscale)/mscale(factor, mscale_all_dim)
    (1.0 for K2).
    """
    dim = config.qk_rope_head_dim
    base = float(config.rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    rs = config.rope_scaling
    factor = float(rs["factor"])
    orig = int(rs["original_max_position_embeddings"])
    beta_fast = float(rs.get("beta_fast") or 32)
    beta_slow = float(rs.get("beta_slow") or 1)
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: K2Config):
        super().__init__()
        self.config = config
        self.reset_parameters()

    def reset_parameters(self, device: torch.device | None = None) -> None:
        inv_freq, self.attention_factor = rope_inv_freq(self.config)
        self.register_buffer("inv_freq", inv_freq.to(device) if device else inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, rope_dim/2] (fp32): one angle per rotated pair (`apply_rope`)."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate pairs of the last dim by the per-pair angles; x: [B, T, (H,) D], cos/sin: [B, T, D/2].

    interleave=True (DeepSeek-V3 / Kimi-K2 checkpoints, config `rope_interleave: true`): the pairs are
    (x0, x1), (x2, x3), ...; like transformers, the output is de-interleaved ([rotated evens, rotated
    odds]); q and k get the same permutation, so q.k is unchanged. interleave=False (`rope_interleave:
    false`): the pairs are (x_i, x_{i + D/2}), transformers' rotate_half layout, and the output keeps it.
    """
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if interleave:
        x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)
