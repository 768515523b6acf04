"""`openk2 eval --suite NAME[,NAME...] --model SPEC`: run evaluation suites, print a summary table."""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

from openk2.eval import DEFAULT_SUITES, SUITES, get_suite
from openk2.eval.core import EvalError, plot_results, run_suite, summary_markdown


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="default",
                   help=f"comma-separated suites ({', '.join(SUITES)}) or 'default' (= {','.join(DEFAULT_SUITES)})")
    p.add_argument("--model", default="smollm2",
                   help="an OpenAI-compatible URL (http://host:port), an openk2 checkpoint dir, or 'smollm2'")
    p.add_argument("--served-model", default=None, help="the model name to ask an endpoint for (default: its first)")
    p.add_argument("--api-key", default=None, help="API key for a hosted endpoint (default: $OPENAI_API_KEY)")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each category (default: all)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (an in-process model: batch size)")
    p.add_argument("--samples", type=int, default=1, help="samples per item (pass@k needs k samples; default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (> 0 with --samples > 1)")
    p.add_argument("--out", default="runs/eval", help="results directory (JSONL per item, summaries, cache)")
    p.add_argument("--no-cache", action="store_true", help="do not use the on-disk reply cache (<out>/cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def make_model_client(spec: str, *, concurrency: int, cache_dir: str | None, served_model: str | None = None,
                      api_key: str | None = None):
    """The client for a --model spec: an endpoint URL, an openk2 checkpoint directory, or 'smollm2'."""
    from openk2.llm import make_client

    if spec.startswith(("http://", "https://")):
        return make_client(spec, model=served_model, api_key=api_key, cache_dir=cache_dir, max_concurrency=concurrency)
    if spec != "smollm2" and not os.path.exists(spec):
        raise EvalError(f"--model {spec!r}: not a URL, not 'smollm2' and no such checkpoint directory")
    return make_client(spec, cache_dir=cache_dir, max_batch_size=concurrency)


def suite_names(arg: str) -> list[str]:
    names = list(DEFAULT_SUITES) if arg in ("default", "all") else [s.strip() for s in arg.split(",") if s.strip()]
    bad = [n for n in names if n not in SUITES]
    if bad or not names:
        raise EvalError(f"unknown suite(s) {bad or arg!r}; known: {', '.join(SUITES)}")
    return names


def main(args: argparse.Namespace) -> int:
    names = suite_names(args.suite)
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit must be >= 1, got {args.limit}")
    suites = [get_suite(n, **({"size": max(200, args.limit or 0)} if n in ("math",) else {})) for n in names]
    out = Path(args.out)
    def make():
        return make_model_client(args.model, concurrency=args.concurrency,
                                 cache_dir=None if args.no_cache else str(out / "cache"),
                                 served_model=args.served_model, api_key=args.api_key)

    if args.model.startswith(("http://", "https://")):
        client = make()
        label = client.model  # filed under the model it serves (a restarted server on a new port resumes)
    else:  # an in-process model loads only when some suite has work left
        if args.model != "smollm2" and not os.path.exists(args.model):
            raise EvalError(f"--model {args.model!r}: not a URL, not 'smollm2' and no such checkpoint directory")
        label = args.model
        client = functools.cache(make)
    results = []
    for s in suites:
        r = run_suite(s, client, out, model=label, limit=args.limit, concurrency=args.concurrency,
                      samples=args.samples, temperature=args.temperature, progress=not args.no_progress)
        results.append(r)
        print(f"{s.name}: {len(r.records)} records ({r.resumed} resumed, {r.model_calls} model calls, "
              f"{r.errors} errors) in {r.seconds:.1f}s -> {r.dir}")
    md = summary_markdown(results)
    from openk2.utils import atomic_write

    atomic_write(out / "summary.md", md)
    png = plot_results(results, out / "summary.png")
    print()
    print(md, end="")
    print(f"\nsummary: {out / 'summary.md'}  plot: {png}")
    return 1 if any(r.errors for r in results) else 0
