"""The one training loop: pre-training uses it now, SFT and RL use it next.

A step is two named pieces, as in torchtitan's trainer:

* `forward_backward(micro_batches)`: each micro-batch's loss (a task's
  `loss_fn(model, batch) -> (mean loss, number of targets)`), scaled so the
  step's gradient is that of the mean over every target of the global batch
  (all micro-batches, all ranks), then backward. The model's per-head
  max-logit statistic (QK-Clip's S_max) accumulates over the micro-batches.
* `optimizer_step()`: expert-gradient averaging, global gradient clipping,
  the S_max all-reduce, the optimizer step (MuonClip applies QK-Clip inside
  it), the loss-free router-bias update.

Around them: `evaluate()` (the task's `evaluate_fn`), `save()` / `load()` of
a resumable, sharded state (openk2.train.checkpoint), a JSONL metrics log, a
progress bar, and `fit()`, which runs steps until the schedule's end. The
learning rate follows WSD (openk2.train.schedule); with a time budget the
stable phase ends early so that the run finishes in time (`StepBudget`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openk2.model.loss import IGNORE_INDEX
from openk2.train.config import TrainConfig
from openk2.train.parallel import rank_world as _dist
from openk2.train.schedule import StepBudget, wsd_lr

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]


def lm_targets(batch) -> torch.Tensor:
    """Next-token targets of a batch: a LongTensor [B, T+1] window, or a dict with input_ids + labels (aligned)."""
    return batch["labels"] if isinstance(batch, dict) else batch[:, 1:]


def lm_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the targets that are not IGNORE_INDEX (fused head + loss)."""
    targets = lm_targets(batch)
    if isinstance(batch, dict):
        ids = batch["input_ids"]
        # packed sequences (SFT): positions restart per document, attention confined by document_ids
        kw = {k: batch[k] for k in ("position_ids", "document_ids") if batch.get(k) is not None}
    else:
        ids, kw = batch[:, :-1], {}
    loss = model(ids, shift_labels=targets, **kw).loss
    return loss, int((targets != IGNORE_INDEX).sum())


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch.to(device)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The matmul dtype for `--dtype auto|float32|bfloat16`: auto measures (bf16 only where it is faster)."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16
    from openk2.hardware import fastest_matmul_dtype

    return fastest_matmul_dtype(device.type)


def resolve_precision(cfg: TrainConfig, device: torch.device, saved: dict | None = None) -> dict:
    """The run's measured choices, fixed once: {"dtype": autocast dtype, "ns_matmul": Newton-Schulz arithmetic}.

    "auto" settings are measured on rank 0 and broadcast, so every rank computes with the same arithmetic
    (ranks timing their own micro-benchmarks on shared cores could disagree); a resumed run reuses the
    choices saved in its checkpoint (`saved`), so resuming never changes the numerics.
    """
    if saved:
        return dict(saved)
    from openk2.optim.newton_schulz import matmul_dtype_for

    rank, world = _dist()
    out = None
    if rank == 0:
        dtype = autocast_dtype(cfg.dtype, device)
        ns = getattr(torch, cfg.muon_ns_dtype)
        out = {"dtype": str(dtype).removeprefix("torch."),
               "ns_matmul": "native" if matmul_dtype_for(device, ns, "auto") == ns else "fp32"}
    if world > 1:
        box = [out]
        torch.distributed.broadcast_object_list(box, src=0)
        out = box[0]
    return out


class Trainer:
    """Trains `model` with `optimizer` on `data` under the settings of `cfg` (see the module docstring).

    `data` is a stateful loader: `batches(global_micro_batch_size)` yields this
    rank's rows of each micro-batch; `state_dict()` / `load_state_dict()`
    save and restore its position. `evaluate_fn(trainer) -> dict` returns
    validation numbers (e.g. ``{"val_loss": ...}``). `count_fn(batch)` is the
    number of targets `loss_fn` averages over (known before the forward pass,
    so that the loss scale of every micro-batch is known). `flops_per_token` (the
    model's training FLOPs per target token) turns throughput into MFU.
    `precision` is `resolve_precision`'s result (measured when not given); it is
    saved with every checkpoint. `elapsed` counts the training wall time:
    steps, evaluations and checkpoint saves (what a time budget spends).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, data, *,
                 loss_fn: LossFn = lm_loss, evaluate_fn: Callable[["Trainer"], dict] | None = None,
                 flops_per_token: float | None = None, run_dir: str | Path | None = None,
                 count_fn: Callable[[Any], int] = lambda b: int((lm_targets(b) != IGNORE_INDEX).sum()),
                 precision: dict | None = None, name: str = "train"):
        self.model, self.optimizer, self.cfg, self.data = model, optimizer, cfg, data
        self.count_fn = count_fn
        self.loss_fn, self.evaluate_fn, self.name = loss_fn, evaluate_fn, name
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
        self.rank, self.world = _dist()
        self.is_main = self.rank == 0
        self.device = next(model.parameters()).device
        self.precision = precision or resolve_precision(cfg, self.device)
        self.dtype = getattr(torch, self.precision["dtype"])
        self.flops_per_token = flops_per_token
        self.peak_flops = None
        if flops_per_token:
            from openk2.hardware import matmul_flops

            self.peak_flops = matmul_flops(self.dtype, self.device.type) * self.world
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.budget = StepBudget(cfg.max_steps, cfg.warmup, cfg.decay_fraction,
                                 None if cfg.time_budget_min is None else cfg.time_budget_min * 60.0,
                                 val_every=cfg.val_every)
        self.last_eval: dict = {}
        self.extra_state: dict = {}  # a task's own values, saved and restored with every checkpoint
        self._batches: Iterator | None = None
        self.micro_batch_size = cfg.batch_size // cfg.grad_accum
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ----------------------------------------------------------- numerics
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def lr_at(self, step: int) -> float:
        c = self.cfg
        return wsd_lr(step, self.budget.total_steps, c.lr, c.warmup, c.decay_fraction, c.final_lr_ratio)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    # --------------------------------------------------------------- step
    def next_micro_batches(self) -> list:
        if self._batches is None:
            self._batches = self.data.batches(self.micro_batch_size)
        return [_to(next(self._batches), self.device) for _ in range(self.cfg.grad_accum)]

    def forward_backward(self, micro_batches: list) -> dict:
        """Loss and gradients of one step; returns {"loss": global mean, "targets": global target count}."""
        # reductions on the model's device (NCCL has no CPU tensors)
        total = torch.tensor(float(sum(self.count_fn(b) for b in micro_batches)), dtype=torch.float64,
                             device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(total)
        n_global = float(total)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in micro_batches:
            with self.autocast():
                loss, n = self.loss_fn(self.model, b)
            if n_global > 0:
                # FSDP averages gradients over ranks: scale by world / N_global for the global mean
                (loss * (n * self.world / n_global)).backward()
            loss_sum += loss.detach().double() * n
        if self.world > 1:
            torch.distributed.all_reduce(loss_sum)
        return {"loss": float(loss_sum) / max(n_global, 1.0), "targets": int(n_global)}

    def optimizer_step(self) -> dict:
        """Gradient post-processing, the optimizer step and the router-bias update; returns their statistics."""
        from openk2.train.parallel import clip_grad_norm, post_backward

        model, out = self.model, {}
        post_backward(model)
        out["grad_norm"] = clip_grad_norm(model, self.cfg.grad_clip)
        max_logits = model.max_logits().clone() if self.cfg.track_max_logit and hasattr(model, "max_logits") else None
        if max_logits is not None and self.world > 1:
            torch.distributed.all_reduce(max_logits, op=torch.distributed.ReduceOp.MAX)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(model, "reset_max_logits"):
            model.reset_max_logits()
        if hasattr(model, "update_router_biases"):
            out.update(model.update_router_biases())
        if max_logits is not None:
            per_layer = max_logits.amax(-1)
            out["max_logit"] = float(per_layer.max())
            out["max_logit_per_layer"] = [round(float(x), 3) for x in per_layer]
        clip = getattr(self.optimizer, "clip_stats", None)
        if clip:
            out["heads_clipped"] = int(clip.get("heads_clipped", 0))
            out["heads_ever_clipped"] = int(clip.get("heads_ever_clipped", 0))
            out["qk_clip_tau"] = self.cfg.qk_clip_tau
        return out

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics row."""
        t0 = time.perf_counter()
        lr = self.lr_at(self.step)
        self.set_lr(lr)
        fb = self.forward_backward(self.next_micro_batches())
        stats = self.optimizer_step()
        self.step += 1
        self.tokens += fb["targets"]
        dt = time.perf_counter() - t0
        self.elapsed += dt
        row: dict[str, Any] = {"step": self.step, "tokens": self.tokens, "loss": round(fb["loss"], 5), "lr": lr,
                               "grad_norm": round(stats.pop("grad_norm"), 4),
                               "tokens_per_s": round(fb["targets"] / dt, 1)}
        if self.peak_flops:
            row["mfu"] = round(self.flops_per_token * fb["targets"] / dt / self.peak_flops, 4)
        row["elapsed_s"] = round(self.elapsed, 2)
        for k, v in stats.items():
            row[k] = round(v, 4) if isinstance(v, float) else v
        return row

    # ----------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self) -> dict:
        """The task's evaluation in eval mode; its wall time counts in `elapsed` (and in the budget's plan)."""
        if self.evaluate_fn is None:
            return {}
        was = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        try:
            with self.autocast():
                out = self.evaluate_fn(self)
        finally:
            self.model.train(was)
            from openk2.train.checkpoint import reshard

            reshard(self.model)  # FSDP2 leaves the root unsharded after a forward without backward
        dt = time.perf_counter() - t0
        self.elapsed += dt
        self.budget.record_eval(dt)
        self.last_eval = out
        return out

    # --------------------------------------------------------- checkpoint
    def state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "data": self.data.state_dict(),
                "budget": self.budget.state_dict(), "precision": self.precision, "last_eval": self.last_eval,
                "train_config": self.cfg.to_dict(), "extra": self.extra_state}

    def save(self) -> Path:
        from openk2.train.checkpoint import save_training_state

        path = self.run_dir / "checkpoints" / f"step_{self.step:07d}"
        return save_training_state(path, self.model, self.optimizer, self.state(), keep=self.cfg.keep_checkpoints)

    def load(self, path: str | Path) -> None:
        from openk2.train.checkpoint import load_training_state

        st = load_training_state(Path(path), self.model, self.optimizer)
        self.data.load_state_dict(st["data"])
        self._batches = None
        self.step, self.tokens, self.elapsed = st["step"], st["tokens"], st.get("elapsed", 0.0)
        if "budget" in st:
            self.budget.load_state_dict(st["budget"])
        self.last_eval = dict(st.get("last_eval") or {})
        self.extra_state = dict(st.get("extra") or {})

    # ------------------------------------------------------------ metrics
    def _start_metrics(self, resumed: bool) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            self.metrics_path.unlink(missing_ok=True)
        elif self.metrics_path.exists():
            # drop lines written after the checkpoint we resume from (the run died between checkpoints)
            # (and the end-of-run line of a finished run: it is written again when the run ends again)
            keep = [ln for ln in self.metrics_path.read_text().splitlines()
                    if ln.strip() and _line_step(ln) <= self.step and '"final": true' not in ln]
            from openk2.utils import atomic_write

            atomic_write(self.metrics_path, "".join(k + "\n" for k in keep))

    def write_metrics(self, row: dict) -> None:
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    # ---------------------------------------------------------------- fit
    def fit(self, resumed: bool = False, stop_after: int | None = None) -> dict:
        """Train until the schedule's last step; returns {"step", "tokens", "elapsed_s", **last evaluation}.

        `stop_after` ends after that many steps as if the process had been
        killed (the last checkpoint stays; used to test resumption).
        """
        from openk2.utils import progress_bar

        cfg = self.cfg
        self._start_metrics(resumed)
        self.model.train()
        if self.step >= self.budget.total_steps and not self.last_eval:
            self.evaluate()  # a finished run resumed from a checkpoint saved before any evaluation
        with progress_bar(self.name, self.budget.total_steps, enabled=cfg.progress and self.is_main, info=True,
                          completed=self.step) as bar:
            while self.step < self.budget.total_steps:
                row = self.train_step()
                self.budget.update(self.step, self.elapsed)
                end = self.step >= self.budget.total_steps
                if self.step % cfg.val_every == 0 or end:
                    ev = self.evaluate()
                    row.update({k: round(v, 5) if isinstance(v, float) else v for k, v in ev.items()})
                if self.step % cfg.log_every == 0 or end or "val_loss" in row:
                    self.write_metrics(row)
                val = self.last_eval.get("val_loss")
                bar.update(completed=self.step, total=self.budget.total_steps,
                           info=f"loss {row['loss']:.3f}" + (f" val {val:.3f}" if val is not None else "")
                                + f" {row['tokens_per_s']:.0f} tok/s")
                if self.step % cfg.ckpt_every == 0 or end:
                    t0 = time.perf_counter()
                    self.save()
                    self.elapsed += time.perf_counter() - t0  # the next checkpoint records it
                if stop_after is not None and self.step >= stop_after and not end:
                    return {"stopped_at": self.step}
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": round(self.elapsed, 2), **self.last_eval}


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except json.JSONDecodeError:
        return 1 << 62  # a torn last line: drop it
