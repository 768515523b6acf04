"""`openk2 pretrain`: the main job. With no arguments, trains k2-tiny with MuonClip on the bundled corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="JSON file of training settings (flags below override it)")
    p.add_argument("--preset", default=None, help="model preset (default k2-tiny)")
    p.add_argument("--name", default=None, help="run name: outputs go to RUNS_DIR/NAME (default: the preset)")
    p.add_argument("--runs-dir", default=None, help="where runs live (default ./runs)")
    p.add_argument("--data-dir", default=None, help="token shards + tokenizer (default RUNS_DIR/_data/CORPUS-vVOCAB)")
    p.add_argument("--steps", type=int, default=None, dest="max_steps", help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="global sequences per step")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--optimizer", choices=["muonclip", "adamw"], default=None)
    p.add_argument("--qk-clip-tau", type=float, default=None, help="QK-Clip threshold; 0 disables (plain Muon)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="matmul dtype: bfloat16 autocast or float32 (default auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--recompute", choices=["none", "selective"], default=None)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints of this run and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def build_config(args: argparse.Namespace):
    from openk2.errors import ConfigError
    from openk2.train.pretrain import TrainConfig

    base: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise ConfigError(f"{path}: file not found")
        try:
            base = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(base, dict):
            raise ConfigError(f"{path}: expected a JSON object of training settings")
    flags = {
        "preset": args.preset, "run_name": args.name, "runs_dir": args.runs_dir, "data_dir": args.data_dir,
        "max_steps": args.max_steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "seq_len": args.seq_len, "lr": args.lr, "warmup_steps": args.warmup_steps, "optimizer": args.optimizer,
        "weight_decay": args.weight_decay, "dtype": args.dtype, "recompute": args.recompute,
        "val_every": args.val_every, "ckpt_every": args.ckpt_every, "seed": args.seed,
    }
    base.update({k: v for k, v in flags.items() if v is not None})
    if args.qk_clip_tau is not None:
        base["qk_clip_tau"] = args.qk_clip_tau if args.qk_clip_tau > 0 else None
    if args.no_progress:
        base["progress"] = False
    cfg = TrainConfig.from_dict(base)
    if cfg.preset:
        from openk2.model.config import get_preset

        get_preset(cfg.preset)  # unknown preset -> one-line error now, not after data prep
    cfg.validate()
    return cfg


def main(args: argparse.Namespace) -> int:
    from openk2.train.parallel import init_distributed
    from openk2.train.pretrain import pretrain

    cfg = build_config(args)
    rank, _ = init_distributed()
    summary = pretrain(cfg, resume=not args.restart, log=print if rank == 0 else (lambda *a: None))
    if rank == 0:
        print(json.dumps(summary, indent=2))
    return 0
