"""`openk2 sandbox run|serve|info`: run a command in a fresh sandbox, serve the SandboxFusion API, list backends."""

from __future__ import annotations

import argparse
import json
import os
import sys

from openk2.errors import OpenK2Error


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sandbox_command", metavar="{run,serve,info}")
    r = sub.add_parser("run", help="run CMD in a fresh sandbox (working directory: a copy of this one); "
                                   "print the result as one JSON object",
                       description="Run a command in a fresh sandbox whose working directory starts as a copy of "
                                   "the current one; stdin passes through; prints one JSON object (status, "
                                   "exit_code, stdout, stderr, wall_s, ...). Exit status 0 whenever the sandbox "
                                   "itself worked, 1 when it reports status 'error', 2 on bad arguments.")
    _common(r)
    r.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wall-clock limit (default 10)")
    r.add_argument("--memory", type=int, default=1024, metavar="MB", help="address-space limit (default 1024; 0: off)")
    r.add_argument("--output-limit", type=int, default=1 << 20, metavar="BYTES",
                   help="stdout/stderr cap each; more kills the program (default 1 MiB)")
    r.add_argument("--disk", type=int, default=256, metavar="MB", help="size of the private /sandbox and /tmp")
    r.add_argument("--no-copy", action="store_true", help="start from an empty working directory")
    r.add_argument("--fetch", action="append", default=[], metavar="PATH",
                   help="bring back this working-directory file (base64 in 'files'); repeatable")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    s = sub.add_parser("serve", help="serve SandboxFusion's POST /run_code over a local backend",
                       description="A SandboxFusion-compatible HTTP server (POST /run_code, GET /v1/ping) over the "
                                   "local sandbox, for `--backend http://HOST:PORT` clients.")
    _common(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--concurrency", type=int, default=None, help="sandboxes at once (default: CPU count)")
    s.add_argument("--max-timeout", type=float, default=300.0, help="cap on a request's run_timeout (s)")
    sub.add_parser("info", help="which backends work here and which one `auto` picks")


def _common(p):
    p.add_argument("--backend", default="auto",
                   help="auto (default), namespaces, bwrap, rlimit (no isolation), or a SandboxFusion URL")
    p.add_argument("--allow-unsafe", action="store_true",
                   help="allow the rlimit fallback, which does NOT isolate (no namespaces available)")


def main(args) -> int:
    cmd = getattr(args, "sandbox_command", None)
    if cmd == "run":
        return _run(args)
    if cmd == "serve":
        return _serve(args)
    if cmd == "info":
        return _info()
    print("usage: openk2 sandbox {run,serve,info} ... (openk2 sandbox run -h)", file=sys.stderr)
    return 2


def _run(args) -> int:
    from openk2.sandbox.pool import Sandbox
    from openk2.sandbox.types import ERROR, Limits, RunRequest

    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise OpenK2Error("no command given: openk2 sandbox run [options] -- CMD ARGS...")
    limits = Limits(timeout_s=args.timeout, memory_mb=args.memory or None, output_bytes=args.output_limit,
                    disk_mb=args.disk)
    sb = Sandbox(args.backend, limits=limits, allow_unsafe=args.allow_unsafe or None, concurrency=1)
    stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    req = RunRequest(argv, stdin=stdin or None, src_dir=None if args.no_copy else os.getcwd(),
                     fetch_files=args.fetch)
    res = sb.run_sync(req)
    print(json.dumps(res.to_json(), ensure_ascii=False))
    return 1 if res.status == ERROR else 0


def _serve(args) -> int:
    from openk2.sandbox.pool import Sandbox
    from openk2.sandbox.remote import create_app
    from openk2.serve.cli import serve_forever

    sb = Sandbox(args.backend, allow_unsafe=args.allow_unsafe or None, concurrency=args.concurrency)
    app = create_app(sb, max_timeout_s=args.max_timeout)
    banner = (f"openk2 sandbox serve: SandboxFusion-compatible POST /run_code on http://{args.host}:{args.port}/ "
              f"(backend {sb.name}, isolation {sb.backend.isolation}, concurrency {sb.concurrency})")
    serve_forever(app, args.host, args.port, graceful_timeout=10.0, banner=banner)
    return 0


def _info() -> int:
    from openk2.sandbox.pool import backend_report, get_backend
    from openk2.sandbox.types import SandboxError

    report = backend_report()
    try:
        auto = get_backend("auto", allow_unsafe=False).name
    except SandboxError:
        auto = None
    from openk2.sandbox.local import cgroup2_memory

    print(json.dumps({"backends": report, "auto": auto, "memory_limit_by": "RLIMIT_AS",
                      "cgroup2_memory": cgroup2_memory()[1]}, indent=2))
    return 0
