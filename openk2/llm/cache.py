"""The on-disk reply cache: a rerun of a pipeline costs no tokens.

Keyed by the sha256 of the canonical request (model, messages, sampling
settings, tools, schema). The endpoint URL and API key are left out on purpose:
the same request to a restarted server on another port is the same request.
Sampled requests are cached too; pass different ``seed``s for different samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from openk2.utils.files import atomic_write


def cache_key(body: dict[str, Any], namespace: str = "chat") -> str:
    """sha256 of the canonical request JSON (key order does not matter)."""
    canon = json.dumps({"ns": namespace, "body": body}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


class DiskCache:
    """One JSON file per request under ``root/ab/abcd....json``; atomic writes, safe across processes."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        # no fsync: losing a cache entry in a power cut costs one request, not correctness
        atomic_write(self._path(key), json.dumps(value, ensure_ascii=False), fsync=False)
