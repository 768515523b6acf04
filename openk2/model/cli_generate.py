"""`openk2 generate CHECKPOINT --prompt TEXT`: sample from a checkpoint (uses the MLA latent cache)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="HF-format checkpoint directory (with tokenizer.json for text prompts)")
    p.add_argument("--prompt", default="", help="text prompt (needs a tokenizer in the checkpoint)")
    p.add_argument("--ids", default=None, help="comma-separated token ids instead of a text prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)


def main(args: argparse.Namespace) -> int:
    import torch

    import openk2
    from openk2.cli import CLIError

    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = openk2.from_pretrained(args.checkpoint, dtype=dtype)
    tok = None
    if (Path(args.checkpoint) / "tokenizer.json").exists():
        from openk2.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.checkpoint)
    if args.ids is not None:
        try:
            ids = [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError:
            raise CLIError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    elif tok is not None:
        ids = tok.encode(args.prompt)
        if not ids:
            ids = [tok.bos_id]
    else:
        raise CLIError(f"{args.checkpoint}: no tokenizer.json; pass --ids instead of --prompt")
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise CLIError(f"token id {bad[0]} is outside the vocabulary (size {model.config.vocab_size})")
    g = torch.Generator().manual_seed(args.seed)
    x = torch.tensor([ids] * args.num_samples)
    eos = model.config.eos_token_id
    out = model.generate(x, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         eos_token_id=eos, generator=g)
    for i in range(args.num_samples):
        new = out[i, len(ids):].tolist()
        if tok is not None:
            print(f"--- sample {i}\n{args.prompt}{tok.decode(new, skip_special_tokens=True)}")
        else:
            print(f"--- sample {i}\n{new}")
    return 0
