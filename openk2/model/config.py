"""K2 model configuration: one dataclass, named presets, HF config.json I/O.

Field names follow HF's DeepseekV3Config so that config.json files of
DeepSeek-V3, Kimi-K2 (model_type ``kimi_k2``) and Moonlight read and write
without a translation table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.errors import ConfigError
from openk2.utils.files import atomic_write

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


@dataclass
class K2Config:
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU FFN of the first layers
    moe_intermediate_size: int = 2048  # per-expert SwiGLU hidden
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int = 64  # MLA: informational only (every head has its own k^C, v)
    # MLA
    q_lora_rank: int | None = 1536  # None: a full-rank q_proj (DeepSeek-V2-Lite / Moonlight)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    # misc
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0  # MTP layers in released checkpoints; not built, skipped on load
    model_type: str = "kimi_k2"
    # openk2 training knobs (written to config.json; HF ignores unknown keys)
    router_bias_update_rate: float = 1e-3  # aux-loss-free balancing speed (DeepSeek-V3: 0.001)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, kept for round trip

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default")) or "default"

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale^2 as transformers applies it (at every length)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0) or 0
            factor = float(self.rope_scaling.get("factor", 1.0))
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale = scale * m * m
        return scale

    @property
    def kv_cache_values_per_token(self) -> int:
        """Values cached per token per layer in MLA's absorbed mode: the latent plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, fieldname: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field '{fieldname}': {msg}")

        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
        ):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, f"must be a positive integer, got {v!r}")
        need(isinstance(self.qk_nope_head_dim, int) and self.qk_nope_head_dim >= 0, "qk_nope_head_dim",
             f"must be a non-negative integer, got {self.qk_nope_head_dim!r}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", f"must be a positive integer or null, got {self.q_lora_rank!r}")
        need(isinstance(self.n_routed_experts, int) and self.n_routed_experts >= 0, "n_routed_experts",
             f"must be a non-negative integer, got {self.n_routed_experts!r}")
        if self.n_routed_experts > 0:
            need(isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0,
                 "moe_intermediate_size", f"must be a positive integer, got {self.moe_intermediate_size!r}")
            need(isinstance(self.num_experts_per_tok, int) and 0 < self.num_experts_per_tok <= self.n_routed_experts,
                 "num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}], got {self.num_experts_per_tok!r}")
            need(isinstance(self.n_group, int) and self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 "n_group", f"must divide n_routed_experts={self.n_routed_experts}, got {self.n_group!r}")
            need(isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group, "topk_group",
                 f"must be in [1, n_group={self.n_group}], got {self.topk_group!r}")
            if self.n_group > 1:
                per_group = self.n_routed_experts // self.n_group
                need(per_group >= 2, "n_group", "group-limited routing needs at least 2 experts per group")
                need(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                     "the chosen groups hold fewer experts than num_experts_per_tok")
        need(self.scoring_func == "sigmoid", "scoring_func",
             f"only 'sigmoid' (DeepSeek-V3 / K2) is supported, got {self.scoring_func!r}")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), "topk_method",
             f"unsupported value {self.topk_method!r}")
        need(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        need(isinstance(self.first_k_dense_replace, int) and self.first_k_dense_replace >= 0,
             "first_k_dense_replace", f"must be a non-negative integer, got {self.first_k_dense_replace!r}")
        need(isinstance(self.moe_layer_freq, int) and self.moe_layer_freq >= 1, "moe_layer_freq",
             f"must be a positive integer, got {self.moe_layer_freq!r}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps!r}")
        need(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta!r}")
        need(self.model_type in SUPPORTED_MODEL_TYPES, "model_type",
             f"unsupported model_type {self.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if self.rope_scaling is not None:
            need(isinstance(self.rope_scaling, dict), "rope_scaling", "must be an object or null")
            rt = self.rope_type
            need(rt in ("default", "yarn"), "rope_scaling.type", f"only 'yarn' is supported, got {rt!r}")
            if rt == "yarn":
                f = self.rope_scaling.get("factor")
                need(isinstance(f, (int, float)) and f >= 1, "rope_scaling.factor", f"must be a number >= 1, got {f!r}")
                o = self.rope_scaling.get("original_max_position_embeddings")
                need(isinstance(o, int) and o > 0, "rope_scaling.original_max_position_embeddings",
                     f"must be a positive integer, got {o!r}")

    # --------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json of an exported checkpoint: transformers' DeepseekV3 form whatever the source.

        model_type is always ``deepseek_v3`` (architectures ``DeepseekV3ForCausalLM``): transformers'
        AutoModelForCausalLM, vLLM and SGLang load that natively, while ``kimi_k2`` (the Kimi-K2
        releases) needs the release's custom code (``auto_map``), which an export does not carry, and
        transformers maps per-expert tensor names only for ``deepseek_v3``. The architecture is the same
        (docs/model.md, "Checkpoints"). ``auto_map`` and ``quantization_config`` are dropped: the export
        has no custom code and its weights are dequantised.
        """
        d = {k: v for k, v in self.extra.items() if k not in ("auto_map", "quantization_config")}
        d.update(self.to_dict())
        d["model_type"] = "deepseek_v3"
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        d["n_routed_experts"] = self.n_routed_experts
        d["qk_head_dim"] = self.qk_head_dim
        d["head_dim"] = self.qk_rope_head_dim
        d["hidden_act"] = self.hidden_act
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs.setdefault("type", self.rope_type)
            rs.setdefault("rope_type", self.rope_type)
            d["rope_scaling"] = rs
        d.pop("rope_parameters", None)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "K2Config":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        # transformers >= 5 writes rope settings as rope_parameters (theta inside)
        rp = raw.pop("rope_parameters", None)
        if isinstance(rp, dict):
            rp = dict(rp)
            if "rope_theta" in rp:
                raw.setdefault("rope_theta", rp.pop("rope_theta"))
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype != "default" and raw.get("rope_scaling") is None:
                raw["rope_scaling"] = rp
        if raw.get("model_type") is None:
            raise ConfigError(f"{source}: missing field 'model_type' (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {
            k: v for k, v in raw.items()
            if k not in known and k not in ("architectures", "qk_head_dim", "head_dim", "transformers_version", "dtype")
        }
        if "num_local_experts" in raw and "n_routed_experts" not in raw:
            kwargs["n_routed_experts"] = raw["num_local_experts"]
        try:
            cfg = cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "K2Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        from openk2.utils.files import read_json

        return cls.from_dict(read_json(path), source=str(path))

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = directory / "config.json"
        atomic_write(out, json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        return out

    def replace(self, **changes: Any) -> "K2Config":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- presets
def _kimi_k2() -> K2Config:
    return K2Config(
        rope_scaling={
            "type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
            "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        max_position_embeddings=131072,
    )


def _deepseek_v3() -> K2Config:
    return K2Config(
        vocab_size=129280, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
        first_k_dense_replace=3, n_group=8, topk_group=4, routed_scaling_factor=2.5, rope_theta=10000.0,
        rope_scaling={
            "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        max_position_embeddings=163840, bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=1,
        model_type="deepseek_v3",
    )


def _small(hidden: int, layers: int, heads: int, experts: int, moe_inter: int, dense_inter: int,
           q_lora: int, kv_lora: int, nope: int, rope: int, v: int, vocab: int = 8192, ctx: int = 4096) -> K2Config:
    # Keeps K2's shape: many experts, 8 active + 1 shared, 1 dense layer first, no expert groups.
    return K2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=dense_inter, moe_intermediate_size=moe_inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
        n_routed_experts=experts, num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1,
        n_group=1, topk_group=1, routed_scaling_factor=2.827, rope_theta=50000.0, rope_scaling=None,
        max_position_embeddings=ctx, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        # short runs need a faster balancer than DeepSeek-V3's 1e-3 (measured: 1e-3 left routing
        # collapsed onto 8 of 32 experts for the first ~20 steps of k2-tiny)
        router_bias_update_rate=1e-2,
    )


PRESETS: dict[str, Any] = {
    "kimi-k2": _kimi_k2,
    "deepseek-v3": _deepseek_v3,
    # CPU-sized, K2-shaped presets (token ids follow openk2's tokenizer: [BOS]=0, [EOS]=1, [PAD]=2)
    "k2-nano": lambda: _small(128, 3, 4, 16, 32, 384, 64, 32, 16, 16, 16, vocab=8192, ctx=1024),
    "k2-tiny": lambda: _small(256, 4, 4, 32, 64, 768, 128, 64, 32, 16, 32),
    "k2-small": lambda: _small(512, 8, 8, 64, 128, 1408, 256, 128, 64, 32, 64),
    # a GPU-sized preset (~1.3B total) for throughput measurements on a lent accelerator
    "k2-base": lambda: _small(1024, 16, 16, 128, 256, 2816, 512, 256, 96, 32, 96, vocab=32768),
}


def get_preset(name: str) -> K2Config:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


def load_config(name_or_path: str | os.PathLike) -> K2Config:
    """A preset name, a config.json file, or a checkpoint directory holding one."""
    s = str(name_or_path)
    if s in PRESETS:
        return get_preset(s)
    p = Path(s)
    if p.exists():
        return K2Config.from_json_file(p)
    raise ConfigError(f"{s!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config file/directory")
