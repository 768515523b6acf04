"""Atomic file writes: a crash or a full disk never leaves a half-written file behind.

Every write goes to a temporary file in the same directory, is flushed and
fsynced, then renamed over the target (``os.replace`` is atomic on POSIX and
Windows). Readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO[Any]]:
    """``with atomic_open(p, "w") as f: f.write(...)``: the file appears at `p` only if the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, fsync: bool = True) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_open(path, "w" if isinstance(data, str) else "wb", fsync=fsync) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to `path` atomically."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """Parse a JSON file; a missing or malformed file is a ConfigError that names it (and where it breaks)."""
    import json

    from openk2.errors import ConfigError

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON{' ' + what if what else ''} ({e.msg} at line {e.lineno} "
                          f"column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
