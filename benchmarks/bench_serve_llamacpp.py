"""`openk2 serve smollm2` side by side with llama.cpp's llama-server on the same GGUF (issue 22).

    python benchmarks/bench_serve_llamacpp.py --llama-server /path/to/llama-server --out bench.json
    python benchmarks/bench_serve_llamacpp.py --steady --minutes 10 --plot docs/results/serve-steady-load.png
                                                     # 16 looping clients, tokens/s per minute, openk2 only
    python benchmarks/bench_serve_llamacpp.py --ttft-long                  # a 4,000-token prompt mid-run
    python benchmarks/bench_serve_llamacpp.py --prefix 8                   # n=8 against 8 separate requests

Default mode (``--compare``, implied when no other mode is named):

* the two servers, one after the other (never both running), each driven by the
  official ``openai`` async client at concurrency 1, 4 and 16: the same chat
  prompts, temperature 0, ``max_tokens`` with ``ignore_eos`` so every request
  decodes exactly that many tokens; output tokens/s, TTFT p50/p95 (streaming)
  and the openk2 / llama.cpp ratio per concurrency;
* in a child process: transformers' own ``generate`` on the same GGUF (batch 1
  and 16) and openk2's engine in-process (``generate_batch``, 16 requests), which
  gives ``openk2 serve``'s HTTP overhead at concurrency 16.

llama-server comes from ``--llama-server`` or ``$LLAMA_SERVER``; without one that
side is skipped (with a message). It is never a dependency of openk2.

OpenMP: the measured processes (both servers and the in-process child) run with
the default OpenMP wait policy, or ``--measured-omp-wait-policy``; this driver
itself sets ``OMP_WAIT_POLICY=PASSIVE`` before importing torch. A benchmark, not
a test: on a shared machine compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import queue
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if "--_inproc" not in sys.argv:  # the in-process child keeps the policy it was started with (measured_env)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # this driver (and anything it imports), before torch loads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the model reads a long prompt about mixture of experts routing and latent attention caches then "
         "answers with a short summary of what it learned from the text while the server batches many "
         "requests together").split()


# ----------------------------------------------------------------------------- helpers

def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]


def fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def prompt_text(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3 + k // len(WORDS)) % len(WORDS)] for k in range(words))


def long_prompt_text(approx_tokens: int) -> str:
    # numbers interleaved with words: a fresh prompt (no prefix shared with the short ones), ~1 token per item
    items = []
    for k in range(approx_tokens):
        items.append(WORDS[(k * 11) % len(WORDS)] if k % 3 else str(1000 + (k * 37) % 9000))
    return "Summarise this log: " + " ".join(items)


def gguf_file() -> Path:
    from openk2.serve.backends import SMOLLM2_FILE, smollm2_path

    return smollm2_path() / SMOLLM2_FILE


def git_info(commit: str | None = None) -> dict[str, Any]:
    """The measured tree's commit (``commit`` names it when the tree is an export without .git)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:
            return ""

    dirty = [line for line in git("status", "--porcelain", "--", "openk2").splitlines() if line]
    if commit:
        return {"commit": commit, "subject": "(given by --commit; tree: " + str(ROOT) + ")", "dirty_openk2_files": []}
    return {"commit": git("rev-parse", "HEAD") or None, "subject": git("log", "-1", "--format=%s") or None,
            "dirty_openk2_files": dirty}


def measured_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if args.measured_omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.measured_omp_wait_policy
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- servers

class Server:
    """One measured server subprocess; ``url`` ends in /v1. Use as a context manager."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.cmd, self.env, self.log_path = name, cmd, env, log
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def start_openk2(args: argparse.Namespace, env: dict[str, str], logdir: Path) -> Server:
    cmd = [sys.executable, "-m", "openk2.cli", "serve", "smollm2", "--port", "0", "--host", "127.0.0.1",
           "--model-name", "bench", "--max-batch-size", str(args.max_batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += args.openk2_arg
    srv = Server("openk2", cmd, env, logdir / "openk2-serve.log")
    log = open(srv.log_path, "w")
    srv.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue = queue.Queue()

    def reader() -> None:
        for line in srv.proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
            log.write(line)
            log.flush()
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        m = re.search(r" on (http://\S+/v1)", line)
        if m:
            srv.url = m.group(1)
            return srv
    srv.stop()
    raise RuntimeError(f"openk2 serve did not start:\n{srv.tail()}")


def llama_help(binary: str) -> str:
    try:
        r = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
        return r.stdout + r.stderr
    except Exception:
        return ""


def llama_version(binary: str) -> str | None:
    try:
        r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
        out = (r.stdout + r.stderr).strip().splitlines()
        return next((line for line in out if "version" in line), out[-1] if out else None)
    except Exception:
        return None


def start_llama(args: argparse.Namespace, env: dict[str, str], logdir: Path) -> Server:
    port = free_port()
    helptext = llama_help(args.llama_server)
    cmd = [args.llama_server, "-m", str(gguf_file()), "-np", str(args.llama_slots), "-t", str(args.threads or 2),
           "-c", str(args.llama_ctx), "--host", "127.0.0.1", "--port", str(port)]
    if "--threads-batch" in helptext:
        cmd += ["-tb", str(args.threads or 2)]
    if "--kv-unified" in helptext:  # one KV pool shared by the slots, so a 4,000-token prompt fits one slot
        cmd += ["--kv-unified"]
    if "--no-webui" in helptext:
        cmd += ["--no-webui"]
    cmd += args.llama_arg
    srv = Server("llama.cpp", cmd, env, logdir / "llama-server.log")
    srv.proc = subprocess.Popen(cmd, env=env, stdout=open(srv.log_path, "w"), stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            break
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                srv.url = f"http://127.0.0.1:{port}/v1"
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    srv.stop()
    raise RuntimeError(f"llama-server did not start:\n{srv.tail()}")


# ----------------------------------------------------------------------------- client

def make_client(url: str):
    import httpx
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=1800,
                       http_client=httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=200,
                                                                                         max_keepalive_connections=200)))


async def stream_chat(client: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streaming chat request; the time of every content chunk and the usage."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"t_send": t0, "ttft": None, "times": [], "tokens": 0, "prompt_tokens": None,
                           "error": None}
    try:
        stream = await client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                out["tokens"] = chunk.usage.completion_tokens
                out["prompt_tokens"] = chunk.usage.prompt_tokens
            for choice in chunk.choices or []:
                if choice.delta is not None and choice.delta.content:
                    out["times"].append(now)
        if not out["tokens"]:  # no usage chunk: one token per content chunk
            out["tokens"] = len(out["times"])
    except Exception as e:  # recorded, not raised: a failing server is a result too
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    if out["times"]:
        out["ttft"] = out["times"][0] - t0
    out["t_end"] = time.perf_counter()
    return out


async def run_level(url: str, concurrency: int, n_requests: int, max_tokens: int, prompt_words: int) -> dict:
    client = make_client(url)
    try:
        await stream_chat(client, "warm up", 4)
        todo = list(range(n_requests))
        results: list[dict] = []

        async def worker() -> None:
            while todo:
                i = todo.pop(0)
                results.append(await stream_chat(client, prompt_text(i, prompt_words), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft"] for r in ok]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "first_error": next((r["error"] for r in results if r["error"]), None),
            "wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall if wall else None,
            "ttft_p50_s": pct(ttfts, 50), "ttft_p95_s": pct(ttfts, 95),
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in ok if r["prompt_tokens"])
            if any(r["prompt_tokens"] for r in ok) else None,
            "tokens_per_request": sorted({r["tokens"] for r in ok})}


def token_events(results: list[dict]) -> list[tuple[float, float]]:
    """(time, tokens) per content chunk, each request's usage spread over its chunks."""
    ev = []
    for r in results:
        if r["error"] is None and r["times"]:
            w = r["tokens"] / len(r["times"])
            ev += [(t, w) for t in r["times"]]
    return ev


async def run_steady(url: str, args: argparse.Namespace) -> dict:
    client = make_client(url)
    duration = args.steady_minutes * 60
    results: list[dict] = []
    try:
        await stream_chat(client, "warm up", 4)
        t0 = time.perf_counter()
        counter = iter(range(10 ** 9))

        async def worker() -> None:
            while time.perf_counter() - t0 < duration:
                results.append(await stream_chat(client, prompt_text(next(counter), args.prompt_words),
                                                 args.steady_max_tokens))

        await asyncio.gather(*(worker() for _ in range(args.steady_clients)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    w = args.window_s
    n_windows = int(duration // w)
    per = [0.0] * n_windows
    for t, k in token_events(results):
        i = int((t - t0) // w)
        if 0 <= i < n_windows:
            per[i] += k
    rates = [x / w for x in per]
    errors = [r["error"] for r in results if r["error"]]

    def spread(v: list[float]) -> float | None:
        return (max(v) / min(v) - 1) if v and min(v) > 0 else None

    return {"clients": args.steady_clients, "max_tokens": args.steady_max_tokens, "minutes": args.steady_minutes,
            "window_s": w, "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": wall, "window_tokens_per_s": rates,
            "mean_tokens_per_s": statistics.mean(rates) if rates else None,
            "max_over_min_minus_1": spread(rates), "max_over_min_minus_1_without_first": spread(rates[1:]),
            "target": "<= 0.10 over 10 minutes"}


async def run_ttft_long(url: str, args: argparse.Namespace, long_prompt: str) -> dict:
    client = make_client(url)
    results: list[dict] = []
    long_res: dict[str, Any] = {}
    try:
        await stream_chat(client, "warm up", 4)
        stop = asyncio.Event()
        t0 = time.perf_counter()
        counter = iter(range(10 ** 9))

        async def worker() -> None:
            while not stop.is_set():
                results.append(await stream_chat(client, prompt_text(next(counter), args.prompt_words),
                                                 args.max_tokens))

        async def long_one() -> None:
            await asyncio.sleep(args.long_delay_s)
            long_res.update(await stream_chat(client, long_prompt, args.long_max_tokens))
            await asyncio.sleep(args.long_after_s)  # let the short streams run on a while after it
            stop.set()

        await asyncio.gather(long_one(), *(worker() for _ in range(args.ttft_clients)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    ok = [r for r in results if r["error"] is None]
    t_send = long_res.get("t_send")
    t_first = long_res["times"][0] if long_res.get("times") else long_res.get("t_end")
    stall, gaps_outside = 0.0, []
    for r in ok:
        ts = r["times"]
        for a, b in zip(ts, ts[1:]):
            if t_send is not None and b > t_send and a < t_first:  # the gap overlaps the long prefill
                stall = max(stall, b - a)
            else:
                gaps_outside.append(b - a)
    # short requests sent while the long prompt was being prefilled
    during = [r["ttft"] for r in ok if t_send is not None and t_send <= r["t_send"] < t_first]
    return {"clients": args.ttft_clients, "short_max_tokens": args.max_tokens, "requests": len(results),
            "errors": len(results) - len(ok), "first_error": next((r["error"] for r in results if r["error"]), None),
            "wall_s": wall, "ttft_p50_s": pct([r["ttft"] for r in ok], 50),
            "ttft_p95_s": pct([r["ttft"] for r in ok], 95),
            "ttft_p50_sent_during_long_prefill_s": pct(during, 50), "n_sent_during_long_prefill": len(during),
            "long_prompt_tokens": long_res.get("prompt_tokens"), "long_ttft_s": long_res.get("ttft"),
            "long_error": long_res.get("error"),
            "stall_max_gap_s": stall, "gap_p50_outside_s": pct(gaps_outside, 50),
            "gap_max_outside_s": max(gaps_outside) if gaps_outside else None}


async def run_prefix(url: str, args: argparse.Namespace) -> dict:
    from openai import APIStatusError

    k, prompt = args.prefix, prompt_text(0, args.prompt_words)
    client = make_client(url)
    res: dict[str, Any] = {"k": k, "max_tokens": args.max_tokens}
    try:
        await stream_chat(client, "warm up", 4)
        t0 = time.perf_counter()
        try:
            r = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                temperature=0, n=k, extra_body={"ignore_eos": True})
            wall = time.perf_counter() - t0
            toks = r.usage.completion_tokens if r.usage else None
            res["n_request"] = {"status": 200, "wall_s": wall, "choices": len(r.choices), "output_tokens": toks,
                                "tokens_per_s": toks / wall if toks else None}
        except APIStatusError as e:
            res["n_request"] = {"status": e.status_code, "error": str(e)[:300]}
        except Exception as e:
            res["n_request"] = {"status": None, "error": f"{type(e).__name__}: {e}"[:300]}

        async def one() -> Any:
            return await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                temperature=0, extra_body={"ignore_eos": True})

        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one() for _ in range(k)), return_exceptions=True)
        wall = time.perf_counter() - t0
        good = [o for o in outs if not isinstance(o, BaseException)]
        toks = sum(o.usage.completion_tokens for o in good if o.usage)
        res["k_requests"] = {"wall_s": wall, "ok": len(good), "output_tokens": toks,
                             "tokens_per_s": toks / wall if wall else None,
                             "first_error": next((str(o)[:300] for o in outs if isinstance(o, BaseException)), None)}
    finally:
        await client.close()
    return res


def side_runs(args: argparse.Namespace, srv: Server, long_prompt: str | None) -> dict:
    out: dict[str, Any] = {"cmd": srv.cmd, "load_avg_start": load_avg()}
    if args.compare:
        levels = []
        for c in args.concurrency:
            n = max(args.min_requests, c * args.requests_per_client)
            print(f"  [{srv.name}] concurrency {c}: {n} requests x {args.max_tokens} tokens", flush=True)
            levels.append(asyncio.run(run_level(srv.url, c, n, args.max_tokens, args.prompt_words)))
            r = levels[-1]
            print(f"    {fmt(r['tokens_per_s'], '.1f')} tok/s, TTFT p50 {fmt(r['ttft_p50_s'])} s, "
                  f"errors {r['errors']}", flush=True)
        out["levels"] = levels
    if args.steady_minutes and srv.name == "openk2":
        print(f"  [{srv.name}] steady: {args.steady_clients} clients x {args.steady_minutes} min", flush=True)
        out["steady"] = asyncio.run(run_steady(srv.url, args))
    if args.ttft_long and long_prompt is not None:
        print(f"  [{srv.name}] ttft-long", flush=True)
        out["ttft_long"] = asyncio.run(run_ttft_long(srv.url, args, long_prompt))
    if args.prefix:
        print(f"  [{srv.name}] prefix k={args.prefix}", flush=True)
        out["prefix"] = asyncio.run(run_prefix(srv.url, args))
    out["load_avg_end"] = load_avg()
    return out


# ----------------------------------------------------------------------------- in-process (child)

def inproc_main(args: argparse.Namespace) -> None:
    """transformers generate (batch 1, 16) and openk2's engine (16 requests), in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openk2.serve.backends import SMOLLM2_FILE, smollm2_path

    if args.threads:
        torch.set_num_threads(args.threads)
    n, res = args.max_tokens, {"torch_threads": torch.get_num_threads(),
                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    prompts = [prompt_text(i, args.prompt_words) for i in range(16)]
    tok = AutoTokenizer.from_pretrained(str(smollm2_path()), gguf_file=SMOLLM2_FILE)
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in prompts]
    ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    if not args.skip_hf:
        model = AutoModelForCausalLM.from_pretrained(str(smollm2_path()), gguf_file=SMOLLM2_FILE,
                                                     dtype=torch.float32).eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        hf = []
        for b in (1, 16):
            rows = ids[:b]
            T = max(len(r) for r in rows)
            x = torch.full((b, T), pad, dtype=torch.long)
            m = torch.zeros((b, T), dtype=torch.long)
            for i, r in enumerate(rows):
                x[i, T - len(r):] = torch.tensor(r)
                m[i, T - len(r):] = 1
            kw = dict(do_sample=False, pad_token_id=pad)
            with torch.inference_mode():
                model.generate(x, attention_mask=m, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
                t0 = time.perf_counter()
                y = model.generate(x, attention_mask=m, max_new_tokens=n, min_new_tokens=n, **kw)
                wall = time.perf_counter() - t0
            toks = b * (y.shape[1] - T)
            hf.append({"batch": b, "wall_s": wall, "output_tokens": toks, "tokens_per_s": toks / wall})
            print(f"  [transformers generate] batch {b}: {toks / wall:.1f} tok/s", flush=True)
        res["hf_generate"] = hf
        del model
    if not args.skip_engine:
        from openk2.serve.backends import load_chat_model
        from openk2.serve.engine import GenRequest, SamplingParams, generate_batch

        cm = load_chat_model("smollm2")
        try:  # the server's own rendering, so the prompts match the HTTP runs
            eids = [list(cm.prepare_chat([{"role": "user", "content": p}], None, None, None)[0]) for p in prompts]
        except Exception:
            eids = [list(x) for x in ids]
        generate_batch(cm, [GenRequest(eids[i], SamplingParams(max_tokens=4, ignore_eos=True)) for i in range(2)])
        reqs = [GenRequest(eids[i], SamplingParams(max_tokens=n, ignore_eos=True)) for i in range(16)]
        t0 = time.perf_counter()
        generate_batch(cm, reqs)
        wall = time.perf_counter() - t0
        toks = sum(len(r.output_ids) for r in reqs)
        res["engine_inprocess"] = {"requests": 16, "wall_s": wall, "output_tokens": toks, "tokens_per_s": toks / wall,
                                   "errors": [r.error for r in reqs if r.error]}
        print(f"  [openk2 engine in-process] 16 requests: {toks / wall:.1f} tok/s", flush=True)
    Path(args.inproc_out).write_text(json.dumps(res))


def run_inproc(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> dict:
    out = tmp / "inproc.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_inproc", "--inproc-out", str(out),
           "--max-tokens", str(args.max_tokens), "--prompt-words", str(args.prompt_words),
           "--threads", str(args.threads or 0)] + (["--skip-hf"] if args.skip_hf else []) + \
          (["--skip-engine"] if args.skip_engine else [])
    if args.inproc_omp == "passive":
        env = {**env, "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.inproc_timeout)
    if r.returncode != 0 or not out.is_file():
        return {"error": f"in-process child exited {r.returncode}"}
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- report

def report(res: dict) -> None:
    m = res["meta"]
    print(f"\n# openk2 serve vs llama-server, SmolLM2-135M-Instruct ({Path(m['gguf']).name})")
    print(f"commit {m['git']['commit']} ({m['git']['subject']}), uncommitted openk2 files: "
          f"{len(m['git']['dirty_openk2_files'])}; llama.cpp: {m.get('llama_version')}; "
          f"threads {m['threads']}; measured OMP_WAIT_POLICY: {m['measured_omp_wait_policy'] or 'default'}; "
          f"{m['max_tokens']} tokens/request (ignore_eos), temperature 0")
    for side in ("openk2", "llamacpp"):
        if res.get(side + "_skipped"):
            print(f"{side}: SKIPPED ({res[side + '_skipped']})")
    ok2, lc = res.get("openk2") or {}, res.get("llamacpp") or {}
    if "levels" in ok2 or "levels" in lc:
        print("\n| clients | openk2 tok/s | llama.cpp tok/s | openk2/llama.cpp | openk2 TTFT p50 / p95 (s) | "
              "llama.cpp TTFT p50 / p95 (s) | requests | errors (openk2, llama.cpp) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        by = {r["concurrency"]: r for r in lc.get("levels", [])}
        for c in sorted({r["concurrency"] for r in ok2.get("levels", []) + lc.get("levels", [])}):
            a = next((r for r in ok2.get("levels", []) if r["concurrency"] == c), {})
            b = by.get(c, {})
            ratio = (a["tokens_per_s"] / b["tokens_per_s"]) if a.get("tokens_per_s") and b.get("tokens_per_s") else None
            print(f"| {c} | {fmt(a.get('tokens_per_s'), '.1f')} | {fmt(b.get('tokens_per_s'), '.1f')} | "
                  f"{fmt(ratio, '.2f')} | {fmt(a.get('ttft_p50_s'))} / {fmt(a.get('ttft_p95_s'))} | "
                  f"{fmt(b.get('ttft_p50_s'))} / {fmt(b.get('ttft_p95_s'))} | {a.get('requests', b.get('requests'))} | "
                  f"{a.get('errors', '-')}, {b.get('errors', '-')} |")
        for side, d in (("openk2", ok2), ("llama.cpp", lc)):
            for r in d.get("levels", []):
                if r["first_error"]:
                    print(f"  {side} c={r['concurrency']} first error: {r['first_error']}")
            if d.get("levels"):
                print(f"  {side} prompt tokens (mean): {[fmt(r['mean_prompt_tokens'], '.1f') for r in d['levels']]}, "
                      f"tokens/request seen: {sorted({t for r in d['levels'] for t in r['tokens_per_request']})}")
    ip = res.get("inproc")
    if ip:
        print("\n| in one process | tok/s |")
        print("|---|---:|")
        for r in ip.get("hf_generate", []):
            print(f"| transformers generate, batch {r['batch']} | {r['tokens_per_s']:.1f} |")
        e = ip.get("engine_inprocess")
        if e:
            print(f"| openk2 engine generate_batch, 16 requests | {e['tokens_per_s']:.1f} |")
            s16 = next((r for r in ok2.get("levels", []) if r["concurrency"] == 16), None)
            if s16 and s16.get("tokens_per_s"):
                print(f"| openk2 serve, 16 clients (HTTP) | {s16['tokens_per_s']:.1f} |")
                print(f"HTTP overhead at concurrency 16: serve / in-process = "
                      f"{s16['tokens_per_s'] / e['tokens_per_s']:.2f}")
        if ip.get("error"):
            print(f"in-process: {ip['error']}")
        print(f"(in-process child: {ip.get('torch_threads')} torch threads, OMP_WAIT_POLICY {ip.get('omp_wait_policy')})")
    st = ok2.get("steady")
    if st:
        print(f"\n## steady: openk2 serve, {st['clients']} clients x {st['max_tokens']}-token requests, "
              f"{st['minutes']} min, {st['requests']} requests, {st['errors']} errors")
        print("| window | start (s) | tok/s |")
        print("|---:|---:|---:|")
        for i, r in enumerate(st["window_tokens_per_s"]):
            print(f"| {i} | {i * st['window_s']:.0f} | {r:.1f} |")
        print(f"mean {fmt(st['mean_tokens_per_s'], '.1f')} tok/s; max/min-1 = {fmt(st['max_over_min_minus_1'], '.3f')} "
              f"(without the first window {fmt(st['max_over_min_minus_1_without_first'], '.3f')}); target {st['target']}")
        if st["first_error"]:
            print(f"  first error: {st['first_error']}")
    if "ttft_long" in ok2 or "ttft_long" in lc:
        t = ok2.get("ttft_long") or lc.get("ttft_long")
        print(f"\n## ttft-long: {t['clients']} streaming clients ({t['short_max_tokens']}-token requests), "
              f"one ~{t['long_prompt_tokens']}-token prompt arriving mid-run")
        print("| server | short TTFT p50 / p95 (s) | TTFT p50 of shorts sent during the long prefill (n) | "
              "long prompt tokens | long TTFT (s) | stall: max gap during long prefill (s) | "
              "gap p50 / max otherwise (s) | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for side, d in (("openk2", ok2), ("llama.cpp", lc)):
            t = d.get("ttft_long")
            if t:
                print(f"| {side} | {fmt(t['ttft_p50_s'])} / {fmt(t['ttft_p95_s'])} | "
                      f"{fmt(t['ttft_p50_sent_during_long_prefill_s'])} ({t['n_sent_during_long_prefill']}) | "
                      f"{t['long_prompt_tokens']} | {fmt(t['long_ttft_s'])} | {fmt(t['stall_max_gap_s'])} | "
                      f"{fmt(t['gap_p50_outside_s'])} / {fmt(t['gap_max_outside_s'])} | {t['errors']} |")
                for key in ("first_error", "long_error"):
                    if t.get(key):
                        print(f"  {side} {key}: {t[key]}")
    if "prefix" in ok2 or "prefix" in lc:
        print("\n## prefix (RL-style): one request with n=K against K requests with the same prompt")
        print("| server | K | n=K: status | n=K wall (s) | n=K tok/s | K requests wall (s) | K requests tok/s |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for side, d in (("openk2", ok2), ("llama.cpp", lc)):
            p = d.get("prefix")
            if p:
                a, b = p["n_request"], p["k_requests"]
                print(f"| {side} | {p['k']} | {a.get('status')}{' (' + a['error'][:80] + ')' if a.get('error') else ''} | "
                      f"{fmt(a.get('wall_s'), '.2f')} | {fmt(a.get('tokens_per_s'), '.1f')} | {fmt(b['wall_s'], '.2f')} | "
                      f"{fmt(b['tokens_per_s'], '.1f')} |")


def plot_steady(res: dict, path: Path) -> Path:
    """tokens/s per window of the steady-load run, with the +-10% band around the mean (a PNG)."""
    from openk2.experiments.common import pyplot, save_fig

    st = res["openk2"]["steady"]
    rates, w = st["window_tokens_per_s"], st["window_s"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = [(i + 0.5) * w / 60 for i in range(len(rates))]
    ax.plot(x, rates, marker="o", label="openk2 serve smollm2")
    m = st["mean_tokens_per_s"] or 0
    ax.axhspan(0.9 * m, 1.1 * m, color="tab:green", alpha=0.15, label="mean +-10%")
    ax.set_xlabel("minutes")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(0, max(rates + [1]) * 1.25)
    ax.set_title(f"{st['clients']} looping clients x {st['max_tokens']}-token requests, "
                 f"{st['requests']} requests, {st['errors']} errors")
    ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_fig(fig, path)


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                    help="llama.cpp's llama-server binary (default: $LLAMA_SERVER); absent: that side is skipped")
    ap.add_argument("--compare", action="store_true", help="the concurrency sweep + in-process runs "
                    "(the default when no other mode is named)")
    ap.add_argument("--steady-minutes", "--minutes", type=float, default=0,
                    help="openk2 serve under --steady-clients looping clients for this many minutes")
    ap.add_argument("--steady", action="store_true", help="the steady-load run (10 minutes unless --minutes)")
    ap.add_argument("--plot", default=None, help="steady: write tokens/s over time as a PNG here")
    ap.add_argument("--ttft-long", action="store_true", help="TTFT and stall with a 4,000-token prompt mid-run")
    ap.add_argument("--prefix", type=int, default=0, metavar="K", help="n=K in one request vs K requests")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=6, help="at least this many requests per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="threads of each measured process (0: its default)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="openk2 serve --max-batch-size")
    ap.add_argument("--llama-slots", type=int, default=16, help="llama-server -np")
    ap.add_argument("--llama-ctx", type=int, default=16384, help="llama-server -c (shared by the slots)")
    ap.add_argument("--openk2-arg", action="append", default=[], help="extra flag for openk2 serve (repeatable)")
    ap.add_argument("--llama-arg", action="append", default=[], help="extra flag for llama-server (repeatable)")
    ap.add_argument("--measured-omp-wait-policy", default=None,
                    help="OMP_WAIT_POLICY of the measured processes (default: unset, the OpenMP default)")
    ap.add_argument("--inproc-omp", choices=["server", "passive"], default="server",
                    help="OpenMP policy of the in-process child: the servers' (comparable to serve) or PASSIVE")
    ap.add_argument("--skip-openk2", action="store_true")
    ap.add_argument("--skip-inproc", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--steady-clients", type=int, default=16)
    ap.add_argument("--steady-max-tokens", type=int, default=96)
    ap.add_argument("--window-s", type=float, default=60.0, help="steady: tokens/s per window of this many seconds")
    ap.add_argument("--ttft-clients", type=int, default=16)
    ap.add_argument("--long-tokens", type=int, default=4000)
    ap.add_argument("--long-max-tokens", type=int, default=16)
    ap.add_argument("--long-delay-s", type=float, default=15.0, help="send the long prompt this long into the run")
    ap.add_argument("--long-after-s", type=float, default=5.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--inproc-timeout", type=float, default=1800.0)
    ap.add_argument("--commit", default=None, help="record this commit (when measuring an exported tree)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--_inproc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inproc-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._inproc:
        return inproc_main(args)
    if args.steady and not args.steady_minutes:
        args.steady_minutes = 10.0
    if not (args.steady_minutes or args.ttft_long or args.prefix):
        args.compare = True

    env = measured_env(args)
    res: dict[str, Any] = {"meta": {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "git": git_info(args.commit), "gguf": str(gguf_file()),
        "llama_server": args.llama_server, "llama_version": None, "threads": args.threads,
        "max_tokens": args.max_tokens, "measured_omp_wait_policy": args.measured_omp_wait_policy or None,
        "cpus": os.cpu_count(), "load_avg_start": load_avg(), "args": {k: v for k, v in vars(args).items()
                                                                        if not k.startswith("_")}}}
    llama_ok = bool(args.llama_server) and (Path(args.llama_server).is_file() or shutil.which(args.llama_server))
    if not llama_ok:
        res["llamacpp_skipped"] = (f"llama-server not found: {args.llama_server!r}" if args.llama_server else
                                   "no --llama-server / $LLAMA_SERVER given")
        print(f"llama.cpp side SKIPPED: {res['llamacpp_skipped']}", flush=True)
    else:
        res["meta"]["llama_version"] = llama_version(args.llama_server)
    if args.skip_openk2:
        res["openk2_skipped"] = "--skip-openk2"
    long_prompt = None
    if args.ttft_long:
        from transformers import AutoTokenizer

        from openk2.serve.backends import SMOLLM2_FILE, smollm2_path

        tok = AutoTokenizer.from_pretrained(str(smollm2_path()), gguf_file=SMOLLM2_FILE)
        n = args.long_tokens
        for _ in range(4):  # size the text so the rendered chat prompt has ~--long-tokens tokens
            text = long_prompt_text(n)
            got = len(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])
            if abs(got - args.long_tokens) < 20:
                break
            n = max(1, int(n * args.long_tokens / got))
        long_prompt = text

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmpd:
        tmp = Path(tmpd)
        logdir = Path(args.out).resolve().parent if args.out else tmp
        logdir.mkdir(parents=True, exist_ok=True)
        for side in ("openk2", "llamacpp"):
            if side + "_skipped" in res:
                continue
            print(f"== {side}", flush=True)
            try:
                with (start_openk2 if side == "openk2" else start_llama)(args, env, logdir) as srv:
                    print(f"  {' '.join(srv.cmd)}\n  at {srv.url}", flush=True)
                    res[side] = side_runs(args, srv, long_prompt)
            except Exception as e:
                res[side + "_skipped"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"{side} FAILED: {res[side + '_skipped']}", flush=True)
        if args.compare and not args.skip_inproc:
            print("== in-process (child process)", flush=True)
            try:
                res["inproc"] = run_inproc(args, env, tmp)
            except Exception as e:
                res["inproc"] = {"error": f"{type(e).__name__}: {e}"}
    res["meta"]["load_avg_end"] = load_avg()
    report(res)
    if args.plot and (res.get("openk2") or {}).get("steady"):
        print(f"wrote {plot_steady(res, Path(args.plot))}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
