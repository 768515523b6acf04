"""`openk2 plot RUN_DIR`."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl (e.g. runs/k2-tiny)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")


def main(args: argparse.Namespace) -> int:
    from openk2.train.plot import plot_run

    for p in plot_run(args.run_dir, args.out):
        print(p)
    return 0
