"""Filtering (K2 report section 3.1.1): rule checks that need no model, then an LLM judge that scores the
trajectory against its task's rubric item by item (pass / fail / not_evaluable, each with a reason).

A trajectory is kept only when every rule check passes and every success criterion is judged ``pass``
(checkpoints may be ``not_evaluable``, none may ``fail``). Every rejection keeps its reasons.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from openk2.chat.render import K2_CALL_ID
from openk2.llm.base import LLMClient
from openk2.synth.common import Stats, ask_json

ID_RE = re.compile(r"^functions\.([A-Za-z0-9_\-.]+):(\d+)$")
# text in an assistant message that pretends to be a tool's output or a call outside the tool-call channel
FAKE_RESULT = re.compile(r"<\|tool_call|## Return of functions\.|<tool_response>|<tool_call>|\"tool_call_id\"")


def rule_checks(traj: dict[str, Any], gold_end_state: dict[str, Any] | None) -> list[str]:
    """Violations (empty when all rules hold): K2 call ids, one real result per call, no fabricated tool
    results, the user ended the dialogue, the end state equals the gold end state where one exists."""
    problems: list[str] = []
    log = {c["id"]: c for c in traj.get("calls", [])}
    pending: dict[str, str] = {}
    expected_idx = 0
    answered: set[str] = set()
    for i, m in enumerate(traj["messages"]):
        role = m.get("role")
        if role == "assistant":
            if m.get("content") and FAKE_RESULT.search(m["content"]):
                problems.append(f"fabricated_tool_text: message {i} writes tool-call or tool-result markup in its content")
            for c in m.get("tool_calls") or []:
                mm = ID_RE.match(c.get("id", ""))
                name = (c.get("function") or {}).get("name")
                if not mm or not K2_CALL_ID.match(c.get("id", "")):
                    problems.append(f"bad_call_id: {c.get('id')!r} is not functions.NAME:IDX")
                    continue
                if mm.group(1) != name:
                    problems.append(f"bad_call_id: {c['id']} names {mm.group(1)!r} but calls {name!r}")
                if int(mm.group(2)) != expected_idx:
                    problems.append(f"bad_call_id: {c['id']} should have index {expected_idx}")
                expected_idx += 1
                pending[c["id"]] = name
        elif role == "tool":
            cid = m.get("tool_call_id")
            if cid not in pending:
                problems.append(f"orphan_tool_result: message {i} answers {cid!r}, which no earlier call made")
                continue
            if cid in answered:
                problems.append(f"duplicate_tool_result: {cid}")
            answered.add(cid)
            rec = log.get(cid)
            if rec is None or rec["output"] != m.get("content"):
                problems.append(f"fabricated_tool_result: message {i} ({cid}) is not what the tool returned")
    for cid in pending:
        if cid not in answered:
            problems.append(f"unanswered_call: {cid}")
    if traj.get("end") != "stop":
        problems.append(f"no_user_stop: the dialogue ended by {traj.get('end')}")
    if gold_end_state is not None:
        real = ("files", "memory", "bfcl")
        got = {k: v for k, v in (traj.get("end_state") or {}).items() if k in real}
        want = {k: v for k, v in gold_end_state.items() if k in real}
        if json.dumps(got, sort_keys=True) != json.dumps(want, sort_keys=True):
            problems.append("end_state_mismatch: the final files/memory/backend state differ from the gold replay's")
    return problems


VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"verdicts": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
        "type": "object",
        "properties": {"item": {"type": "integer", "minimum": 1, "maximum": 8},
                       "verdict": {"type": "string", "enum": ["pass", "fail", "not_evaluable"]},
                       "reason": {"type": "string", "minLength": 3, "maxLength": 300}},
        "required": ["item", "verdict", "reason"], "additionalProperties": False}}},
    "required": ["verdicts"], "additionalProperties": False,
}


def transcript(messages: Sequence[dict[str, Any]], limit: int = 9000) -> str:
    lines = []
    for m in messages:
        if m["role"] == "system":
            continue
        if m["role"] == "assistant" and m.get("tool_calls"):
            for c in m["tool_calls"]:
                lines.append(f"ASSISTANT CALLS {c['function']['name']}({c['function']['arguments']}) [{c['id']}]")
            if m.get("content"):
                lines.append(f"ASSISTANT: {m['content']}")
        elif m["role"] == "tool":
            lines.append(f"TOOL RESULT [{m['tool_call_id']}]: {m['content'][:800]}")
        else:
            lines.append(f"{m['role'].upper()}: {m['content']}")
    text = "\n".join(lines)
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2:]


def rubric_items(task: dict[str, Any]) -> list[tuple[str, str]]:
    items = [("success", s) for s in task.get("success_criteria", [])]
    items += [("checkpoint", s) for s in task.get("checkpoints", [])]
    if task.get("gold_actions"):
        pattern = ", ".join(f"{a['name']}({json.dumps(a['arguments'], ensure_ascii=False)[:120]})" for a in task["gold_actions"])
        items.append(("checkpoint", f"The tool use follows the expected pattern (equivalent calls in a sensible order): {pattern}"))
    return items[:8]


async def judge(client: LLMClient, task: dict[str, Any], traj: dict[str, Any], stats: Stats) -> dict[str, Any]:
    """Per-item verdicts {kind, criterion, verdict, reason}; a missing verdict is not_evaluable."""
    items = rubric_items(task)
    listing = "\n".join(f"{i}. [{k}] {c}" for i, (k, c) in enumerate(items, 1))
    msgs = [{"role": "system", "content": (
                "You grade transcripts of an AI assistant that uses tools. Judge each rubric item strictly from the "
                "transcript: 'pass' if it clearly holds, 'fail' if it does not, 'not_evaluable' if the transcript cannot "
                "show it. Tool results are real; the assistant's claims are not evidence unless a tool result supports "
                "them. Reply with JSON only.")},
            {"role": "user", "content": f"User's goal: {task['user_goal']}\n\nRubric:\n{listing}\n\nTranscript:\n{transcript(traj['messages'])}\n\n"
                                        "Give one verdict per rubric item, with its item number and a short reason."}]
    out = await ask_json(client, msgs, VERDICT_SCHEMA, stats, "judge", max_tokens=900)
    if out is None:
        return {"ok": False, "items": [], "error": "llm_invalid_json"}
    got = {v["item"]: v for v in out["verdicts"]}
    verdicts = []
    for i, (kind, crit) in enumerate(items, 1):
        v = got.get(i)
        if v is None:
            stats.add("judge.missing_verdict")
            verdicts.append({"kind": kind, "criterion": crit, "verdict": "not_evaluable", "reason": "the judge gave no verdict"})
        else:
            verdicts.append({"kind": kind, "criterion": crit, "verdict": v["verdict"], "reason": v["reason"]})
    return {"ok": True, "items": verdicts}


def decide(rules: list[str], verdict: dict[str, Any]) -> tuple[bool, list[str]]:
    """(keep, rejection reasons)."""
    reasons = [r.split(":", 1)[0] for r in rules]
    if not verdict.get("ok"):
        reasons.append(f"judge_{verdict.get('error', 'failed')}")
    else:
        for v in verdict["items"]:
            if v["kind"] == "success" and v["verdict"] != "pass":
                reasons.append(f"criterion_{v['verdict']}")
            elif v["kind"] == "checkpoint" and v["verdict"] == "fail":
                reasons.append("checkpoint_fail")
    return not reasons, list(dict.fromkeys(reasons))
