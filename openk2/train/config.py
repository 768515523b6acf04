"""Training settings: one dataclass, and the command-line flags generated from it.

Every field of `TrainConfig` is written once, here, with its default and its
help text; `add_config_flags` turns the fields into argparse flags (the flag
name is the field name with dashes, unless a field names another one), and
`config_from_args` reads a JSON config file plus the flags back into a
`TrainConfig`. SFT and RL configs extend the dataclass and get their flags the
same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.errors import ConfigError


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,  # noqa: A002
            zero_is_none: bool = False, cli: bool = True, choices: tuple | None = None,
            default_factory: Any = dataclasses.MISSING):
    """A dataclass field with the metadata its command-line flag needs."""
    meta = {"help": help, "flag": flag, "zero_is_none": zero_is_none, "cli": cli, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # what to train
    preset: str = setting("k2-tiny", "model preset (openk2 params lists them)")
    model_overrides: dict[str, Any] = setting(help="JSON object of model config fields to override",
                                              default_factory=dict)
    run_name: str | None = setting(None, "run name: outputs go to RUNS_DIR/NAME (default: the preset)", flag="--name")
    runs_dir: str = setting("runs", "where runs live")
    data_dir: str | None = setting(None, "token shards + tokenizer (default RUNS_DIR/_data/CORPUS-vVOCAB)")
    corpus: str = setting("default", "corpus preset (openk2 corpus describe)")
    vocab_size: int = setting(8192, "BPE vocabulary size of the tokenizer trained for the corpus")
    mixture: dict[str, float] | None = setting(None, "JSON object of domain weights (default: the corpus default)")
    # how long
    seq_len: int = setting(256, "tokens per training sequence")
    batch_size: int = setting(16, "global sequences per optimizer step")
    grad_accum: int = setting(1, "micro-batches per step (batch_size is split across them)")
    max_steps: int = setting(400, "optimizer steps (with a time budget: at most this many)", flag="--steps")
    # the main job promises <= 15 minutes on every machine of its kind (2 CPU cores); a fast one trains all
    # max_steps well inside the budget, a slow one stops the stable phase early
    time_budget_min: float | None = setting(
        12.0, "end training within this many minutes: the WSD stable phase stops early, placed from the "
              "measured throughput (0: no budget)", flag="--time-budget", zero_is_none=True)
    # optimizer (K2: MuonClip, tau 100, wd 0.1, WSD)
    optimizer: str = setting("muonclip", "MuonClip (Muon + QK-Clip) or the AdamW baseline",
                             choices=("muonclip", "adamw"))
    lr: float = setting(3e-3, "peak learning rate")
    warmup_steps: int | None = setting(None, "warm-up steps (default: 5%% of max_steps, at most 30)")
    decay_fraction: float = setting(0.35, "fraction of the run spent in the WSD decay")
    final_lr_ratio: float = setting(0.1, "learning rate at the end of the decay, as a fraction of the peak")
    weight_decay: float = setting(0.1, "decoupled weight decay (matrices, embeddings and head; not norms or biases)")
    qk_clip_tau: float | None = setting(100.0, "QK-Clip threshold tau; 0 disables (plain Muon)", zero_is_none=True)
    qk_clip_alpha: float = setting(0.5, "QK-Clip split of the scale between q and k (report: 0.5)")
    momentum: float = setting(0.95, "Muon momentum")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas (two numbers)")
    muon_ns_dtype: str = setting("bfloat16", "dtype of Muon's Newton-Schulz iteration",
                                 choices=("bfloat16", "float32"))
    grad_clip: float = setting(1.0, "global gradient-norm clip (0 disables)")
    router_bias_update_rate: float | None = setting(None, "loss-free balancer rate (default: the model config's)")
    # numerics and memory
    # "auto": bf16 autocast on GPUs; on CPUs bf16 only where a matmul micro-benchmark measures it faster
    # than fp32 (openk2.hardware): machines of one kind differ by 400x in bf16 speed
    dtype: str = setting("auto", "matmul dtype: bfloat16 autocast or float32; auto: bf16 on GPU, on CPU "
                                  "whichever a matmul micro-benchmark measures faster", choices=("auto", "float32", "bfloat16"))
    recompute: str = setting("none", "activation recomputation (selective: K2's list)", choices=("none", "selective"))
    # observability and checkpoints
    track_max_logit: bool = setting(True, "record the per-head max attention logit every step")
    log_every: int = setting(1, "write a metrics line every N steps")
    val_every: int = setting(150, "validate every N steps")
    val_batches: int = setting(8, "validation batches")
    ckpt_every: int = setting(50, "checkpoint every N steps")
    keep_checkpoints: int = setting(2, "training checkpoints kept")
    seed: int = setting(0, "random seed (model init, data order)")
    progress: bool = setting(True, "show a progress bar")
    plots: bool = setting(True, "draw PNG curves at the end")

    def validate(self) -> None:
        def need(cond, name, msg):
            if not cond:
                raise ConfigError(f"training setting '{name}': {msg}")

        need(self.seq_len >= 8, "seq_len", f"must be >= 8, got {self.seq_len}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        need(self.batch_size % self.grad_accum == 0, "grad_accum",
             f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        need(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        need(self.time_budget_min is None or self.time_budget_min > 0, "time_budget_min",
             f"must be > 0 (or 0/None for no budget), got {self.time_budget_min}")
        need(0 < self.lr < 1, "lr", f"must be in (0, 1), got {self.lr}")
        need(self.warmup_steps is None or 0 <= self.warmup_steps < self.max_steps, "warmup_steps",
             f"must be in [0, max_steps={self.max_steps}), got {self.warmup_steps}")
        need(0 <= self.decay_fraction <= 1, "decay_fraction", f"must be in [0, 1], got {self.decay_fraction}")
        need(0 <= self.final_lr_ratio <= 1, "final_lr_ratio", f"must be in [0, 1], got {self.final_lr_ratio}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.qk_clip_tau is None or self.qk_clip_tau > 0, "qk_clip_tau", f"must be > 0, got {self.qk_clip_tau}")
        need(0 <= self.qk_clip_alpha <= 1, "qk_clip_alpha", f"must be in [0, 1], got {self.qk_clip_alpha}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
             f"must be two numbers in [0, 1), got {self.betas}")
        need(self.muon_ns_dtype in ("bfloat16", "float32"), "muon_ns_dtype",
             f"must be 'bfloat16' or 'float32', got {self.muon_ns_dtype!r}")
        need(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        need(self.optimizer in ("muonclip", "adamw"), "optimizer", f"must be 'muonclip' or 'adamw', got {self.optimizer!r}")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype",
             f"must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        need(self.recompute in ("none", "selective"), "recompute", f"must be 'none' or 'selective', got {self.recompute!r}")
        need(self.vocab_size >= 512, "vocab_size", f"must be >= 512, got {self.vocab_size}")
        need(self.val_every >= 1 and self.ckpt_every >= 1 and self.log_every >= 1, "val_every/ckpt_every/log_every",
             "must be >= 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(30, self.max_steps // 20)

    @property
    def name(self) -> str:
        return self.run_name or self.preset

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path(self.runs_dir) / "_data" / f"{self.corpus}-v{self.vocab_size}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# ----------------------------------------------------------- command line
def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of an annotation like `float | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _json_object(name: str):
    def parse(text: str):
        try:
            v = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{name}: invalid JSON ({e.msg})") from None
        if not isinstance(v, dict):
            raise argparse.ArgumentTypeError(f"{name}: expected a JSON object")
        return v

    return parse


def add_config_flags(p: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per field of `cls` (default None: 'not given', so a --config file's value stands)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        tp, _ = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = meta.get("help", "")
        if "default" not in help_text:
            help_text += f" (default: {default})"
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text, **kw)
            continue
        kw["metavar"] = f.name.upper() if not meta.get("choices") else None
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        origin = typing.get_origin(tp)
        if origin is dict or tp is dict:
            kw["type"], kw["metavar"] = _json_object(f.name), "JSON"
        elif origin is tuple:
            kw["type"], kw["nargs"] = float, len(typing.get_args(tp))
        else:
            kw["type"] = tp if tp in (int, float, str) else str
        p.add_argument(flag, help=help_text, **{k: v for k, v in kw.items() if v is not None or k == "default"})


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    """A --config JSON file (if any), overridden by the flags given; validated."""
    base: dict = {}
    path = getattr(args, "config", None)
    if path:
        from openk2.utils.files import read_json

        base = read_json(path)
        if not isinstance(base, dict):
            raise ConfigError(f"{path}: expected a JSON object of training settings")
    base.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None})
    for f in dataclasses.fields(cls):  # "0 disables", from a flag or from the file
        if f.metadata.get("zero_is_none") and base.get(f.name) == 0:
            base[f.name] = None
    cfg = cls.from_dict(base)
    cfg.validate()
    return cfg
