"""openk2 synth's trajectory throughput at 1 / 4 / 16 concurrent requests against one `openk2 serve` endpoint.

    python benchmarks/bench_synth.py                        # starts `openk2 serve smollm2` on a free port
    python benchmarks/bench_synth.py --endpoint http://127.0.0.1:8000 --tasks 32

The tool repository (the real filesystem and memory MCP servers plus synthetic tools evolved by the
endpoint), the agents and the tasks are made once, untimed. Then, for each concurrency, the same tasks go
through `rollout`, `judge` and `export` in a fresh folder with no reply cache, timed end to end. Reported:
trajectories and kept trajectories per hour, LLM requests per kept trajectory (and per trajectory), and
each throughput as a ratio to concurrency 1 (the ratios are what carries over between machines). With the
135M local model few trajectories pass the judge, so trajectories/hour is reported beside kept/hour.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    """`openk2 serve smollm2 --port 0`, its output to `log` (a pipe nobody reads would stall it)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    f = open(log, "w")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.Popen([sys.executable, "-m", "openk2.cli", "serve", "smollm2", "--port", "0"], stdout=f,
                            stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text(errors="replace"))
        if m:
            url = m.group(1)
            break
        if proc.poll() is not None:
            raise RuntimeError(f"openk2 serve exited: {log.read_text()[-500:]}")
        time.sleep(1)
    else:
        raise RuntimeError("openk2 serve did not start")
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5)
            return proc, url
        except OSError:
            time.sleep(1)
    raise RuntimeError("openk2 serve does not answer")


def pipeline(out: Path, url: str, concurrency: int, args: argparse.Namespace):
    from openk2.llm import make_client
    from openk2.synth.pipeline import Clients, Pipeline, SynthConfig

    cfg = SynthConfig(out=out, servers=("filesystem", "memory"), categories=args.categories, domains_per_category=2,
                      tools_per_domain=3, agents=args.tasks, tasks_per_agent=1, exec_fraction=0.34, max_turns=args.max_turns,
                      max_steps=args.max_steps, max_tokens=args.max_tokens, concurrency=concurrency, progress=False)
    # a long timeout: 16 concurrent replies on a shared 2-core CPU take minutes; a cache only for the untimed setup
    client = make_client(url, max_concurrency=concurrency, timeout=1800,
                         cache_dir=out / "llm_cache" if out.name == "base" else None)
    return Pipeline(cfg, Clients.same(client)), client


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoint", default=None, help="an OpenAI-compatible endpoint (default: start openk2 serve smollm2)")
    ap.add_argument("--tasks", type=int, default=16, help="trajectories per concurrency level (one task per agent)")
    ap.add_argument("--categories", type=int, default=2)
    ap.add_argument("--max-turns", type=int, default=3, help="user turns (>= 2: the user ends the dialogue in its own turn)")
    ap.add_argument("--max-steps", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    proc = None
    url = args.endpoint
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-synth-"))
    root.mkdir(parents=True, exist_ok=True)
    if url is None:
        t0 = time.time()
        proc, url = start_server(root / "serve.log")
        print(f"openk2 serve smollm2 at {url} (up in {time.time() - t0:.0f} s)", flush=True)
    try:
        base = root / "base"
        pipe, _ = pipeline(base, url, max(levels), args)
        t0 = time.time()
        pipe.run(["harvest", "evolve", "agents", "tasks"], say=lambda s: print("  setup " + s, flush=True))
        print(f"setup (untimed): {time.time() - t0:.0f} s", flush=True)
        rows = []
        for c in levels:
            out = root / f"c{c}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for f in ("mcp_tools.json", "mcp_servers.json", "tools.json", "agents.jsonl", "tasks.jsonl"):
                shutil.copy(base / f, out / f)
            pipe, client = pipeline(out, url, c, args)
            t0 = time.time()
            pipe.run(["rollout", "judge", "export"], say=lambda s: None)
            wall = time.time() - t0
            card = json.loads((out / "card.json").read_text())
            trajs = card["stages"].get("rollout", {}).get("items", 0)
            kept = card["kept"]
            reqs = client.totals.requests + client.totals.failures
            rows.append({"c": c, "wall": wall, "trajs": trajs, "kept": kept, "reqs": reqs})
            print(f"  concurrency {c}: {trajs} trajectories, {kept} kept, {reqs} LLM requests in {wall:.0f} s", flush=True)
        b = rows[0]
        load = os.getloadavg()[0]
        print(f"\nload average {load:.1f} on {os.cpu_count()} cores; {args.tasks} tasks, max {args.max_turns} user turns, "
              f"{args.max_steps} agent steps, {args.max_tokens} tokens per agent reply")
        print("| concurrency | wall s | trajectories/h | x c=1 | kept/h | x c=1 | LLM requests per trajectory | per kept |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            tph = r["trajs"] / r["wall"] * 3600
            kph = r["kept"] / r["wall"] * 3600
            tph1 = b["trajs"] / b["wall"] * 3600
            kph1 = b["kept"] / b["wall"] * 3600
            print(f"| {r['c']} | {r['wall']:.0f} | {tph:.0f} | {tph / tph1:.2f}x | {kph:.0f} | "
                  f"{(kph / kph1) if kph1 else float('nan'):.2f}x | {r['reqs'] / max(1, r['trajs']):.1f} | "
                  f"{(r['reqs'] / r['kept']) if r['kept'] else float('nan'):.1f} |")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
