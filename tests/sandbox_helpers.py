"""Shared pieces of the sandbox tests: the isolating backend (or a clear skip), host-side process checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


BACKEND = os.environ.get("OPENK2_TEST_SANDBOX_BACKEND", "namespaces")  # or "bwrap" (with bwrap on PATH)


def isolating_sandbox(**kw):
    """A Sandbox on the namespaces backend; skips (with the reason) where this machine cannot create one."""
    from openk2.sandbox import Sandbox
    from openk2.sandbox.pool import _local

    ok, why = _local(BACKEND).availability
    if not ok:
        pytest.skip(f"the {BACKEND} sandbox is unavailable here: {why}")
    return Sandbox(BACKEND, **kw)


def host_pids_with(marker: str) -> list[int]:
    """Host processes whose command line contains `marker` (a leftover sandbox process would)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker.encode() in cmd:
            out.append(int(name))
    return out
