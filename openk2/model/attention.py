"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3, Kimi K2).

Per head h the query and key have a non-rotary part (q^C, k^C: from
up-projections of low-rank latents) and a rotary part (q^R per head, k^R one
vector shared by all heads). Two forms of the same function:

* naive (training, prefill without cache): expand the latent into per-head
  keys and values and run causal attention;
* absorbed (with an `MLACache`): keep only the normalised latent c^KV
  (kv_lora_rank values) and k^R (qk_rope_head_dim values) per token; fold
  W^UK into the query and W^UV into the output, so keys/values are never
  materialised. For K2: 512 + 64 = 576 cached values per token per layer.

QK-Clip (K2 report, Algorithm 1) needs S_max^h = max over the batch and
causal pairs (i, j) of q_i^h . k_j^h * softmax_scale. With
`track_max_logit = True` training-mode forwards keep fused SDPA for the output
and form Q K^T once more without autograd, in tiles of bounded memory
(`openk2.model.max_logit`), for the max: one extra forward QK^T matmul per
layer (about 1/9 of the attention core's forward+backward FLOPs), no stored
activations. Evaluation forwards never record it. The running max lives in
`max_logit` until `reset_max_logit()`; the optimizer only reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model.config import K2Config
from openk2.model.kv_cache import CacheView, KVCache
from openk2.model.layers import RMSNorm, apply_rope
from openk2.model.max_logit import max_logit


class MLACache(KVCache):
    """Absorbed-mode KV cache: per layer the latent c^KV [rows, S, kv_lora] and k^R [rows, S, rope]."""

    def __init__(self, config: K2Config, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 block: int | None = None, max_capacity: int | None = None):
        """``max_len`` positions per row; with ``block``, capacity grows in such blocks up to ``max_capacity``."""
        features = {"latent": (config.kv_lora_rank,), "k_rope": (config.qk_rope_head_dim,)}
        super().__init__(config.num_hidden_layers, features, batch_size, max_len, dtype, device,
                         block=block or max_len, max_capacity=max_capacity or max_len)

    @property
    def latent(self) -> torch.Tensor:
        return self.data["latent"]

    @property
    def k_rope(self) -> torch.Tensor:
        return self.data["k_rope"]

    def values_per_token_per_layer(self) -> int:
        return self.latent.shape[-1] + self.k_rope.shape[-1]


def packed_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask of packed sequences: bool [B, 1, T, T], True where query i may
    attend key j (j <= i and both tokens belong to the same document). `document_ids` [B, T] labels
    each token's document (any integers, equal within a document, a document's tokens contiguous)."""
    T = document_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return (document_ids[:, :, None] == document_ids[:, None, :])[:, None] & causal


def packed_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where each document of a packed row starts: [B, T] long."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - first


class MLAttention(nn.Module):
    def __init__(self, config: K2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = config.softmax_scale
        self.rope_interleave = bool(config.rope_interleave)
        H, bias = self.num_heads, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, config.hidden_size, bias=bias)
        self.track_max_logit = False
        self.recompute = False  # selective recomputation: norms and up-projections
        self.register_buffer("max_logit", torch.full((H,), float("-inf"), dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.max_logit.dtype != torch.float32:  # the statistic stays fp32 under model.to(bf16)
            self.max_logit = self.max_logit.float()
        return self

    def reset_max_logit(self) -> None:
        self.max_logit.fill_(float("-inf"))

    # ------------------------------------------------------------- projections
    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q = self._queries(x).view(B, T, self.num_heads, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)
        latent, k_rope = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope = apply_rope(q_rope, cos, sin, self.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, self.rope_interleave)
        return q_nope, q_rope, latent, k_rope

    def _expand(self, latent: torch.Tensor, q_nope, q_rope, k_rope):
        B, T = latent.shape[:2]
        kv = self.kv_b_proj(latent).view(B, T, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, T, D]
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, T, self.num_heads, self.qk_rope_head_dim)], dim=-1)
        pad = self.qk_head_dim - self.v_head_dim
        if 0 < pad <= self.qk_nope_head_dim:
            # v widened to the q/k head dim for the fused kernels, as a view: [last `pad` k_nope columns | v].
            # The extra output columns are discarded; their gradient is zero, so k_nope's gradient is unchanged.
            v = kv[..., self.qk_nope_head_dim - pad:]
        return q, k.transpose(1, 2), v.transpose(1, 2)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: CacheView | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`attn_mask`: bool [B, 1, T, T] (True = attend) replacing the causal mask, e.g. the
        block-diagonal causal mask of packed sequences (`packed_attention_mask`)."""
        if cache is not None:
            return self._forward_absorbed(x, cos, sin, cache)
        B, T, _ = x.shape
        if self.recompute and torch.is_grad_enabled():
            q_nope, q_rope, latent, k_rope = torch.utils.checkpoint.checkpoint(
                self._project, x, cos, sin, use_reentrant=False)
            q, k, v = torch.utils.checkpoint.checkpoint(self._expand, latent, q_nope, q_rope, k_rope, use_reentrant=False)
        else:
            q_nope, q_rope, latent, k_rope = self._project(x, cos, sin)
            q, k, v = self._expand(latent, q_nope, q_rope, k_rope)
        if key_padding_mask is not None:
            out = self._eager(q, k, v[..., -self.v_head_dim:], key_padding_mask)
        elif attn_mask is not None:
            out = self._sdpa(q, k, v, attn_mask)
            if self.track_max_logit and self.training:  # S_max over the allowed pairs only
                s_max = max_logit(q.detach(), k.detach(), self.softmax_scale, causal=False, mask=attn_mask)
                torch.maximum(self.max_logit, s_max, out=self.max_logit)
        else:
            out = self._sdpa(q, k, v)
            if self.track_max_logit and self.training:  # eval forwards must not feed the next clip
                torch.maximum(self.max_logit, max_logit(q.detach(), k.detach(), self.softmax_scale), out=self.max_logit)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.v_head_dim))

    def _sdpa(self, q, k, v, attn_mask: torch.Tensor | None = None):
        # The fused (flash) kernels want equal q/k/v head dims; MLA's v is narrower
        # (128 vs 192 in K2). _expand widens it to the q/k dim as a view where it can
        # (else zeros are prepended here) and the last v_head_dim output columns are
        # kept: measured 1.6x faster fwd+bwd on CPU than SDPA's math fallback.
        pad = self.qk_head_dim - v.shape[-1]
        if pad > 0:
            v = F.pad(v, (pad, 0))
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.softmax_scale)
        return out[..., -self.v_head_dim:] if out.shape[-1] != self.v_head_dim else out

    def _eager(self, q, k, v, key_padding_mask):
        T, S = q.shape[-2], k.shape[-2]
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.softmax_scale  # [B, H, T, S]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if key_padding_mask is not None:
            mask = mask[None, None] & key_padding_mask[:, None, None, :].bool()
        scores = scores.masked_fill(~mask, float("-inf"))
        if self.track_max_logit and self.training:
            self._update_max_logit(scores.detach())
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype)
        return torch.matmul(probs, v)

    @torch.no_grad()
    def _update_max_logit(self, scores: torch.Tensor) -> None:
        m = scores.amax(dim=(0, 2, 3)).float()
        torch.maximum(self.max_logit, m, out=self.max_logit)

    def _forward_absorbed(self, x: torch.Tensor, cos, sin, view: CacheView) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope, latent, k_rope = self._project(x, cos, sin)
        view.write(self.layer_idx, "latent", latent)
        view.write(self.layer_idx, "k_rope", k_rope)
        c_kv = view.read(self.layer_idx, "latent").to(x.dtype)  # [B, S, C]
        k_r = view.read(self.layer_idx, "k_rope").to(x.dtype)  # [B, S, R]
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
        q_lat = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk)  # W^UK absorbed into the query
        scores = torch.matmul(q_lat, c_kv[:, None].transpose(-1, -2))
        scores = scores + torch.matmul(q_rope.transpose(1, 2), k_r[:, None].transpose(-1, -2))
        scores = scores.float() * self.softmax_scale  # [B, H, T, S]
        mask = view.mask
        if mask is None and T > 1:  # every row starts at 0: plain causal
            mask = torch.ones(T, view.S, dtype=torch.bool, device=x.device).tril(view.S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        if self.track_max_logit and self.training:
            self._update_max_logit(scores)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(x.dtype)
        o_lat = torch.matmul(probs, c_kv[:, None])  # [B, H, T, C]
        o = torch.einsum("bhtc,hvc->bthv", o_lat, w_uv)  # W^UV absorbed into the output
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_head_dim))
