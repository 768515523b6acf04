"""Items per minute of `openk2 eval` against a local `openk2 serve` endpoint, at concurrency 1 and 8.

    python benchmarks/bench_eval.py                                  # SmolLM2, math + ifeval, 8 items each
    python benchmarks/bench_eval.py --suites humaneval,bfcl --limit 2 --checkpoint runs/sft/final

Starts the real server in a subprocess (`python -m openk2.cli serve CKPT --port 0`), then runs each suite
twice with no reply cache and fresh result directories (so every item is a model call): once at concurrency
1 and once at --concurrency. Prints items/min for both and their ratio. A benchmark, not a test: numbers
depend on the machine and what else runs on it (report `uptime` next to them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_server(checkpoint: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "openk2.cli", "serve", checkpoint, "--port", "0", "--max-batch-size", str(max_batch)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    banner = proc.stdout.readline()
    if " on http" not in banner:
        proc.kill()
        raise SystemExit(f"server did not start: {banner!r}")
    return proc, banner.split(" on ")[1].split(" ")[0].removesuffix("/v1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="smollm2")
    ap.add_argument("--suites", default="math,ifeval")
    ap.add_argument("--limit", type=int, default=4, help="items per category")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()

    from openk2.eval import get_suite
    from openk2.eval.cli import make_model_client, suite_names
    from openk2.eval.core import run_suite

    proc, url = start_server(args.checkpoint, max(8, args.concurrency))
    rows = []
    try:
        for name in suite_names(args.suites):
            rates = {}
            for c in (1, args.concurrency):
                suite = get_suite(name)
                client = make_model_client(url, concurrency=c, cache_dir=None)
                with tempfile.TemporaryDirectory() as out:
                    t0 = time.perf_counter()
                    r = run_suite(suite, client, out, model=client.model, limit=args.limit, concurrency=c,
                                  progress=False)
                    dt = time.perf_counter() - t0
                rates[c] = len(r.records) / dt * 60
                print(f"{name} concurrency {c}: {len(r.records)} items in {dt:.1f}s = {rates[c]:.1f} items/min "
                      f"({r.errors} errors)", flush=True)
            rows.append((name, rates[1], rates[args.concurrency]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\n| suite | items/min c=1 | items/min c={args.concurrency} | ratio |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    print(f"\nload: {os.getloadavg()[0]:.2f} (1-min average)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
