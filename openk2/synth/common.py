"""What every synthesis stage shares: deterministic ids, resumable JSONL stores, schema-checked LLM calls
that count bad output instead of crashing, and a bounded-concurrency runner with a progress bar."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from openk2.llm.base import LLMClient, LLMError, StructuredOutputError
from openk2.utils.progress import progress_bar


def stable_id(*parts: Any, n: int = 12) -> str:
    """A short id from the canonical JSON of `parts`: the same inputs give the same id on every run."""
    canon = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:n]


def rng_for(*parts: Any) -> random.Random:
    """A random generator seeded by `parts` (deterministic per item, independent of run order)."""
    return random.Random(int(stable_id(*parts, n=16), 16))


def slug(text: str, n: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:n] or "x"


class Stats:
    """Thread-safe counters: outcomes, failure reasons, LLM problems."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.c[key] += n

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.c.items()))


async def ask_json(client: LLMClient, messages: list[dict[str, Any]], schema: dict[str, Any], stats: Stats, role: str,
                   *, max_tokens: int = 1024, temperature: float = 0.0, seed: int | None = None) -> Any | None:
    """The schema-valid JSON reply of `client`, or None with the problem counted under ``llm.<role>.<kind>``.

    Bad output (no schema-valid JSON after the client's retries) is the model's fault: None. A failed request
    (the endpoint refused or went away) raises :class:`LLMError`; :func:`run_items` then records the item as
    retryable, so the next run does it again."""
    stats.add(f"llm.{role}.calls")
    try:
        resp = await client.achat(messages, json_schema=schema, max_tokens=max_tokens, temperature=temperature, seed=seed)
    except StructuredOutputError:
        stats.add(f"llm.{role}.invalid_json")
        return None
    except LLMError:
        # the endpoint failed (not the model's output): the item is retried on the next run
        stats.add(f"llm.{role}.request_error")
        raise
    if resp.finish_reason == "length":
        stats.add(f"llm.{role}.truncated")
    return resp.parsed


class JsonlStore:
    """A stage's output: one JSON record per line, keyed by ``record["id"]``.

    Appends are flushed line by line, so an interrupted stage resumes where it stopped (a torn last line is
    dropped on load). ``done`` is the set of ids already written."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.records: dict[str, dict[str, Any]] = {}
        self.path.touch()  # a stage with no items still leaves its (empty) output for the next stage
        if self.path.stat().st_size:
            good: list[str] = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by an interruption
                if isinstance(rec, dict) and "id" in rec:
                    self.records[rec["id"]] = rec
                    good.append(line)
            # rewrite without torn lines so appends start on a clean line
            if len(good) != len(self.path.read_text(encoding="utf-8").splitlines()):
                from openk2.utils.files import atomic_write

                atomic_write(self.path, "".join(x + "\n" for x in good))

    @property
    def done(self) -> set[str]:
        """Ids finished for good (a record marked ``retryable`` -- a failed LLM request -- is done again)."""
        return {k for k, r in self.records.items() if not r.get("retryable")}

    def add(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, sort_keys=False)
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
            self.records[record["id"]] = record

    def values(self) -> list[dict[str, Any]]:
        return list(self.records.values())


async def run_items(items: Iterable[dict[str, Any]], fn: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
                    store: JsonlStore, *, concurrency: int = 4, description: str = "", progress: bool = True,
                    stats: Stats | None = None) -> list[dict[str, Any]]:
    """Run ``fn`` over the items not yet in `store` (by ``item["id"]``), at most `concurrency` at a time; each
    result (a record with the same id) is appended as soon as it is ready. An exception in ``fn`` becomes a
    failed record (``ok: False, reason: "error:<Type>"``; a failed LLM request ``llm_request_error``, retried on
    the next run), never a crash of the stage."""
    items = list(items)
    todo = [it for it in items if it["id"] not in store.done]
    sem = asyncio.Semaphore(max(1, concurrency))
    with progress_bar(description, total=len(items), enabled=progress, completed=len(items) - len(todo)) as bar:

        async def one(it: dict[str, Any]) -> None:
            async with sem:
                try:
                    rec = await fn(it)
                except LLMError as e:
                    rec = {"id": it["id"], "ok": False, "reason": "llm_request_error", "detail": str(e)[:500], "retryable": True}
                    if stats is not None:
                        stats.add(f"{description}.llm_request_error")
                except Exception as e:  # noqa: BLE001 - recorded per item
                    rec = {"id": it["id"], "ok": False, "reason": f"error:{type(e).__name__}", "detail": str(e)[:500]}
                    if stats is not None:
                        stats.add(f"{description}.error:{type(e).__name__}")
            rec.setdefault("id", it["id"])
            store.add(rec)
            bar.advance(1)

        await asyncio.gather(*(one(it) for it in todo))
    return [store.records[it["id"]] for it in items if it["id"] in store.records]
