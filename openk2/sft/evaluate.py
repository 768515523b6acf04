"""SFT evaluation: held-out assistant-token loss, and tool calls generated live on held-out tasks.

`tool_call_eval(chat_model, tasks)` runs every held-out single-call task (the messages before a
gold tool call, the declared tools) through the serving path itself (``ChatModel.prepare_chat``
with ``tool_choice="auto"``, the engine's ``generate_batch``, greedy, ``ChatModel.finish_chat``),
so it measures what ``openk2 serve`` would answer. Per task:

- ``called``: the answer opens a tool call;
- ``parsed``: it holds a well-formed call (section / tags closed, id, JSON object arguments);
- ``named``: the call names a declared tool;
- ``valid``: its arguments validate against that tool's JSON schema and the answer has no other
  problem (no stray text, no second malformed call): the issue's "parse and validate";
- ``exact``: name and arguments equal the gold call (JSON equality, numbers compared as numbers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch

STRUCTURAL = {"truncated_section", "truncated_call", "bad_id", "bad_call", "invalid_json", "not_an_object"}


@dataclass
class Task:
    id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    gold: dict[str, Any]  # {"name", "arguments"}


def single_call_tasks(conversations: Sequence[Any], limit: int | None = None) -> list[Task]:
    out = []
    for c in conversations:
        t = c.single_call_task()
        if t is not None:
            out.append(Task(f"{c.source}:{c.id}", t[0], c.tools, t[1]))
        if limit is not None and len(out) >= limit:
            break
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b if isinstance(a, bool) and isinstance(b, bool) else False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def score(result: Any, tools: Sequence[dict[str, Any]], gold: dict[str, Any] | None, marker: str | None,
          text: str) -> dict[str, bool]:
    """One answer's outcome (see the module docstring) from its ParseResult."""
    kinds = {e.kind for e in result.errors}
    called = bool(marker and marker in text)
    first_ok = result.tool_calls[0] if result.tool_calls else None
    parsed = called and (first_ok is not None or bool(kinds & {"unknown_tool", "schema_violation"})) and \
        not (kinds & STRUCTURAL)
    named = parsed and (first_ok is not None or "schema_violation" in kinds) and "unknown_tool" not in kinds
    valid = named and first_ok is not None and not result.errors
    exact = bool(valid and gold is not None and len(result.tool_calls) == 1 and first_ok.name == gold["name"]
                 and _same(first_ok.arguments, gold["arguments"]))
    return {"called": called, "parsed": parsed, "named": named, "valid": valid, "exact": exact}


@torch.no_grad()
def tool_call_eval(chat_model: Any, tasks: Sequence[Task], max_tokens: int = 192, samples: int = 3,
                   batch: int = 16) -> dict[str, Any]:
    """Generate an answer to every task (greedy) and score it; returns rates, counts and a few samples."""
    from openk2.serve.engine import GenRequest, InvalidRequest, SamplingParams, generate_batch, prepare

    rows, reqs = [], []
    for t in tasks:
        try:
            ids, params, plan = chat_model.prepare_chat(t.messages, t.tools, "auto",
                                                        SamplingParams(max_tokens=max_tokens, temperature=0.0))
            if len(ids) + 1 >= chat_model.backend.max_context:
                raise InvalidRequest(f"prompt of {len(ids)} tokens exceeds the context")
            params.max_tokens = min(max_tokens, chat_model.backend.max_context - len(ids) - 1)
            req = prepare(GenRequest(ids, params), chat_model)
        except (InvalidRequest, ValueError) as e:
            rows.append({"task": t, "error": str(e)})
            continue
        rows.append({"task": t, "req": req, "plan": plan})
        reqs.append(req)
    for i in range(0, len(reqs), batch):
        generate_batch(chat_model, reqs[i:i + batch])
    counts = {k: 0 for k in ("called", "parsed", "named", "valid", "exact")}
    shown, failures = [], 0
    for r in rows:
        t = r["task"]
        if "req" not in r:
            failures += 1
            continue
        req = r["req"]
        result = chat_model.finish_chat(req.text, r["plan"], t.tools, complete=True)
        s = score(result, t.tools, t.gold, chat_model.tool_call_marker, req.text)
        for k, v in s.items():
            counts[k] += int(v)
        if len(shown) < samples:
            shown.append({"id": t.id, "user": t.messages[-1].get("content", ""), "tools": [x["function"]["name"]
                                                                                      for x in t.tools],
                          "answer": req.text, "gold": t.gold, "score": s,
                          "errors": [str(e) for e in result.errors]})
    n = len(rows)
    out: dict[str, Any] = {"tasks": n, "not_run": failures, **counts}
    for k in counts:
        out[f"{k}_rate"] = round(counts[k] / n, 4) if n else 0.0
    out["samples"] = shown
    return out


def heldout_loss(model: Any, batches: Sequence[dict[str, torch.Tensor]], loss_fn, device) -> dict[str, float]:
    """Mean cross-entropy over the assistant tokens of held-out batches (every target counted once)."""
    from openk2.train.trainer import _to

    total, n = 0.0, 0
    for b in batches:
        loss, k = loss_fn(model, _to(b, device))
        total += float(loss) * k
        n += k
    return {"val_loss": total / max(n, 1), "val_tokens": n}


def format_dialogue(sample: dict[str, Any]) -> str:
    gold = json.dumps(sample["gold"], ensure_ascii=False)
    return (f"**{sample['id']}** (tools: {', '.join(sample['tools'])})\n\n"
            f"- user: {sample['user']}\n- model: `{sample['answer'][:600]!r}`\n- gold: `{gold}`\n"
            f"- score: {', '.join(k for k, v in sample['score'].items() if v) or 'nothing'}"
            + (f"; errors: {'; '.join(sample['errors'])[:300]}" if sample["errors"] else "") + "\n")
