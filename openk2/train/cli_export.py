"""`openk2 export RUN_DIR_OR_CHECKPOINT OUT_DIR`: a training checkpoint as an HF-format directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run directory (its latest checkpoint) or a checkpoints/step_N directory")
    p.add_argument("out", help="output directory (HF format: config.json, safetensors, tokenizer.json)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype (default: as trained)")


def main(args: argparse.Namespace) -> int:
    import torch

    from openk2.data.tokenizer import load_tokenizer
    from openk2.errors import CheckpointError
    from openk2.model.transformer import K2ForCausalLM
    from openk2.train.checkpoint import latest_checkpoint, load_model_weights, read_trainer_state
    from openk2.train.config import TrainConfig
    from openk2.train.pretrain import model_config

    src = Path(args.source)
    ckpt = src if (src / "trainer.pt").exists() else latest_checkpoint(src)
    if ckpt is None or not ckpt.exists():
        raise CheckpointError(f"{src}: no training checkpoint found (expected {src}/checkpoints/step_N/)")
    cfg = TrainConfig.from_dict(read_trainer_state(ckpt)["train_config"])
    tok = load_tokenizer(cfg.resolved_data_dir() / "tokenizer")
    model = K2ForCausalLM(model_config(cfg, tok), init_weights=False)
    state = load_model_weights(ckpt, model)  # any number of ranks may have written it
    model.reset_buffers()
    out = model.save_pretrained(args.out, dtype=getattr(torch, args.dtype) if args.dtype else None)
    tok.save(out)
    print(f"exported {ckpt} (step {state['step']}) -> {out}")
    return 0
