"""Serving throughput of `openk2 serve` on loopback: requests/s, generated tokens/s, time to first token.

    python benchmarks/bench_server.py                       # random-init k2-tiny, 1/4/16 concurrent clients
    python benchmarks/bench_server.py --checkpoint runs/pretrain/final --threads 2

Starts the real server in a subprocess (`python -m openk2.cli serve ... --port 0`),
then drives it with C concurrent streaming clients (httpx, SSE), each sending
--requests-per-client chat requests of --max-tokens tokens (``ignore_eos`` so
every request decodes exactly that many). A benchmark, not a test: numbers
depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the model reads a long prompt about mixture of experts routing and latent attention caches "
         "then answers with a short summary of what it learned from the text").split()


def build_random_checkpoint(preset: str, out: Path) -> Path:
    """A random-init preset plus a BPE trained on the Python standard library (offline, a few seconds)."""
    import json as _json

    import openk2
    from openk2.data.tokenizer import train_bpe
    from openk2.model.config import get_preset

    config = get_preset(preset)
    stdlib = Path(_json.__file__).parents[1]
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:120]]
    tok = train_bpe(texts, vocab_size=config.vocab_size)
    model = openk2.K2ForCausalLM(config)
    model.save_pretrained(out)
    tok.save(out)
    return out


def start_server(checkpoint: Path, threads: int | None, max_batch: int, window_ms: float) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "openk2.cli", "serve", str(checkpoint), "--port", "0", "--model-name", "bench",
           "--max-batch-size", str(max_batch), "--batch-window-ms", str(window_ms)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    banner = proc.stdout.readline()
    if " on http" not in banner:
        proc.kill()
        raise SystemExit(f"server did not start: {banner!r}")
    return proc, banner.split(" on ")[1].split(" ")[0]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if ttft is None and choice["delta"].get("content"):
                    ttft = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


async def run_level(url: str, concurrency: int, per_client: int, max_tokens: int, prompt_words: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker(w: int) -> list[dict]:
            out = []
            for i in range(per_client):
                words = [WORDS[(w * 7 + i * 3 + k) % len(WORDS)] for k in range(prompt_words)]
                out.append(await one_request(client, url, " ".join(words), max_tokens))
            return out

        await one_request(client, url, "warm up", 4)
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p90_s": ttfts[max(0, math.ceil(0.9 * len(ttfts)) - 1)] if ttfts else None,
        "latency_mean_s": statistics.mean(r["latency"] for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: a random-init --preset")
    ap.add_argument("--preset", default="k2-tiny")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else build_random_checkpoint(args.preset, Path(tmp) / args.preset)
        proc, url = start_server(ckpt, args.threads, args.max_batch_size, args.batch_window_ms)
        try:
            rows = [asyncio.run(run_level(url, c, args.requests_per_client, args.max_tokens, args.prompt_words))
                    for c in args.concurrency]
            stats = httpx.get(url.rsplit("/v1", 1)[0] + "/health").json()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"model: {args.checkpoint or args.preset + ' (random init)'}, {args.max_tokens} tokens/request, "
          f"{args.prompt_words}-word prompts, server threads: {args.threads or 'torch default'}, "
          f"max batch {args.max_batch_size}, engine max batch seen {stats.get('max_batch')}")
    print("| clients | requests | requests/s | generated tokens/s | TTFT p50 (s) | TTFT p90 (s) | mean latency (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['ttft_p50_s']:.3f} | {r['ttft_p90_s']:.3f} | {r['latency_mean_s']:.2f} |")
    if args.json:
        from openk2.utils import atomic_write

        atomic_write(args.json, json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
