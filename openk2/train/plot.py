"""`openk2 plot RUN_DIR`: loss, max-logit, expert-load and lr curves from metrics.jsonl to PNG."""

from __future__ import annotations

import json
from pathlib import Path

from openk2.errors import DataError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise DataError(f"{path}: no metrics file (is this a run directory?)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(path.read_text().splitlines()):
                break  # a run killed mid-write leaves a partial last line
            raise DataError(f"{path}: line {n} is not valid JSON") from None
    return rows


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir or Path(run_dir) / "plots")
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r and "tokens" in r and r.get("val_loss") is not None]
    written = []

    def save(fig, name):
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        base = next((r["unigram_baseline"] for r in rows if r.get("unigram_baseline")), None)
        if base:
            ax.axhline(base, color="gray", ls="--", label=f"unigram baseline ({base:.2f})")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"loss: {Path(run_dir).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss.png")

    ml = [r for r in train if r.get("max_logit_per_layer")]
    if ml:
        fig, ax = plt.subplots(figsize=(7, 4))
        L = len(ml[0]["max_logit_per_layer"])
        for i in range(L):
            ax.plot([r["step"] for r in ml], [r["max_logit_per_layer"][i] for r in ml], lw=1, label=f"layer {i}")
        tau = ml[-1].get("qk_clip_tau")
        if tau:
            ax.axhline(tau, color="red", ls="--", label=f"tau = {tau:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("max attention logit S_max")
        ax.set_title("max logit per layer")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "max_logit.png")

    ld = [r for r in train if "expert_load_max_over_mean" in r]
    if ld:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in ld], [r["expert_load_max_over_mean"] for r in ld], label="max / mean")
        ax.plot([r["step"] for r in ld], [r["expert_load_min_over_mean"] for r in ld], label="min / mean")
        ax.axhline(1.0, color="gray", ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens per expert / mean")
        ax.set_title("expert load balance (aux-loss-free bias)")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "expert_load.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("WSD schedule")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")
    return written
