"""`openk2 corpus`: build and describe the multi-domain pre-training corpus.

    openk2 corpus build  [--out runs/data] [--preset default] [--tokenizer DIR] [--force]
    openk2 corpus info   [--out runs/data]
    openk2 corpus sample [--out runs/data] [--split val] [--seq-len 128] [--n 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from openk2.data.dataset import DEFAULT_DATA_DIR, TOKENIZER_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="tokenise the corpus into memory-mapped shards (skips work that is up to date)")
    b.add_argument("--out", default=DEFAULT_DATA_DIR, help=f"data directory (default {DEFAULT_DATA_DIR})")
    b.add_argument("--preset", default="default", help="corpus preset (default, small, tiny)")
    b.add_argument("--tokenizer", default=None, help=f"tokenizer to use (default: OUT/{TOKENIZER_DIR}, trained there if missing)")
    b.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a tokenizer trained here")
    b.add_argument("--seed", type=int, default=None, help="corpus seed: held-out split order and math problems")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("info", help="documents, bytes and tokens per domain and split; mixture; unigram baseline")
    i.add_argument("--out", default=DEFAULT_DATA_DIR)

    s = sub.add_parser("sample", help="decode a few packed training windows")
    s.add_argument("--out", default=DEFAULT_DATA_DIR)
    s.add_argument("--split", default="train", choices=["train", "val"])
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--n", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    return {"build": _build, "info": _info, "sample": _sample}[args.action](args)


def _build(args: argparse.Namespace) -> int:
    from openk2.data.corpus import get_preset
    from openk2.data.dataset import build_dataset, corpus_fingerprint, load_index
    from openk2.data.tokenizer import load_tokenizer, train_tokenizer

    cfg = get_preset(args.preset)
    if args.seed is not None:
        cfg = cfg.replace(seed=args.seed)
    out = Path(args.out)
    tok_dir = Path(args.tokenizer) if args.tokenizer else out / TOKENIZER_DIR
    if args.tokenizer or (tok_dir / "tokenizer.json").is_file() or (tok_dir / "tiktoken.model").is_file():
        tok = load_tokenizer(tok_dir)
        print(f"tokenizer: {tok_dir} (vocab {tok.vocab_size})")
    else:
        print(f"training tokenizer (vocab {args.vocab_size}) ...", flush=True)
        tok, stats = train_tokenizer(cfg, args.vocab_size)
        tok.save(tok_dir)
        print(f"tokenizer: trained on {sum(stats['sample_bytes'].values()) / 1e6:.1f} MB in {stats['seconds']:.1f} s, saved {tok_dir}")

    up_to_date = False
    if not args.force and (out / "index.json").exists():
        try:
            up_to_date = load_index(out).fingerprint == corpus_fingerprint(cfg, tok)
        except Exception:
            up_to_date = False
    t0 = time.perf_counter()
    index = build_dataset(out, tok, cfg, progress=not args.no_progress, force=args.force)
    if up_to_date:
        print(f"corpus {out} is up to date (fingerprint {index.fingerprint[:12]})")
    else:
        print(f"built corpus {out} in {time.perf_counter() - t0:.1f} s")
    _print_table(index)
    return 0


def _info(args: argparse.Namespace) -> int:
    from openk2.data.dataset import load_index, unigram_baseline, unigram_baseline_by_domain
    from openk2.data.corpus import DEFAULT_MIXTURE

    index = load_index(args.out)
    _print_table(index)
    mix = "  ".join(f"{d} {w:.2f}" for d, w in DEFAULT_MIXTURE.items())
    print(f"default mixture: {mix}")
    per = unigram_baseline_by_domain(args.out, "val")
    per_s = "  ".join(f"{d} {v:.3f}" for d, v in sorted(per.items()))
    present = {d: w for d, w in DEFAULT_MIXTURE.items() if d in per}
    mixed = unigram_baseline(args.out, "val", mixture=present)
    print(f"unigram baseline (val, nats/token): {per_s}  mixture {mixed:.3f}")
    return 0


def _print_table(index) -> None:
    meta = index.meta
    cfg = meta.get("corpus_config", {})
    print(
        f"corpus {index.data_dir}: preset {cfg.get('name', '?')}, tokenizer vocab {index.vocab_size} "
        f"({meta['dtype']}), python {meta.get('python', '?')} stdlib, built in {meta.get('build_seconds', 0):.1f} s"
    )
    header = f"{'domain':<7}{'split':<7}{'docs':>8}{'MB':>9}{'tokens':>12}{'bytes/tok':>11}"
    print(header)
    print("-" * len(header))
    tot = [0, 0, 0]
    for s in sorted(index.shards, key=lambda s: (s.domain, s.split != "train")):
        bpt = s.num_bytes / max(s.num_tokens, 1)
        print(f"{s.domain:<7}{s.split:<7}{s.num_docs:>8,}{s.num_bytes / 1e6:>9.2f}{s.num_tokens:>12,}{bpt:>11.2f}")
        tot[0] += s.num_docs
        tot[1] += s.num_bytes
        tot[2] += s.num_tokens
    print("-" * len(header))
    print(f"{'total':<14}{tot[0]:>8,}{tot[1] / 1e6:>9.2f}{tot[2]:>12,}{tot[1] / max(tot[2], 1):>11.2f}")
    by_source: dict[tuple[str, str], list[int]] = {}
    for s in index.shards:
        for k, name in enumerate(s.sources):
            mask = s.doc_source == k
            row = by_source.setdefault((s.domain, name), [0, 0])
            row[0] += int(mask.sum())
            row[1] += int(s.doc_length[mask].sum() + mask.sum())
    print("sources (train + val):")
    for (d, n), (docs, toks) in sorted(by_source.items()):
        print(f"  {d:<6}{n:<40}{docs:>8,} docs{toks:>12,} tokens")


def _sample(args: argparse.Namespace) -> int:
    from openk2.data.packing import PackedDataset

    index_ds = PackedDataset(args.out, split=args.split, seq_len=args.seq_len, seed=args.seed)
    tok = index_ds.index.tokenizer()
    batch, domains = next(index_ds.batches(args.n, with_domains=True))
    for row, domain in zip(batch.tolist(), domains):
        print(f"--- {args.split} window, domain {domain}, {len(row)} tokens ---")
        print(tok.decode(row))
    return 0
