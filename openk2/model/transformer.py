"""The K2 causal LM: embeddings -> [MLA + (dense SwiGLU | MoE)] x L -> RMSNorm -> head."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from openk2.errors import CheckpointError, ConfigError
from openk2.model import hf_adapter, safetensors_io
from openk2.model.attention import MLAttention, packed_attention_mask, packed_position_ids
from openk2.model.kv_cache import CacheView, KVCache
from openk2.model.config import K2Config
from openk2.model.loss import IGNORE_INDEX, linear_cross_entropy
from openk2.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from openk2.model.moe import MoE


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, config: K2Config, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx)
        self.mlp: nn.Module = MoE(config) if config.is_moe_layer(layer_idx) else SwiGLU(
            config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.recompute_norms = False

    def _norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_norms and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(norm, x, use_reentrant=False)
        return norm(x)

    def forward(self, x, cos, sin, cache=None, key_padding_mask=None, attn_mask=None):
        x = x + self.self_attn(self._norm(self.input_layernorm, x), cos, sin, cache, key_padding_mask, attn_mask)
        return x + self.mlp(self._norm(self.post_attention_layernorm, x))


class K2Model(nn.Module):
    def __init__(self, config: K2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, position_ids=None, cache: KVCache | CacheView | None = None, key_padding_mask=None,
                document_ids=None):
        B, T = input_ids.shape
        view = cache.view(slice(0, B), T) if isinstance(cache, KVCache) else cache
        attn_mask = None
        if document_ids is not None:  # packed sequences: attention confined to each document
            if view is not None or key_padding_mask is not None:
                raise ValueError("K2Model: document_ids (packed sequences) cannot be combined with a cache or padding")
            attn_mask = packed_attention_mask(document_ids)
            if position_ids is None:
                position_ids = packed_position_ids(document_ids)
        if position_ids is None:
            position_ids = (view.positions if view is not None
                            else torch.arange(T, device=input_ids.device)[None].expand(B, T))
        cos, sin = self.rotary_emb(position_ids)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, view, key_padding_mask, attn_mask)
        if view is not None:
            view.commit()
        return self.norm(h)


class K2ForCausalLM(nn.Module):
    """Kimi K2 / DeepSeek-V3 causal LM.

    `model(input_ids)` returns a `CausalLMOutput` whose `.logits` is [B, T, V].
    With `labels` (HF convention: shifted inside, -100 ignored) or
    `shift_labels` (already aligned: position t's target) it has `.loss`, the
    mean cross-entropy, computed by the fused LM-head + loss
    (openk2.model.loss.linear_cross_entropy) without materialising the
    logits; `.logits` is then None unless `return_logits=True`.
    """

    def __init__(self, config: K2Config, init_weights: bool = True):
        super().__init__()
        self.config = config
        self.model = K2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if init_weights:
            self.init_weights()

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm scales (attention biases, if any, are zeroed below)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and m.bias.device.type != "meta":
                m.bias.zero_()
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create non-persistent buffers, e.g. after `to_empty` from the meta device."""
        device = device or self.lm_head.weight.device
        if torch.device(device).type == "meta":
            return
        self.model.rotary_emb.reset_parameters(torch.device(device))
        for m in self.modules():
            if isinstance(m, MLAttention):
                m.max_logit = torch.full((m.num_heads,), float("-inf"), dtype=torch.float32, device=device)
            elif isinstance(m, MoE):
                m.tokens_per_expert = torch.zeros(m.n_experts, dtype=torch.long, device=device)
                if m.gate.e_score_correction_bias.device.type == "meta":
                    m.gate.e_score_correction_bias = torch.zeros(m.n_experts, device=device)

    # --------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, position_ids=None,
                cache: KVCache | CacheView | None = None, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, shift_labels: torch.Tensor | None = None,
                return_logits: bool = False, document_ids: torch.Tensor | None = None) -> CausalLMOutput:
        key_padding_mask = None
        if attention_mask is not None and cache is None and not bool(attention_mask.all()):
            key_padding_mask = attention_mask.bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.model(input_ids, position_ids, cache, key_padding_mask, document_ids)
        if labels is not None and shift_labels is not None:
            raise ValueError("K2ForCausalLM: pass labels (shifted inside) or shift_labels, not both")
        if labels is not None or shift_labels is not None:
            if logits_to_keep:
                raise ValueError("K2ForCausalLM: logits_to_keep cannot be combined with labels")
            if labels is not None:  # position t predicts token t+1; the last position has no target
                h_loss, targets = h[:, :-1], labels[:, 1:]
            else:
                h_loss, targets = h, shift_labels
            if tuple(targets.shape) != tuple(h_loss.shape[:-1]):
                raise ValueError(f"K2ForCausalLM: labels of shape {tuple(targets.shape)} do not match "
                                 f"input_ids of shape {tuple(input_ids.shape)}")
            if not return_logits:
                return CausalLMOutput(logits=None, loss=linear_cross_entropy(h_loss, self.lm_head.weight, targets))
            logits = self.lm_head(h)
            lg = logits[:, :-1] if labels is not None else logits
            loss = F.cross_entropy(lg.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
            return CausalLMOutput(logits=logits, loss=loss)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return CausalLMOutput(logits=self.lm_head(h))

    # ------------------------------------------------------- training hooks
    def attention_layers(self) -> list[MLAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def set_track_max_logit(self, enabled: bool = True) -> None:
        for a in self.attention_layers():
            a.track_max_logit = enabled

    def max_logits(self) -> torch.Tensor:
        """[num_layers, num_heads] running S_max^h since the last reset."""
        return torch.stack([a.max_logit for a in self.attention_layers()])

    def reset_max_logits(self) -> None:
        for a in self.attention_layers():
            a.reset_max_logit()

    @torch.no_grad()
    def update_router_biases(self, rate: float | None = None) -> dict[str, float]:
        """One auxiliary-loss-free balancing step on every MoE layer; counts are summed across ranks."""
        rate = self.config.router_bias_update_rate if rate is None else rate
        layers = self.moe_layers()
        if not layers:
            return {}
        counts = torch.stack([m.tokens_per_expert for m in layers])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        stats = [m.update_bias(rate, c) for m, c in zip(layers, counts)]
        return {
            "expert_load_max_over_mean": max(s["max_over_mean"] for s in stats),
            "expert_load_min_over_mean": min(s["min_over_mean"] for s in stats),
        }

    def set_recompute(self, mode: str = "selective") -> None:
        """Activation recomputation: 'none', or 'selective' (K2's list: norms, SwiGLU, MLA up-projections, MoE down-projection inputs)."""
        if mode not in ("none", "selective"):
            raise ValueError(f"recompute mode must be 'none' or 'selective', got {mode!r}")
        on = mode == "selective"
        for m in self.modules():
            if isinstance(m, DecoderLayer):
                m.recompute_norms = on
            if hasattr(m, "recompute"):
                m.recompute = on

    # ------------------------------------------------------------- counting
    def num_parameters(self) -> dict[str, int]:
        return count_parameters(self)

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 cache_dtype: torch.dtype | None = None) -> torch.Tensor:
        from openk2.model.generate import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        eos_token_id=eos_token_id, attention_mask=attention_mask, generator=generator,
                        cache_dtype=cache_dtype)

    # ----------------------------------------------------------- checkpoints
    def hf_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The weights under HF DeepseekV3 names (experts per expert; `openk2.model.hf_adapter`)."""
        sd = {}
        for name, t in self.state_dict().items():
            t = t.detach()
            if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
                t = t.to(dtype)  # the balancer's bias stays fp32
            sd[name] = t
        return hf_adapter.to_hf(sd, self.config)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "2GB",
                        dtype: torch.dtype | None = None, extra_files: dict[str, str | bytes] | None = None) -> Path:
        """Write an HF-format directory atomically (config.json with model_type deepseek_v3, sharded
        safetensors, index); files already there that are not part of the checkpoint are kept."""
        cfg = self.config.to_hf_dict()
        cfg["torch_dtype"] = str(dtype or self.lm_head.weight.dtype).replace("torch.", "")
        return safetensors_io.write_checkpoint(path, self.hf_state_dict(dtype), cfg, max_shard_size=max_shard_size,
                                               extra_files=extra_files)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", strict: bool = True) -> "K2ForCausalLM":
        """Load an HF-format directory (DeepSeek-V3, Kimi-K2, Moonlight, openk2's own), shard by shard.

        Reads per-expert and transformers-5 fused expert tensors, skips multi-token-prediction layers,
        dequantises FP8 block-quantised weights. `dtype=None` takes the stored dtype (bf16 for FP8).
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        try:
            config = K2Config.from_json_file(path / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        qcfg = config.extra.get("quantization_config") or {}
        block = tuple(qcfg.get("weight_block_size", (128, 128)))
        if dtype is None:
            stored = config.extra.get("torch_dtype") or config.extra.get("dtype")
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
                str(stored), torch.bfloat16 if qcfg else torch.float32)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"):
                model = cls(config, init_weights=False)
        finally:
            torch.set_default_dtype(default)
        model.to_empty(device=device)
        params = dict(model.named_parameters())
        params.update({k: v for k, v in model.named_buffers() if k.endswith("e_score_correction_bias")})
        expected: set[tuple[str, int | None]] = set()
        for name, p in params.items():
            if hf_adapter.is_expert_stack(name):
                expected.update((name, e) for e in range(p.shape[0]))
            elif not (config.tie_word_embeddings and name == "lm_head.weight"):
                expected.add((name, None))
        filled: set[tuple[str, int | None]] = set()
        for fname, key, t in safetensors_io.iter_tensors(path, lambda k: bool(hf_adapter.hf_targets(k, config)),
                                                         fp8_block=block):
            for tg in hf_adapter.hf_targets(key, config):
                if tg.name not in params:
                    if strict:
                        raise CheckpointError(f"{path / fname}: unexpected tensor '{key}' (no such parameter in the model)")
                    continue
                src = hf_adapter.take(t, tg)
                experts = [tg.expert] if tg.expert is not None else (
                    range(src.shape[0]) if hf_adapter.is_expert_stack(tg.name) else [None])
                for e in experts:
                    dst = params[tg.name] if e is None else params[tg.name][e]
                    v = src if e is None or tg.expert is not None else src[e]
                    if tuple(dst.shape) != tuple(v.shape):
                        raise CheckpointError(
                            f"{path / fname}: tensor '{key}' has shape {tuple(t.shape)}, "
                            f"the model expects {tuple(dst.shape)} (check config.json)")
                    with torch.no_grad():
                        dst.copy_(v.to(dst.dtype))
                    filled.add((tg.name, e))
        missing = sorted(expected - filled, key=lambda x: (x[0], -1 if x[1] is None else x[1]))
        if missing and strict:
            shown = ", ".join(n if e is None else f"{n} expert {e}" for n, e in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(f"{path}: checkpoint is missing tensors: {shown}{more}")
        model.reset_buffers(device)
        model.eval()
        return model


def count_parameters(model: K2ForCausalLM) -> dict[str, int]:
    """Total and activated (per token: k of E routed experts) parameter counts. Works on meta tensors."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.moe_layers():
        per_expert = sum(p[0].numel() for p in m.experts.parameters())
        inactive += per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    return {"total": total, "activated": total - inactive}


def build_model(config: K2Config, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> K2ForCausalLM:
    """Build a randomly initialised model (use device='meta' to count without allocating)."""
    with torch.device(device):
        model = K2ForCausalLM(config, init_weights=torch.device(device).type != "meta")
    if dtype is not None:
        model.to(dtype)
    return model
