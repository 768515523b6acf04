"""Rephrasing throughput: the pipeline at concurrency 1 / 4 / 16 against the same backend called one request at a time.

    python benchmarks/bench_rephrase.py                    # starts `openk2 serve smollm2` on a free port
    python benchmarks/bench_rephrase.py --url http://127.0.0.1:8000 --docs 32 --judge record

The backend is one `openk2 serve smollm2` endpoint (started here unless --url is
given). The anchor sends the pipeline's own rewrite requests (chunk 0 of each
document, the same messages, seeds and max_tokens) one after another with the
project's client; then `openk2.rephrase.Rephraser` rephrases the same documents
(fresh output directory, no reply cache) at each concurrency. Prints output
tokens/s, documents/min and the ratio to the anchor's tokens/s; --out writes JSON.
The documents are the rephrase experiment's fictional biographies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="an OpenAI-compatible endpoint (default: start openk2 serve smollm2)")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--judge", default="off", choices=["off", "record", "require"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server it starts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from openk2.experiments.rephrase import make_people, raw_bio
    from openk2.llm import OpenAICompatClient
    from openk2.rephrase import Rephraser, RephraseConfig, SourceDoc, token_counter

    docs = [SourceDoc(f"person-{i}", raw_bio(p), "text") for i, p in enumerate(make_people(args.docs, 0))]
    count = token_counter("smollm2")
    levels = [int(x) for x in args.concurrency.split(",")]
    server = None
    if args.url is None:
        import os

        from bench_serve_llamacpp import start_openk2

        ns = argparse.Namespace(max_batch_size=max(levels), threads=args.threads, openk2_arg=[], start_timeout=300)
        logdir = Path(tempfile.mkdtemp(prefix="bench-rephrase-"))
        server = start_openk2(ns, dict(os.environ), logdir)
        url = server.url
    else:
        url = args.url
    rows = []
    try:
        cfg = RephraseConfig(rephrasings=1, retries=0, judge=args.judge, concurrency=1)
        # the anchor: the pipeline's requests, one at a time
        client = OpenAICompatClient(url, model="", max_concurrency=1)
        client.model = client.models()[0]
        with tempfile.TemporaryDirectory() as d:
            pipe = Rephraser(client, cfg, d, count_tokens=count, progress=False)
            jobs = pipe._jobs(docs, [])
            reqs = [j.request() for j in jobs]
        client.chat(**reqs[0])  # warm-up (not timed)
        t0 = time.perf_counter()
        out_tok = 0
        for r in reqs:
            out_tok += client.chat(**r).usage.completion_tokens
        anchor_s = time.perf_counter() - t0
        anchor = out_tok / anchor_s
        rows.append({"mode": "one request at a time (anchor)", "concurrency": 1, "seconds": anchor_s,
                     "out_tokens": out_tok, "tok_s": anchor, "docs_min": 60 * len(docs) / anchor_s, "ratio": 1.0})
        for c in levels:
            cl = OpenAICompatClient(url, model=client.model, max_concurrency=c)
            with tempfile.TemporaryDirectory() as d:
                s = Rephraser(cl, RephraseConfig(rephrasings=1, retries=0, judge=args.judge, concurrency=c), d,
                              count_tokens=count, progress=False).run(docs)
            rows.append({"mode": f"pipeline, concurrency {c}", "concurrency": c, "seconds": s.seconds,
                         "out_tokens": s.tokens_out, "tok_s": s.tokens_out / s.seconds,
                         "docs_min": 60 * len(docs) / s.seconds, "ratio": (s.tokens_out / s.seconds) / anchor,
                         "kept": s.kept, "requests": s.requests})
    finally:
        if server is not None:
            server.stop()
    print(f"{len(docs)} documents, 1 rephrasing each, judge {args.judge}, endpoint {url}")
    print("| mode | out tokens | seconds | out tok/s | docs/min | tok/s vs anchor |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['out_tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} | {r['docs_min']:.1f} | "
              f"{r['ratio']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
