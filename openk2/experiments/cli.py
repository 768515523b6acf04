"""`openk2 experiment NAME`: one of the report's training claims in miniature, with a report under RUNS/experiments/NAME."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from openk2.experiments import EXPERIMENTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=[*EXPERIMENTS, "all"], help="which experiment ('all': each in turn)")
    p.add_argument("--quick", action="store_true", help="seconds-long settings on the tiny corpus (a plumbing check)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of a full-budget run")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--preset", default=None, help="model preset (default k2-nano)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (muon-vs-adamw sweeps its own)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any experiment setting, VALUE as JSON (e.g. --set tau=20 --set 'experts=[16,32]')")
    p.add_argument("--runs-dir", default="runs", help="outputs go to RUNS_DIR/experiments/NAME (default ./runs)")
    p.add_argument("--data-dir", default=None, help="prepared corpus (default RUNS_DIR/_data/CORPUS-vVOCAB)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; 1 is faster on a machine shared with other jobs)")


def settings_from_args(name: str, args: argparse.Namespace):
    from openk2.errors import ConfigError
    from openk2.experiments import load

    mod = load(name)
    s = mod.quick_settings() if args.quick else mod.default_settings()
    changes: dict = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            changes[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            changes[key.strip().replace("-", "_")] = value  # a bare string
    flags = {"steps": args.steps, "preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
             "lr": args.lr, "data_dir": args.data_dir}
    changes.update({k: v for k, v in flags.items() if v is not None})
    if args.seeds is not None:
        try:
            changes["seeds"] = tuple(int(x) for x in args.seeds.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        if not changes["seeds"]:
            raise ConfigError("--seeds: give at least one seed")
    for k, v in list(changes.items()):
        if isinstance(v, list):
            changes[k] = tuple(v)
    s = s.replace(**changes)
    if args.preset:
        from openk2.model.config import get_preset

        get_preset(args.preset)
    if s.steps < 2:
        raise ConfigError(f"--steps must be >= 2, got {s.steps}")
    return s


def main(args: argparse.Namespace) -> int:
    from openk2.experiments import run_experiment

    from openk2.errors import ConfigError

    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    settings = {n: settings_from_args(n, args) for n in names}  # every user error before any training
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    for n in names:
        argv = sys.argv[1:]
        cmd = "openk2 " + shlex.join(argv) if argv[:1] == ["experiment"] and args.name != "all" else None
        run_experiment(n, settings[n], runs_root=args.runs_dir, command=cmd, quick=args.quick,
                       progress=not args.no_progress and sys.stdout.isatty(), fresh=args.fresh)
    return 0
