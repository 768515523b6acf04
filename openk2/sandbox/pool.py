"""`Sandbox`: one interface over every backend, with a concurrency pool; backend choice."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Iterable, Sequence

from openk2.sandbox.types import Limits, RunRequest, RunResult, SandboxError
from openk2.utils.aio import run_coroutine

UNSAFE_ENV = "OPENK2_SANDBOX_ALLOW_UNSAFE"
LOCAL_ORDER = ("namespaces", "bwrap")  # "auto" takes the first that works; "rlimit" only when opted in
_BACKENDS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _local(mode: str):
    from openk2.sandbox.local import LocalBackend

    with _LOCK:
        key = ("local", mode)
        if key not in _BACKENDS:
            _BACKENDS[key] = LocalBackend(mode)
        return _BACKENDS[key]


def backend_report() -> dict[str, str]:
    """Every local backend and whether it works here (`openk2 sandbox info`)."""
    out = {}
    for mode in (*LOCAL_ORDER, "rlimit"):
        ok, why = _local(mode).availability
        out[mode] = "available" + (" (no isolation: opt-in only)" if mode == "rlimit" else "") if ok else why
    return out


def get_backend(name: str = "auto", *, allow_unsafe: bool | None = None, url: str | None = None):
    """A backend by name: ``auto``, ``namespaces``, ``bwrap``, ``rlimit``, ``remote`` (with `url`), or a URL."""
    if allow_unsafe is None:
        allow_unsafe = os.environ.get(UNSAFE_ENV, "") not in ("", "0")
    if name.startswith(("http://", "https://")):
        name, url = "remote", name
    if name == "remote":
        from openk2.sandbox.remote import RemoteBackend

        if not url:
            raise SandboxError("sandbox backend 'remote' needs a URL (SandboxFusion-compatible server)")
        return RemoteBackend(url)
    if name == "auto":
        reasons = []
        for mode in LOCAL_ORDER:
            b = _local(mode)
            ok, why = b.availability
            if ok:
                return b
            reasons.append(f"{mode}: {why}")
        if allow_unsafe:
            return _unsafe(_local("rlimit"))
        raise SandboxError("no isolating sandbox backend works here (" + "; ".join(reasons) + "). The 'rlimit' "
                           "fallback does NOT isolate untrusted code; to use it anyway pass allow_unsafe=True "
                           f"(CLI: --allow-unsafe) or set {UNSAFE_ENV}=1")
    if name in ("namespaces", "bwrap", "rlimit"):
        b = _local(name)
        if name == "rlimit":
            if not allow_unsafe:
                raise SandboxError("sandbox backend 'rlimit' does NOT isolate untrusted code (no namespaces: the "
                                   "program sees the file system and the network); pass allow_unsafe=True "
                                   f"(CLI: --allow-unsafe) or set {UNSAFE_ENV}=1 to use it")
            return _unsafe(b)
        ok, why = b.availability
        if not ok:
            raise SandboxError(f"sandbox backend {name!r} is not available here: {why}")
        return b
    raise SandboxError(f"unknown sandbox backend {name!r} (auto, namespaces, bwrap, rlimit, remote or a URL)")


_WARNED = []


def _unsafe(b):
    if not _WARNED:
        _WARNED.append(True)
        msg = ("openk2.sandbox: using the 'rlimit' backend: NO ISOLATION (the program can read your files and "
               "use the network; only rlimits and a temporary working directory apply)")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        print(f"WARNING: {msg}", file=sys.stderr)
    return b


class Sandbox:
    """Run programs in fresh sandboxes, at most `concurrency` at once.

    >>> sb = Sandbox()                                   # the best local backend, default Limits()
    >>> r = sb.run_python_sync("print(2 + 2)")
    >>> r.status, r.stdout                               # ('ok', '4\\n')
    >>> results = await sb.map([RunRequest(["sh", "-c", "echo hi"])] * 8)
    """

    def __init__(self, backend: str | object = "auto", *, limits: Limits | None = None,
                 concurrency: int | None = None, allow_unsafe: bool | None = None, url: str | None = None):
        self.backend = get_backend(backend, allow_unsafe=allow_unsafe, url=url) if isinstance(backend, str) else backend
        self.limits = limits or Limits()
        self.concurrency = int(concurrency or os.cpu_count() or 1)
        if self.concurrency < 1:
            raise SandboxError(f"sandbox concurrency must be >= 1, got {concurrency}")
        self._sems: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def name(self) -> str:
        return self.backend.name

    def _sem(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._sems.get(loop)
        if sem is None:
            sem = self._sems[loop] = asyncio.Semaphore(self.concurrency)
        return sem

    # ----------------------------------------------------------------------------------------------- async

    async def run(self, request: RunRequest | Sequence[str], **kw) -> RunResult:
        """Run one request (or a command list plus RunRequest fields as keywords)."""
        req = request if isinstance(request, RunRequest) else RunRequest(list(request), **kw)
        limits = req.limits or self.limits
        async with self._sem():
            return await self.backend.run(req, limits)

    async def run_python(self, code: str, *, args: Sequence[str] = (), files: dict | None = None,
                         stdin: str | bytes | None = None, limits: Limits | None = None, **kw) -> RunResult:
        """``python main.py ARGS`` with `code` as main.py (the same interpreter as the host's)."""
        files = dict(files or {})
        files["main.py"] = code
        return await self.run(RunRequest([self.backend_python(), "main.py", *args], files=files, stdin=stdin,
                                         limits=limits, **kw))

    async def run_shell(self, script: str, *, files: dict | None = None, stdin: str | bytes | None = None,
                        limits: Limits | None = None, **kw) -> RunResult:
        """``bash main.sh`` (``sh`` where bash is missing)."""
        files = dict(files or {})
        files["main.sh"] = script
        return await self.run(RunRequest(["bash", "main.sh"], files=files, stdin=stdin, limits=limits, **kw))

    def backend_python(self) -> str:
        return getattr(self.backend, "python", None) or sys.executable

    async def map(self, requests: Iterable[RunRequest], progress: str | None = None) -> list[RunResult]:
        """Run many requests concurrently (bounded by the pool); results in order."""
        reqs = list(requests)
        if progress is None:
            return list(await asyncio.gather(*(self.run(r) for r in reqs)))
        from openk2.utils import progress_bar

        out: list[RunResult | None] = [None] * len(reqs)
        with progress_bar(progress, total=len(reqs)) as bar:
            async def one(i, r):
                out[i] = await self.run(r)
                bar()

            await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------------ sync

    def run_sync(self, request: RunRequest | Sequence[str], **kw) -> RunResult:
        return run_coroutine(self.run(request, **kw))

    def run_python_sync(self, code: str, **kw) -> RunResult:
        return run_coroutine(self.run_python(code, **kw))

    def run_shell_sync(self, script: str, **kw) -> RunResult:
        return run_coroutine(self.run_shell(script, **kw))

    def map_sync(self, requests: Iterable[RunRequest], progress: str | None = None) -> list[RunResult]:
        return run_coroutine(self.map(requests, progress=progress))


