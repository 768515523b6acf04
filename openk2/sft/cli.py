"""`openk2 sft --base MODEL`: supervised fine-tuning (K2 report §3.1) on the shared trainer.

Every setting is a flag generated from `SFTConfig` (openk2/sft/config.py, which extends the
pre-training `TrainConfig`). See docs/sft.md.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from openk2.sft.config import SFTConfig
    from openk2.train.config import add_config_flags

    p.add_argument("--config", default=None, help="JSON file of SFT settings (flags override it)")
    add_config_flags(p, SFTConfig)
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints of this run and start over")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after step N as if interrupted (the last checkpoint stays; for testing resumption)")


def main(args: argparse.Namespace) -> int:
    from openk2.sft.config import SFTConfig
    from openk2.sft.train import sft
    from openk2.train.config import config_from_args
    from openk2.train.parallel import init_distributed

    cfg = config_from_args(args, SFTConfig)
    rank, _ = init_distributed()
    summary = sft(cfg, resume=not args.restart, log=print if rank == 0 else (lambda *a: None),
                  stop_after=args.stop_after)
    if rank == 0:
        print(json.dumps(summary, indent=2))
    return 0
