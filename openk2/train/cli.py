"""`openk2 pretrain`: the main job. With no arguments, trains k2-tiny with MuonClip on the bundled corpus.

Every training setting is a flag generated from `TrainConfig` (openk2/train/config.py).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from openk2.train.config import add_config_flags

    p.add_argument("--config", default=None, help="JSON file of training settings (flags override it)")
    add_config_flags(p)
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints of this run and start over")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after step N as if interrupted (the last checkpoint stays; for testing resumption)")


def build_config(args: argparse.Namespace):
    from openk2.train.config import config_from_args

    cfg = config_from_args(args)
    from openk2.model.config import get_preset

    get_preset(cfg.preset)  # unknown preset -> one-line error now, not after data prep
    return cfg


def main(args: argparse.Namespace) -> int:
    from openk2.train.parallel import init_distributed
    from openk2.train.pretrain import pretrain

    cfg = build_config(args)
    rank, _ = init_distributed()
    summary = pretrain(cfg, resume=not args.restart, log=print if rank == 0 else (lambda *a: None),
                       stop_after=args.stop_after)
    if rank == 0:
        print(json.dumps(summary, indent=2))
    return 0
