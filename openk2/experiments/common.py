"""What every experiment shares: its scale, running its training jobs (cached), and writing its report.

An experiment is a set of ordinary `pretrain` runs under
RUNS/experiments/NAME/runs/LABEL, all on one prepared corpus. A run whose
summary.json exists and whose settings match is reused, so an interrupted
experiment picks up where it stopped (a half-finished run resumes from its
last checkpoint). The report is RUNS/experiments/NAME/report.md (tables),
results.json (every number) and PNG plots beside them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.errors import ConfigError


@dataclass
class Scale:
    """Model, data and token budget shared by the runs of one experiment."""

    preset: str = "k2-nano"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    weight_decay: float = 0.1
    corpus: str = "default"
    vocab_size: int = 8192
    data_dir: str | None = None  # default RUNS/_data/CORPUS-vVOCAB (shared with `openk2 pretrain`)
    dtype: str = "auto"  # the trainer's: fp32 on CPUs (measured faster there than bf16 autocast), bf16 on GPUs
    val_every: int = 50
    val_batches: int = 8
    seeds: tuple[int, ...] = (0,)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown experiment setting(s): {', '.join(unknown)}")
        if "seeds" in changes:
            changes["seeds"] = tuple(changes["seeds"])
        return dataclasses.replace(self, **changes)


@dataclass
class Run:
    """One finished training run, as the analysis needs it."""

    label: str
    run_dir: Path
    config: dict
    rows: list[dict]  # one per training step
    val_tokens: list[int]
    val_losses: list[float]
    final_val_loss: float
    unigram_baseline: float | None
    wall_s: float
    cached: bool

    @property
    def tokens(self) -> int:
        return self.rows[-1]["tokens"] if self.rows else 0

    @property
    def stable_end_tokens(self) -> int:
        """Tokens seen when the WSD decay starts (the rule of openk2.train.schedule.wsd_lr)."""
        from openk2.train.pretrain import TrainConfig

        cfg = TrainConfig.from_dict({k: v for k, v in self.config.items() if k != "analysis"})
        decay_steps = max(1, int(round(cfg.max_steps * cfg.decay_fraction)))
        return max(cfg.warmup, cfg.max_steps - decay_steps) * cfg.batch_size * cfg.seq_len

    def val_curve(self, max_tokens: float | None = None) -> tuple[list[int], list[float]]:
        """(tokens, val loss) points, optionally only those at or before `max_tokens`."""
        pts = [(t, v) for t, v in zip(self.val_tokens, self.val_losses) if max_tokens is None or t <= max_tokens]
        return [p[0] for p in pts], [p[1] for p in pts]


def _comparable(cfg: dict) -> dict:
    """A run's settings minus the ones that do not change its result (a run directory may be moved)."""
    return {k: v for k, v in json.loads(json.dumps(cfg)).items() if k not in ("progress", "plots", "runs_dir")}


class Runner:
    """Runs (or reuses) the pretrain jobs of one experiment and prints one line per run."""

    def __init__(self, name: str, scale: Scale, runs_root: str | Path = "runs", log: Callable[[str], None] = print,
                 progress: bool = False, fresh: bool = False):
        self.name = name
        self.scale = scale
        self.out_dir = Path(runs_root) / "experiments" / name
        self.runs_dir = self.out_dir / "runs"
        self.data_dir = Path(scale.data_dir) if scale.data_dir else Path(runs_root) / "_data" / f"{scale.corpus}-v{scale.vocab_size}"
        self.log = log
        self.progress = progress
        self.fresh = fresh
        self.planned = 0
        self.done = 0
        self.run_seconds = 0.0  # training wall time of the runs, as measured when each ran (cached ones too)
        self.started = time.perf_counter()
        self._tokenizer = None

    def prepare(self):
        """Tokenizer and token shards, built once (about 30 s for the default corpus) and shared by every run."""
        if self._tokenizer is None:
            from openk2.train.pretrain import TrainConfig, prepare_data

            cfg = TrainConfig(corpus=self.scale.corpus, vocab_size=self.scale.vocab_size, data_dir=str(self.data_dir))
            if not (self.data_dir / "index.json").exists():
                self.log(f"preparing the '{self.scale.corpus}' corpus in {self.data_dir} (once) ...")
            self._tokenizer, _ = prepare_data(cfg, progress=self.progress)
        return self._tokenizer

    def train_config(self, label: str, **overrides: Any):
        from openk2.train.pretrain import TrainConfig

        s = self.scale
        base = dict(
            preset=s.preset, model_overrides=dict(s.model_overrides), run_name=label, runs_dir=str(self.runs_dir),
            data_dir=str(self.data_dir), corpus=s.corpus, vocab_size=s.vocab_size, seq_len=s.seq_len,
            batch_size=s.batch_size, max_steps=s.steps, lr=s.lr, weight_decay=s.weight_decay, dtype=s.dtype,
            val_every=s.val_every, val_batches=s.val_batches, log_every=1, progress=self.progress, plots=False,
            track_max_logit=False, seed=s.seeds[0] if s.seeds else 0,
            time_budget_min=None,  # experiments compare fixed token budgets
        )
        base.update(overrides)
        base.setdefault("ckpt_every", base["max_steps"])
        base.setdefault("keep_checkpoints", 1)
        cfg = TrainConfig(**base)
        cfg.validate()
        return cfg

    def run(self, label: str, describe: str, keep_checkpoint_files: bool = False, after: Callable[[Run], dict] | None = None,
            **overrides: Any) -> Run:
        """Train (or reuse) one run. `after(run)` may read its checkpoints; its dict is saved as analysis.json."""
        from openk2.train.plot import read_metrics
        from openk2.train.pretrain import pretrain

        self.prepare()
        self.done += 1
        n = f"run {self.done}/{max(self.planned, self.done)}"
        cfg = self.train_config(label, **overrides)
        run_dir = cfg.run_dir
        saved = run_dir / "train_config.json"
        same = saved.exists() and _comparable(json.loads(saved.read_text())) == _comparable(cfg.to_dict())
        cached = not self.fresh and same and (run_dir / "summary.json").exists()
        t0 = time.perf_counter()
        if not cached:
            if run_dir.exists() and (self.fresh or not same):
                shutil.rmtree(run_dir)
            self.log(f"{n}: {describe} ...")
            lines: list[str] = []
            pretrain(cfg, resume=True, log=lines.append)
            (run_dir / "train.log").write_text("".join(x + "\n" for x in lines))
        wall = time.perf_counter() - t0
        rows = read_metrics(run_dir)
        train_rows = [r for r in rows if "loss" in r and not r.get("final")]
        val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None and "tokens" in r]
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("val_loss") is None:
            raise ConfigError(f"{run_dir}: the run finished without a validation loss")
        if not cached:
            (run_dir / "wall_seconds.txt").write_text(f"{wall:.1f}\n")
        elif (run_dir / "wall_seconds.txt").exists():
            wall = float((run_dir / "wall_seconds.txt").read_text())
        run = Run(label=label, run_dir=run_dir, config=cfg.to_dict(), rows=train_rows, val_tokens=[v[0] for v in val],
                  val_losses=[v[1] for v in val], final_val_loss=float(summary["val_loss"]),
                  unigram_baseline=summary.get("unigram_baseline"), wall_s=wall, cached=cached)
        if after is not None:
            path = run_dir / "analysis.json"
            if cached and path.exists():
                extra = json.loads(path.read_text())
            else:
                extra = after(run)
                path.write_text(json.dumps(extra, indent=2) + "\n")
            run.config["analysis"] = extra
        if not keep_checkpoint_files:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        self.run_seconds += wall
        how = "cached" if cached else f"{wall:.0f} s"
        self.log(f"{n}: {describe}: val loss {run.final_val_loss:.4f} after {run.tokens:,} tokens ({how})")
        return run

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


# ------------------------------------------------------------------ report
def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return "" if x is None else str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def write_report(out_dir: Path, title: str, command: str, scale: Scale, body: str, results: dict,
                 run_seconds: float) -> Path:
    """report.md (markdown) and results.json (the same numbers, machine-readable) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = json.dumps(scale.to_dict(), sort_keys=True)
    text = (f"# {title}\n\n"
            f"Command: `{command}`\n\n"
            f"Settings: `{settings}`\n\n"
            f"Training wall time: {run_seconds / 60:.1f} min (sum over the runs, each timed when it ran; "
            f"{_machine()}).\n\n"
            f"{body.strip()}\n")
    path = out_dir / "report.md"
    path.write_text(text)
    results = {"title": title, "command": command, "settings": scale.to_dict(), "run_seconds": round(run_seconds, 1),
               **results}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def _machine() -> str:
    import os

    import torch

    dev = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{dev}, {torch.get_num_threads()} torch threads"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
