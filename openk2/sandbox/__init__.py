"""Code-execution sandboxes: isolated, limited and fast, behind one interface (docs/sandbox.md).

K2 judged coding trajectories and trained its RL code gym by running model-written code in real sandboxes
(report, sections 3.1.1 and 3.2.1). Everything here treats that code as untrusted::

    from openk2.sandbox import Sandbox, Limits, RunRequest, run_tests
    sb = Sandbox(limits=Limits(timeout_s=5, memory_mb=512), concurrency=8)   # best local backend
    r = await sb.run_python("print(input()[::-1])", stdin="abc")              # r.status == "ok", r.stdout == "cba\\n"
    r = sb.run_sync(["sh", "-c", "echo hi"])                                  # sync wrapper
    report = await run_tests("def add(a, b): return a + b", ["assert add(1, 2) == 3"], sandbox=sb)

Backends: ``namespaces`` (Linux user/mount/PID/net/IPC/UTS namespaces via unshare(2): the default),
``bwrap`` (bubblewrap, when on PATH), ``rlimit`` (no isolation, opt-in only), ``remote`` (a
SandboxFusion-compatible ``/run_code`` server; `openk2 sandbox serve` is one).
"""

from openk2.sandbox.judge import TestCase, TestReport, TestResult, run_tests, run_tests_sync
from openk2.sandbox.pool import Sandbox, backend_report, get_backend, run_coroutine
from openk2.sandbox.types import (
    ERROR,
    KILLED,
    MEMORY,
    OK,
    OUTPUT_LIMIT,
    STATUSES,
    TIMEOUT,
    Limits,
    RunRequest,
    RunResult,
    SandboxError,
)

__all__ = [
    "ERROR", "KILLED", "MEMORY", "OK", "OUTPUT_LIMIT", "STATUSES", "TIMEOUT", "Limits", "RunRequest", "RunResult",
    "Sandbox", "SandboxError", "TestCase", "TestReport", "TestResult", "backend_report", "get_backend",
    "run_coroutine", "run_tests", "run_tests_sync",
]
