"""Local backends: Linux namespaces (our own launcher over unshare(2)), bubblewrap, and the rlimit-only fallback.

The host side of a run: start ``_launcher.py`` with pipes, hand it the config, stream stdout/stderr with a
cap, enforce the wall clock, classify why the run ended. Everything is asyncio; nothing is buffered
without bound (a flooder is killed at the cap).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import marshal
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from openk2.utils.aio import run_coroutine
from openk2.sandbox.types import (
    ERROR,
    KILLED,
    MEMORY,
    OK,
    OUTPUT_LIMIT,
    TIMEOUT,
    Limits,
    RunRequest,
    RunResult,
    SandboxError,
)

LAUNCHER = str(Path(__file__).with_name("_launcher.py"))
SANDBOX_WORKDIR = "/sandbox"
# The read-only view of the system: these host paths (when they exist), plus the Python installation.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
KILL_GRACE_S = 2.0
_MEMORY_RE = re.compile(rb"MemoryError|Cannot allocate memory|std::bad_alloc|[Oo]ut of memory|ENOMEM")


def python_paths() -> list[str]:
    """The interpreter's installation(s): the sandboxed program runs the same Python, read-only."""
    paths = []
    for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))):
        p = os.path.realpath(p)
        if p not in paths:
            paths.append(p)
    return paths


def _covered(path: str, by: list[str]) -> bool:
    return any(path == b or path.startswith(b.rstrip("/") + "/") for b in by)


def ro_paths(extra: tuple[str, ...] = ()) -> list[str]:
    out: list[str] = []
    for p in (*SYSTEM_PATHS, *python_paths(), *extra):
        if os.path.dirname(p) == "/" and os.path.islink(p):  # /bin -> usr/bin: recreated as the same link
            out.append(p)
            continue
        real = os.path.realpath(p)
        if os.path.exists(real) and not _covered(real, [os.path.realpath(x) for x in out]):
            out.append(real)
    return out


def default_env(extra: dict[str, str] | None = None, workdir: str = SANDBOX_WORKDIR) -> dict[str, str]:
    bindir = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": workdir, "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
        # one thread per BLAS/OpenMP pool: threads count against RLIMIT_NPROC and RLIMIT_AS
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }
    env.update(extra or {})
    return env


def cgroup2_memory() -> tuple[bool, str]:
    """Could a run get its own cgroup v2 with memory.max here? (Reported by `openk2 sandbox info`.)

    openk2 limits memory with RLIMIT_AS; a delegated cgroup v2 subtree with the memory controller would
    also count page cache, tmpfs pages and every process together. This only reports whether one exists.
    """
    try:
        rel = next(line.split(":", 2)[2].strip() for line in open("/proc/self/cgroup") if line.startswith("0::"))
    except (OSError, StopIteration):
        return False, "no cgroup v2 hierarchy for this process"
    mount = next((line.split()[4] for line in open("/proc/self/mountinfo") if " - cgroup2 " in line), None)
    if mount is None:
        return False, "cgroup2 is not mounted"
    path = os.path.join(mount, rel.lstrip("/"))
    try:
        controllers = open(os.path.join(path, "cgroup.controllers")).read().split()
    except OSError as e:
        return False, f"cannot read {path}/cgroup.controllers ({e.strerror})"
    if "memory" not in controllers:
        return False, f"the memory controller is not enabled in cgroup v2 at {path} (controllers: " \
                      f"{' '.join(controllers) or 'none'})"
    if not os.access(path, os.W_OK):
        return False, f"{path} is not writable (no delegated subtree)"
    return True, f"memory controller available at {path} (not used: openk2 limits memory with RLIMIT_AS)"


class _Capped:
    """A byte buffer that keeps the first `limit` bytes and notes what it dropped."""

    def __init__(self, limit: int):
        self.limit, self.buf, self.over = limit, bytearray(), False

    def add(self, chunk: bytes) -> bool:
        room = self.limit - len(self.buf)
        if room > 0:
            self.buf += chunk[:room]
        if len(chunk) > room:
            self.over = True
        return self.over


async def _pump(stream: asyncio.StreamReader, cap: _Capped, on_over) -> None:
    while True:
        chunk = await stream.read(1 << 16)
        if not chunk:
            return
        if cap.add(chunk) and on_over is not None:
            on_over()
            on_over = None


async def _read_pipe(fd: int) -> bytes:
    """All of a pipe's bytes, read on the event loop (the status can be larger than a pipe buffer)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)
    f = os.fdopen(fd, "rb", 0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), f)
    try:
        return await reader.read()
    finally:
        transport.close()


def _write_all_blocking(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def _decode(b: bytes | bytearray) -> str:
    return bytes(b).decode("utf-8", errors="replace")


class _Zygote:
    """The host end of the launcher's fork server (`_launcher.py --zygote`): one per backend and process.

    `spawn` hands it a config and four fds and gets the launcher's pid back; any failure (too large a
    config, a dead zygote twice in a row) returns None and the caller exec's the launcher instead.
    """

    MAX_MESSAGE = 150_000  # SOCK_SEQPACKET messages must fit the socket buffer

    def __init__(self):
        self.lock = threading.Lock()
        self.sock = None
        self.proc = None
        self.owner = None
        self.failures = 0

    def _start(self):
        import socket

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER, "--zygote", str(child.fileno())],
                                         pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            child.close()
        self.sock, self.owner = parent, os.getpid()

    def _close(self):
        if self.sock is not None:
            self.sock.close()
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=5)
        self.sock = self.proc = None

    def spawn(self, data: bytes, fds: list[int]) -> int | None:
        import socket

        if len(data) > self.MAX_MESSAGE or self.failures >= 3:
            return None
        with self.lock:
            if self.owner != os.getpid():  # a forked host: never share the parent's zygote
                self.sock = self.proc = None
            for _ in range(2):
                try:
                    if self.sock is None:
                        self._start()
                    socket.send_fds(self.sock, [data], fds)
                    reply = self.sock.recv(32)
                    pid = int(reply) if reply else -1
                    if pid > 0:
                        return pid
                except (OSError, ValueError):
                    pass
                self.failures += 1
                self._close()
            return None

    def __del__(self):
        with contextlib.suppress(Exception):
            self._close()


class LocalBackend:
    """One of the local modes: ``namespaces`` (default where it works), ``bwrap``, ``rlimit`` (no isolation)."""

    ISOLATION = {"namespaces": "namespaces", "bwrap": "bwrap", "rlimit": "none"}

    def __init__(self, mode: str = "namespaces", ro_paths_extra: tuple[str, ...] = (), bwrap: str | None = None,
                 outer_uid: int = 65534, use_zygote: bool = True):
        if mode not in self.ISOLATION:
            raise SandboxError(f"unknown local sandbox mode {mode!r} (namespaces, bwrap, rlimit)")
        self.mode, self.name, self.isolation = mode, mode, self.ISOLATION[mode]
        self.ro_paths = ro_paths(ro_paths_extra)
        self.bwrap = bwrap or os.environ.get("OPENK2_BWRAP") or shutil.which("bwrap")
        self.outer_uid = outer_uid
        self.memory_limit_by = "RLIMIT_AS"
        self._zygote = _Zygote() if mode in ("namespaces", "rlimit") and use_zygote else None

    # --------------------------------------------------------------------------------------- availability

    @functools.cached_property
    def availability(self) -> tuple[bool, str]:
        """(usable, reason): a real trial run (`sh -c 'echo ok'`), done once per backend object."""
        if not sys.platform.startswith("linux"):
            return False, f"needs Linux (this is {sys.platform})"
        if self.mode == "bwrap" and not self.bwrap:
            return False, "bwrap (bubblewrap) is not on PATH"
        try:
            res = self.run_blocking(RunRequest(["/bin/sh", "-c", "echo ok"]), Limits(timeout_s=20))
        except Exception as e:  # noqa: BLE001 - any failure means "not here"
            return False, f"trial run failed: {e}"
        if res.status != OK or res.stdout != "ok\n":
            return False, f"trial run failed: {res.error or res.stderr.strip() or res.status}"
        return True, "ok"

    def available(self) -> bool:
        return self.availability[0]

    # -------------------------------------------------------------------------------------------- config

    def _config(self, req: RunRequest, limits: Limits, workdir: str | None) -> dict:
        wd = workdir or SANDBOX_WORKDIR
        cfg = {
            "mode": self.mode, "command": list(req.command), "env": default_env(req.env, wd),
            "files": {p: d.encode() if isinstance(d, str) else bytes(d) for p, d in req.files.items()},
            "executable": list(req.executable),
            "src_dir": os.path.realpath(req.src_dir) if req.src_dir else None,
            "fetch_files": list(req.fetch_files), "limits": limits.to_dict(), "ro_paths": self.ro_paths,
            "outer_uid": self.outer_uid, "workdir": workdir, "bwrap": self.bwrap, "host_pid": os.getpid(),
            # D's own deadline: under bwrap the host cannot reach D with a signal, so D ends the run on time
            "deadline_grace_s": 0.0 if self.mode == "bwrap" else 2.0,
        }
        if req.src_dir and not os.path.isdir(req.src_dir):
            raise SandboxError(f"sandbox source directory {req.src_dir}: not a directory")
        return cfg

    def _argv(self, cfg_fd: int, status_fd: int) -> list[str]:
        return [sys.executable, "-I", "-S", LAUNCHER, "--config-fd", str(cfg_fd), "--status-fd", str(status_fd)]

    # ------------------------------------------------------------------------------------------------ run

    async def run(self, req: RunRequest, limits: Limits) -> RunResult:
        workdir = tempfile.mkdtemp(prefix="openk2-sandbox-") if self.mode == "rlimit" else None
        try:
            return await self._run(req, limits, workdir)
        finally:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)

    async def _run(self, req: RunRequest, limits: Limits, workdir: str | None) -> RunResult:
        data = marshal.dumps(self._config(req, limits, workdir))
        if self._zygote is not None:
            res = await self._run_zygote(req, limits, data)
            if res is not None:
                return res
        return await self._run_exec(req, limits, data)

    async def _run_zygote(self, req: RunRequest, limits: Limits, data: bytes) -> RunResult | None:
        """The fast path: the zygote forks the launcher (no interpreter start-up per run)."""
        loop = asyncio.get_running_loop()
        stdin = req.stdin_bytes()
        t0 = time.monotonic()
        in_r, in_w = os.pipe() if stdin else (os.open(os.devnull, os.O_RDONLY), None)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        try:
            pid = self._zygote.spawn(data, [in_r, out_w, err_w, st_w])
        finally:
            for fd in (in_r, out_w, err_w, st_w):
                os.close(fd)
        if pid is None:
            for fd in (in_w, out_r, err_r, st_r):
                if fd is not None:
                    os.close(fd)
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            pidfd = None  # already gone (or no pidfd): signals are skipped, the pipes still end the run

        def send(sig: int) -> None:
            if pidfd is not None:
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pidfd_send_signal(pidfd, sig)

        reason: list[str] = []
        hard_kill: list[asyncio.TimerHandle] = []

        def end(why: str) -> None:
            if reason:
                return
            reason.append(why)
            send(signal.SIGUSR1)
            hard_kill.append(loop.call_later(KILL_GRACE_S, send, signal.SIGKILL))

        async def reader(fd: int) -> asyncio.StreamReader:
            r = asyncio.StreamReader(limit=1 << 16)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(r), os.fdopen(fd, "rb", 0))
            return r

        out, err = _Capped(limits.output_bytes), _Capped(limits.output_bytes)
        status_task = asyncio.ensure_future(_read_pipe(st_r))
        pumps = [asyncio.ensure_future(_pump(await reader(out_r), out, lambda: end(OUTPUT_LIMIT))),
                 asyncio.ensure_future(_pump(await reader(err_r), err, lambda: end(OUTPUT_LIMIT)))]
        feeder = loop.run_in_executor(None, _write_all_blocking, in_w, stdin) if stdin else None
        try:
            try:
                await asyncio.wait_for(asyncio.shield(status_task), timeout=limits.timeout_s + 0.5)
            except asyncio.TimeoutError:
                end(TIMEOUT)
                done, _ = await asyncio.wait([status_task], timeout=KILL_GRACE_S + 2.0)
                if not done:
                    send(signal.SIGKILL)
            done, pending = await asyncio.wait(pumps + [status_task], timeout=KILL_GRACE_S + 1.0)
            for t in pending:
                t.cancel()
            status_raw = status_task.result() if status_task in done else b""
        except BaseException:
            send(signal.SIGKILL)
            raise
        finally:
            for h in hard_kill:
                h.cancel()
            if feeder is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(feeder), timeout=1.0)
            if pidfd is not None:
                os.close(pidfd)
        return self._result(status_raw, out, err, time.monotonic() - t0, limits, reason[0] if reason else None)

    async def _run_exec(self, req: RunRequest, limits: Limits, data: bytes) -> RunResult:
        """The plain path: exec the launcher (bwrap, very large requests, or no zygote)."""
        loop = asyncio.get_running_loop()
        cfg_r, cfg_w = os.pipe()
        st_r, st_w = os.pipe()
        t0 = time.monotonic()
        stdin = req.stdin_bytes()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(cfg_r, st_w), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(cfg_r, st_w), start_new_session=True,
                limit=1 << 16)
        except BaseException:
            for fd in (cfg_r, cfg_w, st_r, st_w):
                os.close(fd)
            raise
        os.close(cfg_r)
        os.close(st_w)
        writer = loop.run_in_executor(None, _write_all_blocking, cfg_w, data) if len(data) > 60000 else None
        if writer is None:
            _write_all_blocking(cfg_w, data)
        status_task = asyncio.ensure_future(_read_pipe(st_r))
        reason: list[str] = []  # why the host ended the run: "timeout" / "output_limit"
        hard_kill: list[asyncio.TimerHandle] = []

        def end(why: str) -> None:
            if reason:
                return
            reason.append(why)
            if not (self.mode == "bwrap" and why == TIMEOUT):  # under bwrap, D's own deadline ends it and reports
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGUSR1)  # L -> D: kill every process of the sandbox, then report
            hard_kill.append(loop.call_later(KILL_GRACE_S, self._killpg, proc.pid))

        out, err = _Capped(limits.output_bytes), _Capped(limits.output_bytes)
        pumps = [asyncio.ensure_future(_pump(proc.stdout, out, lambda: end(OUTPUT_LIMIT))),
                 asyncio.ensure_future(_pump(proc.stderr, err, lambda: end(OUTPUT_LIMIT)))]
        feeder = asyncio.ensure_future(self._feed(proc, stdin)) if stdin else None
        try:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=limits.timeout_s + 0.5)
            except asyncio.TimeoutError:
                end(TIMEOUT)
                await proc.wait()
            # the pipes close when the last process of the sandbox is gone; a fallback-mode orphan that
            # left the session could hold them open, so bound the wait
            done, pending = await asyncio.wait(pumps + [status_task], timeout=KILL_GRACE_S + 1.0)
            for t in pending:
                t.cancel()
            status_raw = status_task.result() if status_task in done else b""
        except BaseException:
            self._killpg(proc.pid)
            raise
        finally:
            for h in hard_kill:
                h.cancel()
            if feeder:
                feeder.cancel()
            if writer is not None:
                with contextlib.suppress(BaseException):
                    await writer
            if self.mode == "rlimit":
                self._killpg(proc.pid)
        wall = time.monotonic() - t0
        return self._result(status_raw, out, err, wall, limits, reason[0] if reason else None)

    @staticmethod
    async def _feed(proc, data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(data)
            await proc.stdin.drain()
            proc.stdin.close()

    @staticmethod
    def _killpg(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def run_blocking(self, req: RunRequest, limits: Limits) -> RunResult:
        """A run without an event loop (used by the availability probe)."""
        return run_coroutine(self.run(req, limits))

    # ------------------------------------------------------------------------------------------- classify

    def _result(self, status_raw: bytes, out: _Capped, err: _Capped, wall: float, limits: Limits,
                host_reason: str | None) -> RunResult:
        st: dict = {}
        buf = io.BytesIO(status_raw)
        while buf.tell() < len(status_raw):  # one record from D, or one from L when D died without a word
            try:
                rec = marshal.load(buf)
            except (EOFError, ValueError, TypeError):
                break
            if isinstance(rec, dict):
                st = rec
        exit_code, sig = st.get("exit_code"), st.get("signal")
        cpu = st.get("cpu_s")
        error = st.get("error", "")
        if host_reason == OUTPUT_LIMIT:
            status = OUTPUT_LIMIT
        elif host_reason == TIMEOUT or st.get("kill_reason") == "deadline":
            status = TIMEOUT
        elif not st or st.get("setup_failed") or (error and exit_code is None and sig is None):
            status, error = ERROR, error or "the sandbox ended without a report"
        elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None and cpu >= limits.cpu_limit_s - 0.05):
            status = TIMEOUT
        elif (exit_code not in (None, 0) or sig is not None) and limits.memory_mb and _MEMORY_RE.search(
                bytes(err.buf[-4096:])):
            status = MEMORY
        elif error and exit_code == 127:
            status = ERROR
        elif sig is not None:
            status = KILLED
        else:
            status = OK
        if status == TIMEOUT and not error:
            error = ("CPU time limit" if host_reason != TIMEOUT and st.get("kill_reason") != "deadline"
                     else f"wall-clock timeout ({limits.timeout_s:g} s)")
        if status == OUTPUT_LIMIT:
            error = f"output over {limits.output_bytes} bytes"
        return RunResult(
            status=status, exit_code=exit_code, signal=sig, stdout=_decode(out.buf), stderr=_decode(err.buf),
            wall_s=round(wall, 4), cpu_s=cpu,
            max_rss_mb=round(st["max_rss_kb"] / 1024, 2) if st.get("max_rss_kb") else None,
            stdout_truncated=out.over, stderr_truncated=err.over, backend=self.name, isolation=self.isolation,
            memory_limit_by=self.memory_limit_by if limits.memory_mb else "",
            orphans_killed=st.get("orphans_killed", 0),
            error=error, files={k: bytes(v) for k, v in (st.get("files") or {}).items()})
