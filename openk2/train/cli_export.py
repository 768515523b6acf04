"""`openk2 export RUN_DIR_OR_CHECKPOINT OUT_DIR`: a training checkpoint as an HF-format directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run directory (its latest checkpoint) or a checkpoints/step_N.pt file")
    p.add_argument("out", help="output directory (HF format: config.json, safetensors, tokenizer.json)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype (default: as trained)")


def main(args: argparse.Namespace) -> int:
    import torch

    from openk2.errors import CheckpointError
    from openk2.model.transformer import K2ForCausalLM
    from openk2.train.pretrain import TrainConfig, latest_checkpoint, load_checkpoint, model_config

    src = Path(args.source)
    ckpt = latest_checkpoint(src) if src.is_dir() else src
    if ckpt is None or not ckpt.exists():
        raise CheckpointError(f"{src}: no training checkpoint found (expected {src}/checkpoints/step_*.pt)")
    state = load_checkpoint(ckpt)
    cfg = TrainConfig.from_dict(state["train_config"])
    from openk2.data.tokenizer import load_tokenizer

    tok_dir = cfg.resolved_data_dir() / "tokenizer"
    tok = load_tokenizer(tok_dir)
    model = K2ForCausalLM(model_config(cfg, tok), init_weights=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: model weights do not match the run's config ({str(e).splitlines()[0]})") from None
    model.reset_buffers()
    out = model.save_pretrained(args.out, dtype=getattr(torch, args.dtype) if args.dtype else None)
    tok.save(out)
    print(f"exported {ckpt} (step {state['step']}) -> {out}")
    return 0
