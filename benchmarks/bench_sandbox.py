"""Sandbox speed: start-up latency and executions/s of the local backend against bare `subprocess.run`.

    python benchmarks/bench_sandbox.py                 # /bin/true and python -c, concurrency 1/2/8, HumanEval
    python benchmarks/bench_sandbox.py --runs 40 --no-humaneval
    python benchmarks/bench_sandbox.py --backend bwrap

The anchor runs the SAME program with `subprocess.run` (no isolation, no limits) in the same process, in
the same run, at the same concurrency (a thread pool of that size); the table reports sandbox / anchor.
HumanEval: all 164 canonical solutions through the sandbox pool (each in its own sandbox, HumanEval's
check() as the test) against the same programs run as bare `python file.py`. A benchmark, not a test:
numbers depend on the machine and on what else runs on it (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openk2.sandbox import Limits, RunRequest, Sandbox  # noqa: E402

PROGRAMS = {
    "true": ["/bin/true"],
    "python -c": [sys.executable, "-c", "print(sum(range(1000)))"],
}


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def bare_latency(cmd, n) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bare_throughput(cmd, n, conc) -> float:
    with concurrent.futures.ThreadPoolExecutor(conc) as ex:
        t = time.perf_counter()
        list(ex.map(lambda _: subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True),
                    range(n)))
        return n / (time.perf_counter() - t)


async def sb_latency(sb, cmd, n) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        r = await sb.run(RunRequest(cmd))
        assert r.ok, r
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


async def sb_throughput(backend, cmd, n, conc) -> float:
    sb = Sandbox(backend, concurrency=conc, limits=Limits(timeout_s=60))
    t = time.perf_counter()
    res = await sb.map([RunRequest(cmd) for _ in range(n)])
    dt = time.perf_counter() - t
    assert all(r.ok for r in res), [r for r in res if not r.ok][:1]
    return n / dt


def humaneval(backend, conc: int) -> tuple[float, float, int]:
    from openk2.sandbox import humaneval as he

    problems = he.load_problems()
    sb = Sandbox(backend, concurrency=conc)
    t = time.perf_counter()
    reports = asyncio.run(he.evaluate({p["task_id"]: he.canonical_program(p) for p in problems}, problems,
                                      sandbox=sb))
    t_sb = time.perf_counter() - t
    passed = sum(r.all_passed for r in reports.values())
    with tempfile.TemporaryDirectory() as d:
        files = []
        for i, p in enumerate(problems):
            f = Path(d) / f"p{i}.py"
            f.write_text(he.canonical_program(p) + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n")
            files.append(f)
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(conc) as ex:
            rcs = list(ex.map(lambda f: subprocess.run([sys.executable, str(f)], cwd=d, capture_output=True).returncode,
                              files))
        t_bare = time.perf_counter() - t
    assert rcs.count(0) == len(problems)
    return t_sb, t_bare, passed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--runs", type=int, default=40, help="runs per throughput measurement (default 40)")
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--concurrency", default="1,2,8")
    ap.add_argument("--no-humaneval", action="store_true")
    args = ap.parse_args()
    sb = Sandbox(args.backend, concurrency=1, limits=Limits(timeout_s=60))
    backend = sb.backend
    concs = [int(c) for c in args.concurrency.split(",")]
    print(f"backend {backend.name} (isolation {backend.isolation}); {os.cpu_count()} CPUs; {load()}")
    # warm both paths (page cache, the availability probe)
    asyncio.run(sb_latency(sb, PROGRAMS["true"], 3))
    bare_latency(PROGRAMS["true"], 3)
    print("\n| program | measure | sandbox | bare subprocess.run | sandbox / bare |")
    print("|---|---|---|---|---|")
    exec_sb = None
    if getattr(backend, "_zygote", None) is not None:  # the same backend without its fork server
        from openk2.sandbox.local import LocalBackend

        exec_sb = Sandbox(LocalBackend(backend.mode, use_zygote=False), concurrency=1, limits=Limits(timeout_s=60))
    for name, cmd in PROGRAMS.items():
        s = asyncio.run(sb_latency(sb, cmd, args.latency_runs))
        b = bare_latency(cmd, args.latency_runs)
        print(f"| `{name}` | start-up latency (median of {args.latency_runs}) | {s * 1000:.1f} ms | "
              f"{b * 1000:.1f} ms | {s / b:.2f}x |", flush=True)
        if exec_sb is not None:
            e = asyncio.run(sb_latency(exec_sb, cmd, args.latency_runs))
            print(f"| `{name}` | start-up latency, launcher exec'd per run (no zygote) | {e * 1000:.1f} ms | "
                  f"{b * 1000:.1f} ms | {e / b:.2f}x |", flush=True)
        for c in concs:
            s = asyncio.run(sb_throughput(backend, cmd, args.runs, c))
            b = bare_throughput(cmd, args.runs, c)
            print(f"| `{name}` | executions/s at concurrency {c} | {s:.1f} | {b:.1f} | {s / b:.2f}x |", flush=True)
    if not args.no_humaneval:
        for c in (2,):
            t_sb, t_bare, passed = humaneval(backend, c)
            print(f"| HumanEval, 164 canonical solutions ({passed} passed) | wall time at concurrency {c} | "
                  f"{t_sb:.1f} s | {t_bare:.1f} s | {t_sb / t_bare:.2f}x |", flush=True)
    print(f"\n{load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
