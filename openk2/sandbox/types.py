"""What a sandbox run takes (`RunRequest`, `Limits`) and gives back (`RunResult`)."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field, replace
from typing import Any

from openk2.errors import OpenK2Error

# Why a run ended.
OK = "ok"                      # the program ended by itself (any exit code: see exit_code)
TIMEOUT = "timeout"            # wall-clock timeout or CPU-time limit
MEMORY = "memory"              # the address-space limit (MemoryError / ENOMEM) or the cgroup's OOM killer
OUTPUT_LIMIT = "output_limit"  # stdout or stderr went over the limit: the program was killed
KILLED = "killed"              # ended by a signal that is none of the above (SIGSEGV, SIGKILL from itself...)
ERROR = "error"                # the sandbox could not run the program (setup failure, command not found)
STATUSES = (OK, TIMEOUT, MEMORY, OUTPUT_LIMIT, KILLED, ERROR)


class SandboxError(OpenK2Error):
    """The sandbox cannot be used as asked (unavailable backend, unsafe backend not opted in, bad request)."""


@dataclass(frozen=True)
class Limits:
    """Per-run limits. ``cpu_s`` defaults to the timeout (rounded up) + 1."""

    timeout_s: float = 10.0          # wall clock, the whole process tree
    memory_mb: int | None = 1024     # RLIMIT_AS per process (and cgroup memory.max where available); None: off
    cpu_s: int | None = None         # RLIMIT_CPU per process
    nproc: int = 64                  # RLIMIT_NPROC: processes + threads of the sandbox user
    file_size_mb: int = 64           # RLIMIT_FSIZE: the largest file the program may write
    nofile: int = 256                # RLIMIT_NOFILE
    output_bytes: int = 1 << 20      # stdout and stderr, each: more kills the program (status output_limit)
    disk_mb: int = 256               # size of each private tmpfs (/sandbox, /tmp, /dev/shm)

    def __post_init__(self):
        def bad(name, why):
            raise SandboxError(f"sandbox limit {name}={getattr(self, name)!r}: {why}")

        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            bad("timeout_s", "must be a positive number of seconds")
        if self.memory_mb is not None and not (isinstance(self.memory_mb, int) and self.memory_mb >= 16):
            bad("memory_mb", "must be an integer >= 16 (MB) or None")
        for name in ("nproc", "file_size_mb", "nofile", "output_bytes", "disk_mb"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                bad(name, "must be a positive integer")
        if self.cpu_s is not None and not (isinstance(self.cpu_s, int) and self.cpu_s > 0):
            bad("cpu_s", "must be a positive integer or None")

    @property
    def cpu_limit_s(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(math.ceil(self.timeout_s)) + 1

    def with_(self, **kw) -> Limits:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {"timeout_s": float(self.timeout_s), "memory_mb": self.memory_mb, "cpu_s": self.cpu_limit_s,
                "nproc": self.nproc, "file_size_mb": self.file_size_mb, "nofile": self.nofile,
                "output_bytes": self.output_bytes, "disk_mb": self.disk_mb}


@dataclass
class RunRequest:
    """One program: a command (argv), files to put in its working directory, stdin, limits.

    ``files`` maps a relative path to text or bytes. ``src_dir`` (a host directory) is copied into the
    working directory first. ``fetch_files`` names working-directory files to bring back (RunResult.files).
    """

    command: list[str]
    files: dict[str, str | bytes] = field(default_factory=dict)
    stdin: str | bytes | None = None
    env: dict[str, str] | None = None
    src_dir: str | None = None
    fetch_files: list[str] = field(default_factory=list)
    limits: Limits | None = None
    executable: list[str] = field(default_factory=list)  # files to chmod +x

    def __post_init__(self):
        if isinstance(self.command, str) or not self.command or not all(isinstance(a, str) for a in self.command):
            raise SandboxError(f"sandbox command must be a non-empty list of strings, got {self.command!r}")
        for p in self.files:
            if not isinstance(p, str) or not p or p.startswith("/") or ".." in p.split("/"):
                raise SandboxError(f"sandbox file path {p!r}: must be relative and stay in the working directory")

    def encoded_files(self) -> dict[str, str]:
        return {p: base64.b64encode(d.encode() if isinstance(d, str) else bytes(d)).decode()
                for p, d in self.files.items()}

    def stdin_bytes(self) -> bytes | None:
        return self.stdin.encode() if isinstance(self.stdin, str) else self.stdin


@dataclass
class RunResult:
    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float | None = None
    signal: int | None = None
    max_rss_mb: float | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    backend: str = ""
    isolation: str = ""            # "namespaces", "bwrap", "remote", or "none"
    memory_limit_by: str = ""      # "cgroup2 memory.max", "RLIMIT_AS", "remote", or "" (no limit)
    orphans_killed: int = 0        # processes still alive when the program ended (all killed)
    error: str = ""
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The program ran to completion and exited 0."""
        return self.status == OK and self.exit_code == 0

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("status", "exit_code", "signal", "stdout", "stderr", "wall_s", "cpu_s",
                                            "max_rss_mb", "stdout_truncated", "stderr_truncated", "backend",
                                            "isolation", "memory_limit_by", "orphans_killed", "error")}
        if self.files:
            d["files"] = {k: base64.b64encode(v).decode() for k, v in self.files.items()}
        return d
