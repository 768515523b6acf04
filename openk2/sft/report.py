"""The SFT run's report.md: settings, data, packing, held-out loss, tool-call evaluation, sample dialogues."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def write_report(run_dir: Path, cfg: Any, summary: dict, evals: dict) -> Path:
    from openk2.sft.evaluate import format_dialogue
    from openk2.utils import atomic_write

    lines = [f"# SFT run `{run_dir.name}`", "",
             f"Base `{cfg.base}`, chat format `{summary['format']}`, optimizer {cfg.optimizer}"
             + (f" (QK-Clip tau={cfg.qk_clip_tau:g})" if cfg.optimizer == "muonclip" and cfg.qk_clip_tau else "")
             + f", peak lr {cfg.lr:g}, {summary['steps']} steps x {cfg.batch_size} rows of {cfg.seq_len} positions "
               f"({'packed' if cfg.pack else 'unpacked'}), {summary['tokens']:,} assistant tokens trained on, "
               f"{summary['train_minutes']} min.", "",
             "## Data", "",
             "| source | weight | conversations | train | held out | truncated (train) | dropped (train) |",
             "|---|---|---|---|---|---|---|"]
    for name, c in summary["data"].items():
        enc = summary["encoding"][name]["train"]
        lines.append(f"| {name} | {cfg.sources[name]:g} | {c['conversations']} | {c['train']} | {c['val']} | "
                     f"{enc['truncated']} | {enc['dropped']} |")
    p = summary["packing"]
    lines += ["", "Truncation cuts only after a whole assistant turn (a tool call is never cut); a conversation whose "
              "first assistant turn does not fit is dropped.", "",
              "## Packing (same sample stream)", "", "| layout | positions | real tokens | loss tokens | padding | "
              "loss fraction | positions per loss token |", "|---|---|---|---|---|---|---|"]
    for k in ("packed", "unpacked"):
        r = p[k]
        lines.append(f"| {k} | {r['positions']:,} | {r['real_tokens']:,} | {r['loss_tokens']:,} | "
                     f"{_pct(r['padding_fraction'])} | {_pct(r['loss_fraction'])} | "
                     f"{p['positions_per_loss_token'][k]} |")
    lines += ["", "## Held-out assistant-token loss", "",
              f"base {summary['base_val_loss']:.4f} -> SFT {summary['val_loss']:.4f} nats/token "
              "(curve: plots/loss.png)", ""]
    if "sft" in evals:
        lines += ["## Tool calls on held-out single-call tasks (generated live, greedy, tool_choice=auto)", "",
                  "| model | tasks | called | parsed | named a declared tool | parse + validate "
                  "| exact name + arguments |",
                  "|---|---|---|---|---|---|---|"]
        for k in ("base", "sft"):
            if k in evals:
                e = evals[k]
                lines.append(f"| {k} | {e['tasks']} | {_pct(e['called_rate'])} | {_pct(e['parsed_rate'])} | "
                             f"{_pct(e['named_rate'])} | {_pct(e['valid_rate'])} | {_pct(e['exact_rate'])} |")
        lines += ["", "## Sample dialogues (SFT model)", ""]
        lines += [format_dialogue(s) for s in evals["sft"]["samples"]]
        if "base" in evals and evals["base"]["samples"]:
            lines += ["## Sample dialogues (base model)", ""]
            lines += [format_dialogue(s) for s in evals["base"]["samples"][:2]]
    if summary.get("plots"):
        lines += ["", "![loss](plots/loss.png)", ""]
    path = run_dir / "report.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path
