"""K2-style pre-training: MuonClip, WSD schedule, packed multi-domain data, atomic resumable checkpoints.

One function, `pretrain(cfg)`, runs the whole job: it prepares the tokenizer
and token shards if needed, builds the model, trains, validates, checkpoints,
exports an HF-format checkpoint and draws the curves. The same code runs
under torchrun (FSDP2 data parallel + expert parallel, see parallel.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openk2.errors import CheckpointError, ConfigError
from openk2.model.config import K2Config, get_preset
from openk2.model.transformer import K2ForCausalLM, build_model
from openk2.train.flops import train_flops_per_token
from openk2.train.schedule import wsd_lr

# Matmul peaks used for the MFU estimate (FLOP/s). CPU: measured on the reference
# 2-core machine (2 threads, 2048^3 matmuls, best of 5; docs/benchmarks.md): fp32 355,
# bf16 177 GFLOP/s (AVX512-BF16 without AMX: bf16 runs at half the fp32 rate there,
# not the ~4x that shared/RESOURCES.md reports for other machines). GPU: dense specs.
PEAK_FLOPS = {("cpu", "float32"): 355e9, ("cpu", "bfloat16"): 177e9,
              ("cuda", "bfloat16"): 989e12, ("cuda", "float32"): 67e12}


@dataclass
class TrainConfig:
    # what to train
    preset: str = "k2-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None  # default: the preset name
    runs_dir: str = "runs"
    data_dir: str | None = None  # token shards + tokenizer; default RUNS_DIR/_data/<corpus>-v<vocab>
    corpus: str = "default"
    vocab_size: int = 8192
    mixture: dict[str, float] | None = None  # None: the corpus default (see docs/data.md)
    # how long
    seq_len: int = 256
    batch_size: int = 16  # global sequences per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size is split across them)
    max_steps: int = 400
    # optimizer (K2: MuonClip, tau 100, wd 0.1, WSD)
    optimizer: str = "muonclip"  # or "adamw"
    lr: float = 3e-3
    warmup_steps: int | None = None  # None: 5% of the run, at most 30
    decay_fraction: float = 0.35
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    qk_clip_tau: float | None = 100.0  # None disables QK-Clip (plain Muon)
    momentum: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    router_bias_update_rate: float | None = None  # None: the model config's (1e-3)
    # numerics and memory
    # "auto": bf16 autocast on GPUs, fp32 on CPUs (measured on the reference 2-core CPU, AVX512-BF16
    # without AMX: a bf16-autocast k2-tiny step ran at 0.8x the fp32 step; docs/benchmarks.md)
    dtype: str = "auto"
    recompute: str = "none"  # or "selective"
    # observability and checkpoints
    track_max_logit: bool = True
    log_every: int = 1
    val_every: int = 150
    val_batches: int = 8
    ckpt_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    plots: bool = True

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
        need(0 < self.lr < 1, "lr", f"must be in (0, 1), got {self.lr}")
        need(self.warmup_steps is None or 0 <= self.warmup_steps < self.max_steps, "warmup_steps",
             f"must be in [0, max_steps={self.max_steps}), got {self.warmup_steps}")
        need(0 <= self.decay_fraction <= 1, "decay_fraction", f"must be in [0, 1], got {self.decay_fraction}")
        need(0 <= self.final_lr_ratio <= 1, "final_lr_ratio", f"must be in [0, 1], got {self.final_lr_ratio}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.qk_clip_tau is None or self.qk_clip_tau > 0, "qk_clip_tau", f"must be > 0, got {self.qk_clip_tau}")
        need(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        need(self.optimizer in ("muonclip", "adamw"), "optimizer", f"must be 'muonclip' or 'adamw', got {self.optimizer!r}")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype",
             f"must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        need(self.recompute in ("none", "selective"), "recompute", f"must be 'none' or 'selective', got {self.recompute!r}")
        need(self.vocab_size >= 512, "vocab_size", f"must be >= 512, got {self.vocab_size}")
        need(self.val_every >= 1 and self.ckpt_every >= 1 and self.log_every >= 1, "val_every/ckpt_every/log_every",
             "must be >= 1")

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
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# ------------------------------------------------------------------ helpers
def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prepare_data(cfg: TrainConfig, progress: bool = True):
    """Tokenizer + token shards for cfg (built once, reused by later runs). Returns (tokenizer, data_dir)."""
    from openk2.data.dataset import build_dataset
    from openk2.data.tokenizer import load_tokenizer, train_tokenizer

    data_dir = cfg.resolved_data_dir()
    tok_dir = data_dir / "tokenizer"
    rank, world = _dist()
    if rank == 0:
        if not (tok_dir / "tokenizer.json").exists():
            tok, _ = train_tokenizer(cfg.corpus, cfg.vocab_size, weights=cfg.mixture)
            tok.save(tok_dir)
        tok = load_tokenizer(tok_dir)
        build_dataset(data_dir, tok, cfg.corpus, progress=progress)
    if world > 1:
        torch.distributed.barrier()
    tok = load_tokenizer(tok_dir)
    return tok, data_dir


def model_config(cfg: TrainConfig, tokenizer) -> K2Config:
    mc = get_preset(cfg.preset)
    changes = dict(cfg.model_overrides)
    changes.setdefault("vocab_size", tokenizer.vocab_size)
    changes.setdefault("bos_token_id", tokenizer.bos_id)
    changes.setdefault("eos_token_id", tokenizer.eos_id)
    changes.setdefault("pad_token_id", tokenizer.pad_id)
    changes.setdefault("max_position_embeddings", max(mc.max_position_embeddings, cfg.seq_len))
    if cfg.router_bias_update_rate is not None:
        changes["router_bias_update_rate"] = cfg.router_bias_update_rate
    try:
        return mc.replace(**changes)
    except TypeError as e:
        raise ConfigError(f"model_overrides: {e}") from None


def build_optimizer(model: K2ForCausalLM, cfg: TrainConfig):
    if cfg.optimizer == "adamw":
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            (no_decay if p.dim() < 2 else decay).append(p)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    from openk2.optim import MuonClip

    return MuonClip.for_model(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, betas=cfg.betas,
        qk_clip_tau=cfg.qk_clip_tau)


def _set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


# -------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"{path}: cannot read training checkpoint ({type(e).__name__}: {e})") from None
    for key in ("model", "optimizer", "step", "data", "rng", "train_config"):
        if key not in state:
            raise CheckpointError(f"{path}: training checkpoint lacks '{key}'")
    return state


# ------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, data_dir, cfg: TrainConfig, autocast) -> float:
    from openk2.data.packing import PackedDataset

    rank, world = _dist()
    val = PackedDataset(data_dir, "val", cfg.seq_len, cfg.mixture, seed=1234, rank=rank, world_size=world)
    bs = max(world, min(cfg.batch_size, 16) // world * world)
    was = model.training
    model.eval()
    total, n = 0.0, 0
    it = val.batches(bs)
    for _ in range(cfg.val_batches):
        batch = next(it)
        with autocast():
            loss = model(batch[:, :-1], shift_labels=batch[:, 1:]).loss  # fused head + loss (no grad here)
        total += loss.item() * batch[:, 1:].numel()
        n += batch[:, 1:].numel()
    model.train(was)
    if world > 1:
        t = torch.tensor([total, n], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        total, n = float(t[0]), float(t[1])
    return total / n


# ------------------------------------------------------------------- main
def pretrain(cfg: TrainConfig, resume: bool = True, log=print, stop_after: int | None = None) -> dict:
    """Run (or resume) a pre-training job; returns the final summary dict.

    `stop_after` ends the process's work after that many steps as if it had
    been killed (the last checkpoint stays; used to test resumption).
    """
    cfg.validate()
    from openk2.data.packing import PackedDataset
    from openk2.train.parallel import maybe_parallelize

    rank, world = _dist()
    is_main = rank == 0
    run_dir = cfg.run_dir
    ckpt_path = latest_checkpoint(run_dir) if resume else None
    state = load_checkpoint(ckpt_path) if ckpt_path else None
    if state is not None:
        saved = TrainConfig.from_dict(state["train_config"])
        for k in ("preset", "model_overrides", "seq_len", "batch_size", "optimizer", "corpus", "vocab_size", "max_steps"):
            if getattr(saved, k) != getattr(cfg, k):
                raise ConfigError(
                    f"{ckpt_path}: run was started with {k}={getattr(saved, k)!r}, now {getattr(cfg, k)!r}; "
                    f"use another --name or remove {run_dir}")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    tok, data_dir = prepare_data(cfg, progress=cfg.progress and is_main)
    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg, tok)
    model = build_model(mcfg)
    if cfg.recompute != "none":
        model.set_recompute(cfg.recompute)
    model = maybe_parallelize(model)
    model.train()
    model.set_track_max_logit(cfg.track_max_logit or (cfg.optimizer == "muonclip" and cfg.qk_clip_tau is not None))
    opt = build_optimizer(model, cfg)
    data = PackedDataset(data_dir, "train", cfg.seq_len, cfg.mixture, seed=cfg.seed, rank=rank, world_size=world)
    step, tokens_seen, elapsed = 0, 0, 0.0
    if state is not None:
        from openk2.train.parallel import load_model_state

        load_model_state(model, state["model"])
        opt.load_state_dict(state["optimizer"])
        data.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        step, tokens_seen, elapsed = state["step"], state["tokens"], state.get("elapsed", 0.0)
        if is_main:
            log(f"resumed from {ckpt_path} at step {step}")
    metrics_path = run_dir / "metrics.jsonl"
    if is_main and state is None and metrics_path.exists():
        metrics_path.unlink()
    if is_main and state is not None and metrics_path.exists():
        # drop lines written after the checkpoint we resume from (the run died between checkpoints)
        keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and _line_step(ln) <= step]
        metrics_path.write_text("".join(k + "\n" for k in keep))

    dev = model.lm_head.weight.device if hasattr(model, "lm_head") else torch.device("cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
    use_bf16 = dtype == "bfloat16"

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)

    flops_per_token = train_flops_per_token(mcfg, cfg.seq_len)
    peak = PEAK_FLOPS.get((dev.type, dtype), 180e9) * world
    micro = cfg.batch_size // cfg.grad_accum
    batches = data.batches(micro * 1)  # global micro-batch; each rank gets its rows
    if is_main:
        n = model.num_parameters() if hasattr(model, "num_parameters") else {}
        log(f"model {cfg.preset}: {n.get('total', 0):,} parameters ({n.get('activated', 0):,} activated), "
            f"vocab {mcfg.vocab_size}; optimizer {cfg.optimizer}"
            + (f" (QK-Clip tau={cfg.qk_clip_tau:g})" if cfg.optimizer == "muonclip" and cfg.qk_clip_tau else "")
            + f"; {cfg.max_steps} steps x {cfg.batch_size * cfg.seq_len:,} tokens; world size {world}")

    progress = None
    if cfg.progress and is_main:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        task = progress.add_task("train", total=cfg.max_steps, completed=step, info="")
        progress.start()
    ever_clipped = None
    last_val = None
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = wsd_lr(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.decay_fraction, cfg.final_lr_ratio)
            _set_lr(opt, lr)
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                batch = next(batches).to(dev)
                with autocast():  # fused LM head + cross-entropy (openk2.model.loss): no [N, V] logits
                    loss = model(batch[:, :-1], shift_labels=batch[:, 1:]).loss
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
            if world > 1:
                lt = torch.tensor([loss_sum])
                torch.distributed.all_reduce(lt)
                loss_sum = float(lt) / world
            from openk2.train.parallel import clip_grad_norm, post_backward

            post_backward(model)
            gnorm = clip_grad_norm(model, cfg.grad_clip)
            max_logits = model.max_logits().clone() if cfg.track_max_logit else None
            if max_logits is not None and world > 1:
                torch.distributed.all_reduce(max_logits, op=torch.distributed.ReduceOp.MAX)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.reset_max_logits()
            load = model.update_router_biases()
            step += 1
            tokens_seen += cfg.batch_size * cfg.seq_len
            dt = time.perf_counter() - t0
            elapsed += dt
            row: dict[str, Any] = {
                "step": step, "tokens": tokens_seen, "loss": round(loss_sum, 5), "lr": lr, "grad_norm": round(gnorm, 4),
                "tokens_per_s": round(cfg.batch_size * cfg.seq_len / dt, 1),
                "mfu": round(flops_per_token * cfg.batch_size * cfg.seq_len / dt / peak, 4), "elapsed_s": round(elapsed, 2),
            }
            row.update({k: round(v, 4) for k, v in load.items()})
            if max_logits is not None:
                per_layer = max_logits.amax(-1)
                row["max_logit"] = round(float(per_layer.max()), 3)
                row["max_logit_per_layer"] = [round(float(x), 3) for x in per_layer]
            clip = getattr(opt, "clip_stats", None)
            if clip:
                row["heads_clipped"] = int(clip.get("heads_clipped", 0))
                row["heads_ever_clipped"] = int(clip.get("heads_ever_clipped", 0))
                row["qk_clip_tau"] = cfg.qk_clip_tau
            if step % cfg.val_every == 0 or step == cfg.max_steps:
                last_val = evaluate(model, data_dir, cfg, autocast)
                row["val_loss"] = round(last_val, 5)
            if is_main and (step % cfg.log_every == 0 or "val_loss" in row):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if progress is not None:
                info = f"loss {loss_sum:.3f}" + (f" val {last_val:.3f}" if last_val is not None else "") + \
                       f" {row['tokens_per_s']:.0f} tok/s"
                progress.update(task, completed=step, info=info)
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                _checkpoint(model, opt, data, cfg, step, tokens_seen, elapsed)
            if stop_after is not None and step >= stop_after:
                return {"stopped_at": step}
    finally:
        if progress is not None:
            progress.stop()
    from openk2.train.parallel import gather_model_state

    final_state = gather_model_state(model)  # a collective: every rank takes part
    summary = _finish(final_state, tok, data_dir, cfg, mcfg, last_val, log) if is_main else {}
    if world > 1:
        torch.distributed.barrier()
    return summary


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except json.JSONDecodeError:
        return 1 << 62  # a torn last line: drop it


def _checkpoint(model, opt, data, cfg: TrainConfig, step: int, tokens: int, elapsed: float) -> None:
    from openk2.train.parallel import gather_model_state

    rank, _ = _dist()
    model_state = gather_model_state(model)
    opt_state = opt.state_dict()
    if rank != 0:
        return
    state = {"model": model_state, "optimizer": opt_state, "step": step, "tokens": tokens, "elapsed": elapsed,
             "data": data.state_dict(), "rng": _rng_state(), "train_config": cfg.to_dict()}
    d = cfg.run_dir / "checkpoints"
    save_checkpoint(d / f"step_{step:07d}.pt", state)
    for old in sorted(d.glob("step_*.pt"))[: -cfg.keep_checkpoints]:
        old.unlink()


def _finish(model_state, tok, data_dir, cfg: TrainConfig, mcfg: K2Config, val_loss, log) -> dict:
    from openk2.data.dataset import unigram_baseline

    hf_dir = cfg.run_dir / "hf"
    export = K2ForCausalLM(mcfg, init_weights=False)
    export.load_state_dict(model_state, strict=False)
    export.reset_buffers()
    export.save_pretrained(hf_dir)
    tok.save(hf_dir)
    base = unigram_baseline(data_dir, "val", cfg.mixture)
    summary = {"run_dir": str(cfg.run_dir), "val_loss": val_loss, "unigram_baseline": base,
               "val_ppl": math.exp(val_loss) if val_loss is not None else None, "hf_checkpoint": str(hf_dir)}
    with open(cfg.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": cfg.max_steps, "final": True, "val_loss": val_loss, "unigram_baseline": base}) + "\n")
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.plots:
        from openk2.train.plot import plot_run

        summary["plots"] = [str(p) for p in plot_run(cfg.run_dir)]
    log(f"validation loss {val_loss:.4f} nats/token (unigram baseline {base:.4f}); HF checkpoint: {hf_dir}")
    return summary
