"""The runner every suite shares: items -> model replies -> verdicts, cached, resumable, concurrent.

A suite (:class:`Suite`) knows its items (deterministic ids), the chat request of each item, how to score a
reply and how to summarise the verdicts. :func:`run_suite` does the rest:

* per-item JSONL (``<out>/<suite>/<model tag>/items.jsonl``): one record per (item, sample) with the
  request, the reply and the verdict, appended as each finishes (a crash loses at most the line being written);
* resume: a rerun reads that file and asks the model only for records it lacks (an item whose request failed
  is retried); the client's on-disk reply cache (``<out>/cache``) makes even a lost JSONL cost no tokens;
* concurrency through the client: an HTTP client keeps ``concurrency`` requests in flight (its own limit),
  an in-process :class:`~openk2.llm.LocalClient` decodes ``concurrency`` requests as one batch;
* a rich progress bar with ETA, ``summary.json`` and ``summary.md`` (the suite's metrics table).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from openk2.errors import OpenK2Error
from openk2.utils import atomic_write, progress_bar


class EvalError(OpenK2Error):
    """An evaluation cannot run as asked (unknown suite, bad model spec, unreadable results)."""


@dataclass
class Item:
    """One evaluation item: a deterministic id, the chat request, and what scoring needs."""

    id: str
    messages: list[dict[str, Any]]
    gold: Any = None                       # JSON-able; the suite's scorer reads it
    tools: list[dict[str, Any]] | None = None
    category: str = ""                     # a sub-category the summary breaks down by
    meta: dict[str, Any] = field(default_factory=dict)


class Suite:
    """A benchmark. Subclasses set ``name`` and implement ``load``, ``score`` and (optionally) ``metrics``."""

    name = ""
    max_tokens = 512
    description = ""

    def load(self) -> list[Item]:
        raise NotImplementedError

    def items(self, limit: int | None = None) -> list[Item]:
        """The items in a fixed order; `limit`: the first N of each category (all categories stay represented)."""
        items = self.load()
        if limit is None:
            return items
        seen: dict[str, int] = {}
        out = []
        for it in items:
            if seen.get(it.category, 0) < limit:
                seen[it.category] = seen.get(it.category, 0) + 1
                out.append(it)
        return out

    def request(self, item: Item) -> dict[str, Any]:
        """The keyword arguments of ``LLMClient.chat`` for this item (without sampling settings)."""
        kw: dict[str, Any] = {"messages": item.messages, "max_tokens": self.max_tokens}
        if item.tools:
            kw["tools"] = item.tools
        return kw

    async def score(self, item: Item, reply: dict[str, Any]) -> dict[str, Any]:
        """The verdict for one reply (``{"content", "tool_calls"}``): a dict with at least ``passed`` (bool)."""
        raise NotImplementedError

    def metrics(self, records: Sequence[dict[str, Any]], samples: int) -> dict[str, Any]:
        """The suite's numbers: accuracy overall and per category (samples pooled)."""
        return accuracy_metrics(records)


def accuracy_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_cat: dict[str, list[bool]] = {}
    for r in records:
        by_cat.setdefault(r["category"] or "all", []).append(bool(r["verdict"].get("passed")))
    out: dict[str, Any] = {"items": len(records)}
    allv = [v for vs in by_cat.values() for v in vs]
    out["accuracy"] = sum(allv) / len(allv) if allv else 0.0
    if len(by_cat) > 1:
        out["by_category"] = {c: {"n": len(v), "accuracy": sum(v) / len(v)} for c, v in sorted(by_cat.items())}
    return out


def record_key(item_id: str, sample: int) -> str:
    return f"{item_id}#{sample}"


def request_hash(kw: dict[str, Any]) -> str:
    """A short hash of the request: a changed prompt, tool list or setting is a different record."""
    canon = json.dumps(kw, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def model_tag(spec: str) -> str:
    """A file-name-safe name for a model spec (URL, checkpoint path, 'smollm2')."""
    s = spec.rstrip("/")
    if s.startswith(("http://", "https://")):
        s = s.split("://", 1)[1]
    else:
        s = os.path.basename(s) or s
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:80] or "model"


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The records already in a results file, by key; a torn last line (a crash mid-write) is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "key" not in rec:
            raise EvalError(f"{path}: line {n} is not an eval record")
        out[rec["key"]] = rec
    return out


def _reply(resp: Any) -> dict[str, Any]:
    return {"content": resp.content, "tool_calls": resp.tool_calls, "finish_reason": resp.finish_reason,
            "usage": {"prompt_tokens": resp.usage.prompt_tokens, "completion_tokens": resp.usage.completion_tokens}}


@dataclass
class SuiteResult:
    suite: str
    model: str
    metrics: dict[str, Any]
    records: list[dict[str, Any]]
    dir: Path
    model_calls: int          # requests this run sent to the model (0 on a full resume)
    resumed: int              # records read back from an earlier run
    errors: int               # requests that failed (recorded, retried on the next run)
    seconds: float


def run_suite(suite: Suite, client: Any, out: str | os.PathLike, *, model: str = "", limit: int | None = None,
              concurrency: int = 8, samples: int = 1, temperature: float = 0.0, progress: bool = True) -> SuiteResult:
    """Evaluate `client` on `suite`; results under ``out/<suite>/<model tag>/``. Returns the summary.

    `client`: an LLMClient, or a zero-argument factory of one (called only when some record is missing, so a
    finished run does not load an in-process model)."""
    if samples < 1:
        raise EvalError(f"--samples must be >= 1, got {samples}")
    if samples > 1 and temperature <= 0:
        raise EvalError("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    if concurrency < 1:
        raise EvalError(f"--concurrency must be >= 1, got {concurrency}")
    t0 = time.perf_counter()
    lazy = callable(client) and not hasattr(client, "achat")  # a factory: the model loads only if needed
    if lazy and not model:
        raise EvalError("run_suite: a client factory needs model= (the results directory's name)")
    rdir = Path(out) / suite.name / model_tag(model or getattr(client, "model", "") or "model")
    rdir.mkdir(parents=True, exist_ok=True)
    path = rdir / "items.jsonl"
    old = read_records(path)
    items = suite.items(limit)
    todo: list[tuple[Item, int, dict[str, Any], str]] = []
    done: dict[str, dict[str, Any]] = {}
    for it in items:
        base = suite.request(it)
        for s in range(samples):
            kw = {**base, "temperature": temperature, **({"seed": s} if samples > 1 else {})}
            key, h = record_key(it.id, s), request_hash(kw)
            rec = old.get(key)
            if rec is not None and rec.get("request_hash") == h and "error" not in rec:
                done[key] = rec
            else:
                todo.append((it, s, kw, h))
    resumed = len(done)
    errors = 0
    calls = 0
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n")  # a torn last line (a crash mid-write) stays on its own line
    with open(path, "a", encoding="utf-8") as f, \
            progress_bar(f"eval {suite.name}", total=len(items) * samples, enabled=progress, completed=resumed,
                         info=True) as bar:

        passed = [sum(bool(r["verdict"].get("passed")) for r in done.values())]

        def write(rec: dict[str, Any]) -> None:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            done[rec["key"]] = rec
            passed[0] += bool(rec["verdict"].get("passed"))
            bar.advance(1, info=f"pass {passed[0]}/{len(done)}")

        def base_rec(it: Item, s: int, kw: dict[str, Any], h: str) -> dict[str, Any]:
            return {"key": record_key(it.id, s), "id": it.id, "sample": s, "category": it.category,
                    "request_hash": h, "prompt": kw["messages"],
                    "tools": [t["function"]["name"] for t in it.tools or []]}

        async def finish(it, s, kw, h, resp_or_exc) -> None:
            nonlocal errors
            rec = base_rec(it, s, kw, h)
            if isinstance(resp_or_exc, BaseException):
                errors += 1
                rec["error"] = f"{type(resp_or_exc).__name__}: {resp_or_exc}"
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                bar.advance(1)
                return
            rec["reply"] = _reply(resp_or_exc)
            rec["cached"] = bool(resp_or_exc.cached)
            try:
                rec["verdict"] = await suite.score(it, rec["reply"])
            except Exception as e:  # a scorer failure is that item's failure, recorded
                rec["verdict"] = {"passed": False, "score_error": f"{type(e).__name__}: {e}"}
            write(rec)

        async def run_async() -> None:
            async def one(job):
                nonlocal calls
                it, s, kw, h = job
                try:
                    resp = await client.achat(**kw)
                    calls += not resp.cached
                except Exception as e:
                    calls += 1
                    resp = e
                await finish(it, s, kw, h, resp)

            sem = asyncio.Semaphore(concurrency)  # (the client's own limit applies too)

            async def guarded(job):
                async with sem:
                    await one(job)

            await asyncio.gather(*(guarded(j) for j in todo))

        async def run_batched() -> None:
            nonlocal calls
            for start in range(0, len(todo), concurrency):
                chunk = todo[start:start + concurrency]
                before = client.totals.requests - client.totals.cached
                resps = await asyncio.to_thread(client.chat_many, [kw for _, _, kw, _ in chunk])
                calls += (client.totals.requests - client.totals.cached) - before
                for (it, s, kw, h), r in zip(chunk, resps):
                    await finish(it, s, kw, h, r)

        if todo:
            if lazy:
                client = client()
            batched = type(client).chat_many is not _base_chat_many()
            asyncio.run(run_batched() if batched else run_async())
    records = [done[record_key(it.id, s)] for it in items for s in range(samples) if record_key(it.id, s) in done]
    metrics = suite.metrics(records, samples)
    res = SuiteResult(suite.name, model or getattr(client, "model", ""), metrics, records, rdir, calls, resumed,
                      errors, time.perf_counter() - t0)
    write_summary(res)
    return res


def _base_chat_many():
    from openk2.llm.base import LLMClient

    return LLMClient.chat_many


# -- summaries
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if 0.0 <= v <= 1.0 else f"{v:.3g}"
    return str(v)


def flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Top-level numbers plus ``<category>/<metric>`` for the per-category ones."""
    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for cat, m in (metrics.get("by_category") or {}).items():
        for k, v in m.items():
            out[f"{cat}/{k}"] = v
    return out


def summary_markdown(results: Sequence[SuiteResult]) -> str:
    """One table per suite (metric | value) plus an overview row per suite."""
    lines = ["| suite | model | items | headline | errors | model calls |", "|---|---|---|---|---|---|"]
    for r in results:
        head = headline(r)
        lines.append(f"| {r.suite} | {r.model} | {r.metrics.get('items', len(r.records))} | {head[0]} {_fmt(head[1])} "
                     f"| {r.errors} | {r.model_calls} |")
    for r in results:
        lines += ["", f"### {r.suite} ({r.model})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flat_metrics(r.metrics).items()]
    return "\n".join(lines) + "\n"


def headline(r: SuiteResult) -> tuple[str, Any]:
    for k in ("pass@1", "accuracy", "prompt_accuracy"):
        if k in r.metrics:
            return k, r.metrics[k]
    return "items", r.metrics.get("items", 0)


def write_summary(r: SuiteResult) -> None:
    data = {"suite": r.suite, "model": r.model, "metrics": r.metrics, "model_calls": r.model_calls,
            "resumed": r.resumed, "errors": r.errors, "seconds": round(r.seconds, 2)}
    atomic_write(r.dir / "summary.json", json.dumps(data, indent=2) + "\n")
    atomic_write(r.dir / "summary.md", summary_markdown([r]))


def plot_results(results: Sequence[SuiteResult], path: str | os.PathLike) -> Path:
    """A bar chart: the headline score per suite and per category (percent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for r in results:
        name, v = headline(r)
        labels.append(f"{r.suite}\n{name}")
        values.append(100 * float(v))
        for cat, m in (r.metrics.get("by_category") or {}).items():
            key = next((k for k in ("pass@1", "accuracy", "prompt_accuracy") if k in m), None)
            if key:
                labels.append(f"{r.suite}\n{cat}")
                values.append(100 * float(m[key]))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1), 3.6))
    bars = ax.bar(range(len(values)), values, color="#3b6ea8")
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=45, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    models = sorted({r.model for r in results})
    ax.set_title(f"openk2 eval: {', '.join(models)}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
