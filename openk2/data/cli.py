"""`openk2 tokenizer`: train, inspect and try the tokenizer.

    openk2 tokenizer train [--preset default] [--vocab-size 8192] [--sample-mb 8] [--out runs/data/tokenizer]
    openk2 tokenizer info  [PATH]
    openk2 tokenizer encode [PATH] TEXT
"""

from __future__ import annotations

import argparse
from pathlib import Path

from openk2.data.dataset import DEFAULT_DATA_DIR, TOKENIZER_DIR

DEFAULT_TOKENIZER_DIR = str(Path(DEFAULT_DATA_DIR) / TOKENIZER_DIR)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train the byte-level BPE on the corpus (K2 special tokens at ids 0..13)")
    t.add_argument("--preset", default="default", help="corpus preset (default, small, tiny)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--sample-mb", type=float, default=8.0, help="MB of train text to learn merges from, split by the default mixture")
    t.add_argument("--out", default=DEFAULT_TOKENIZER_DIR, help=f"directory for tokenizer.json (default {DEFAULT_TOKENIZER_DIR})")
    t.add_argument("--seed", type=int, default=None, help="corpus seed (default: the preset's)")

    i = sub.add_parser("info", help="print vocabulary size, special token ids and an example")
    i.add_argument("path", nargs="?", default=DEFAULT_TOKENIZER_DIR, help="tokenizer directory or file (tokenizer.json or tiktoken.model)")

    e = sub.add_parser("encode", help="print the ids and pieces of a text")
    e.add_argument("path", nargs="?", default=DEFAULT_TOKENIZER_DIR)
    e.add_argument("text")


def main(args: argparse.Namespace) -> int:
    from openk2.data.tokenizer import load_tokenizer

    if args.action == "train":
        return _train(args)
    tok = load_tokenizer(args.path)
    if args.action == "info":
        _print_info(tok, args.path)
    else:
        ids = tok.encode(args.text)
        print(f"{len(ids)} tokens: {ids}")
        print("pieces: " + " | ".join(repr(tok.decode([i]))[1:-1] for i in ids))
        print(f"round trip: {'ok' if tok.decode(ids) == args.text else 'DIFFERS'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from openk2.data.corpus import get_preset
    from openk2.data.tokenizer import train_tokenizer

    cfg = get_preset(args.preset)
    if args.seed is not None:
        cfg = cfg.replace(seed=args.seed)
    print(f"collecting corpus (preset {cfg.name}) ...", flush=True)
    tok, stats = train_tokenizer(cfg, args.vocab_size, sample_bytes=int(args.sample_mb * 1e6), show_progress=True)
    tok.save(args.out)
    sample = ", ".join(f"{d} {b / 1e6:.1f}" for d, b in sorted(stats["sample_bytes"].items()))
    print(
        f"trained byte-level BPE: vocab {tok.vocab_size} ({len(tok.special_tokens)} special tokens at ids "
        f"0..{len(tok.special_tokens) - 1}) on {sum(stats['sample_bytes'].values()) / 1e6:.1f} MB "
        f"({sample} MB; {stats['documents']} documents) in {stats['seconds']:.1f} s"
    )
    print(f"saved {Path(args.out) / 'tokenizer.json'}")
    return 0


def _print_info(tok, path) -> None:
    print(f"tokenizer {path}: kind {tok.kind}, vocab {tok.vocab_size}")
    print(f"bos {tok.bos_token}={tok.bos_id}  eos {tok.eos_token}={tok.eos_id}  pad {tok.pad_token}={tok.pad_id}")
    specials = tok.special_tokens
    shown = [f"{i} {t}" for t, i in specials.items() if not t.startswith("<|reserved_token_")]
    print(f"special tokens ({len(specials)}): " + ", ".join(shown))
    example = "def add(x, y):\n    return x + y  # Shakespeare: To be, or not to be"
    ids = tok.encode(example)
    print(f"example: {len(example.encode())} bytes -> {len(ids)} tokens ({len(example.encode()) / len(ids):.2f} bytes/token)")
