"""`openk2 rephrase INPUT... --out DIR`: rewrite documents in diverse styles, chunk by chunk, with fidelity checks."""

from __future__ import annotations

import argparse
import json
import os
import sys

from openk2.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="JSONL ({'text', 'id'?} per line) / text files, directories, or "
                   "corpus:PRESET/DOMAIN (e.g. corpus:tiny/math)")
    p.add_argument("--out", default="runs/rephrase/out", help="output directory (rephrased.jsonl, dropped.jsonl, "
                   "summary.json, journal.jsonl; default runs/rephrase/out)")
    p.add_argument("--llm", default="smollm2", help="smollm2 (in-process, offline), an openk2 checkpoint, or an "
                   "OpenAI-compatible endpoint http://HOST:PORT (vLLM, SGLang, openk2 serve)")
    p.add_argument("--model", default=None, help="model name at the endpoint (default: its first)")
    p.add_argument("--tokenizer", default=None, help="tokenizer that counts chunk tokens (default: the local "
                   "model's own; for an endpoint, SmolLM2's; or a tokenizer.json / directory)")
    p.add_argument("--mode", default="auto", choices=["auto", "knowledge", "math"])
    p.add_argument("--rephrasings", type=int, default=2, help="rewrites per document, at most (default 2)")
    p.add_argument("--styles", default=None, help="comma-separated style names (default: all; see --list-styles)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="token budget of one chunk (default 256)")
    p.add_argument("--tail-tokens", type=int, default=96, help="tokens of the rewrite so far shown with a chunk")
    p.add_argument("--retries", type=int, default=2, help="further tries of a chunk that fails a check (default 2)")
    p.add_argument("--judge", default="require", choices=["require", "record", "off"],
                   help="LLM fidelity judge: unfaithful fails the chunk / verdict only recorded / no judge")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per wave (default 8)")
    p.add_argument("--limit", type=int, default=None, help="at most this many input documents")
    p.add_argument("--domain-name", default=None, help="corpus domain of the output (default text-rephrased, or "
                   "math-rephrased with --mode math)")
    p.add_argument("--no-cache", action="store_true", help="no on-disk LLM reply cache (OUT/llm-cache)")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="run on Ray: 'local' or a cluster address "
                   "(ray://HEAD:10001 or auto); needs pip install ray")
    p.add_argument("--shards", type=int, default=None, help="with --ray: shards (default: the cluster's CPUs)")
    p.add_argument("--list-styles", action="store_true", help="print the style library and exit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_from_args(args: argparse.Namespace):
    from openk2.rephrase.pipeline import RephraseConfig

    styles = tuple(x.strip() for x in args.styles.split(",") if x.strip()) if args.styles else None
    cfg = RephraseConfig(mode=args.mode, rephrasings=args.rephrasings, styles=styles, chunk_tokens=args.chunk_tokens,
                         tail_tokens=args.tail_tokens, retries=args.retries, judge=args.judge,
                         temperature=args.temperature, seed=args.seed, concurrency=args.concurrency)
    cfg.validate()
    return cfg


def main(args: argparse.Namespace) -> int:
    from openk2.rephrase.styles import STYLES

    if args.list_styles:
        for s in STYLES.values():
            print(f"{s.name:24s} {s.kind:9s} {s.instruction}")
        return 0
    if not args.inputs:
        raise ConfigError("give at least one input (a JSONL / text file, a directory, or corpus:PRESET/DOMAIN)")
    cfg = config_from_args(args)
    from openk2.rephrase.inputs import read_inputs

    docs, failures = read_inputs(args.inputs, limit=args.limit)
    domain = args.domain_name or ("math-rephrased" if args.mode == "math" else "text-rephrased")
    from openk2.data.corpus import is_domain_name

    if not is_domain_name(domain):
        raise ConfigError(f"--domain-name {domain!r}: name it BASE-NAME with BASE one of text, code, math")
    cache = None if args.no_cache else os.path.join(args.out, "llm-cache")
    progress = not args.no_progress and sys.stderr.isatty()
    if args.ray:
        from openk2.rephrase.ray_stage import run_on_ray

        summary = run_on_ray(docs, failures, cfg, args.out, llm=args.llm, model=args.model, tokenizer=args.tokenizer,
                             address=args.ray, shards=args.shards, domain=domain, cache=cache is not None)
    else:
        from openk2.llm import make_client
        from openk2.rephrase.pipeline import Rephraser

        kw = {"max_concurrency": cfg.concurrency} if args.llm.startswith(("http://", "https://")) else \
            {"max_batch_size": max(1, cfg.concurrency)}
        client = make_client(args.llm, model=args.model, cache_dir=cache, **kw)
        count = args.tokenizer or (None if not args.llm.startswith(("http://", "https://")) else "smollm2")
        pipe = Rephraser(client, cfg, args.out, count_tokens=count, domain=domain, progress=progress)
        summary = pipe.run(docs, failures)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print("\n".join(summary.lines()))
    return 0
