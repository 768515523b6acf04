"""Agents and tasks (K2 report section 3.1.1, Fig. 8).

An agent is a system prompt plus a tool set sampled from the repository: a coherent set from one toolkit (an
MCP server or one synthetic domain) or a mixture of toolkits. For each agent, tasks go from simple to
complex (one call, several calls, multi-turn with information the user holds back), each with a rubric:
success criteria, the expected tool-use pattern (gold actions where one exists) and evaluation checkpoints.
Where every tool of the agent is executable, the gold actions are replayed in a fresh environment and the
resulting state becomes the task's expected end state (as APIGen-MT and tau2-bench do)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Sequence

from openk2.llm.base import LLMClient
from openk2.synth.common import Stats, ask_json, rng_for, stable_id
from openk2.synth.env import EXECUTABLE_SERVERS, WORKSPACE, Environment, check_call

LEVELS = ("single_call", "multi_call", "multi_turn")


def toolkit_of(entry: dict[str, Any]) -> str:
    if entry["source"] == "mcp":
        return f"mcp:{entry['server']}"
    if entry["source"] == "bfcl":
        return entry["server"]
    return f"syn:{entry['category']}/{entry['domain']}"


def sample_agents(repo: Sequence[dict[str, Any]], n: int, seed: int = 0, exec_fraction: float = 0.3,
                  mixture_fraction: float = 0.3, max_tools: int = 8) -> list[dict[str, Any]]:
    """`n` agent tool sets (deterministic in `seed`): executable ones (filesystem/memory MCP servers) first,
    then coherent single-toolkit sets and mixtures. Names are unique within a set."""
    kits: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in repo:
        kits[toolkit_of(e)].append(e)
    exec_tools = [e for e in repo if (e["source"] == "mcp" and e.get("server") in EXECUTABLE_SERVERS) or e["source"] == "bfcl"]
    names = sorted(k for k in kits if len(kits[k]) >= 1)
    out = []
    n_exec = round(n * exec_fraction) if exec_tools else 0
    for i in range(n):
        rng = rng_for("agent", seed, i)
        if i < n_exec:
            # executable agents get whole real toolkits (as an MCP client mounts a server): the filesystem
            # server, the memory server, both, or one BFCL API, taken in turn
            kind = "executable"
            mcp = sorted({e["server"] for e in exec_tools if e["source"] == "mcp"})
            combos = [(s,) for s in mcp] + ([tuple(mcp)] if len(mcp) > 1 else [])
            combos += [(s,) for s in sorted({e["server"] for e in exec_tools if e["source"] == "bfcl"})]
            combo = combos[i % len(combos)]
            chosen = [e for e in exec_tools if e["server"] in combo]
        elif rng.random() < mixture_fraction and len(names) >= 2:
            kind = "mixture"
            chosen = []
            for kit in rng.sample(names, min(len(names), rng.randint(2, 3))):
                chosen += rng.sample(kits[kit], min(len(kits[kit]), rng.randint(1, 3)))
        else:
            kind = "domain"
            kit = rng.choice(names)
            chosen = rng.sample(kits[kit], min(len(kits[kit]), rng.randint(2, max_tools)))
        seen, tools = set(), []
        for e in chosen:
            nm = e["tool"]["function"]["name"]
            if nm not in seen:
                seen.add(nm)
                tools.append(e)
        tools.sort(key=lambda e: e["id"])
        out.append({"id": stable_id("agent", seed, i, [e["id"] for e in tools]), "kind": kind,
                    "toolkits": sorted({toolkit_of(e) for e in tools}), "tool_ids": [e["id"] for e in tools]})
    return out


def tool_lines(tools: Sequence[dict[str, Any]]) -> str:
    return "\n".join(f"- {t['tool']['function']['name']}: {t['tool']['function'].get('description', '')[:300]}" for t in tools)


AGENT_SCHEMA = {
    "type": "object",
    "properties": {"role": {"type": "string", "minLength": 3, "maxLength": 80},
                   "system_prompt": {"type": "string", "minLength": 20, "maxLength": 1500}},
    "required": ["role", "system_prompt"], "additionalProperties": False,
}


async def write_agent(client: LLMClient, agent: dict[str, Any], tools: Sequence[dict[str, Any]], stats: Stats) -> dict[str, Any]:
    ws = (f" Files live under {WORKSPACE}." if any(t.get("server") == "filesystem" for t in tools) else "")
    msgs = [{"role": "system", "content": "You write system prompts for AI assistants that use tools. Reply with JSON only."},
            {"role": "user", "content": (
                f"An assistant has these tools:\n{tool_lines(tools)}\n\nGive it a role (a few words) and a system prompt "
                "(2-5 sentences, second person) that says whom it serves, what it can do with these tools, and how it "
                f"should behave: ask for missing details, confirm before changing or deleting data, report results.{ws}")}]
    out = await ask_json(client, msgs, AGENT_SCHEMA, stats, "agent_writer", max_tokens=500)
    if out is None:
        return {**agent, "ok": False, "reason": "llm_invalid_json"}
    prompt = out["system_prompt"].strip() + ws
    return {**agent, "ok": True, "role": out["role"].strip(), "system_prompt": prompt}


def task_schema(tool_names: Sequence[str], world: str) -> dict[str, Any]:
    props: dict[str, Any] = {
        "user_goal": {"type": "string", "minLength": 10, "maxLength": 600},
        "known_info": {"type": "string", "maxLength": 400},
        "hidden_info": {"type": "string", "maxLength": 400},
        "success_criteria": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "string", "minLength": 5, "maxLength": 200}},
        "checkpoints": {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 5, "maxLength": 200}},
        "gold_actions": {"type": "array", "maxItems": 6, "items": {
            "type": "object", "properties": {"name": {"type": "string", "enum": list(tool_names)}, "arguments": {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}},
    }
    req = list(props)
    if world == "backend":  # a BFCL backend starts from its own default data
        return {"type": "object", "properties": props, "required": req, "additionalProperties": False}
    files = world == "files"
    if files:
        props["initial_files"] = {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"path": {"type": "string", "pattern": "^/workspace/[A-Za-z0-9_./-]{1,60}$"},
                                             "content": {"type": "string", "maxLength": 400}},
            "required": ["path", "content"], "additionalProperties": False}}
    else:
        props["initial_state"] = {"type": "object"}
    req.append("initial_files" if files else "initial_state")
    return {"type": "object", "properties": props, "required": req, "additionalProperties": False}


def tool_specs(tools: Sequence[dict[str, Any]], budget: int = 12000) -> str:
    """One compact JSON line per tool (name, description, parameters), whole tools only, within `budget` chars."""
    lines, used = [], 0
    for t in tools:
        fn = t["tool"]["function"]
        line = json.dumps({"name": fn["name"], "description": fn.get("description", "")[:400],
                           "parameters": fn.get("parameters", {})}, ensure_ascii=False)
        if lines and used + len(line) > budget:
            break
        lines.append(line)
        used += len(line) + 1
    return "\n".join(lines)


LEVEL_TEXT = {
    "single_call": "a simple task that needs exactly one tool call",
    "multi_call": "a task that needs two to four tool calls, where later calls use results of earlier ones",
    "multi_turn": "a task that needs several tool calls AND a detail the user only gives when the assistant asks for it "
                  "(put that detail in hidden_info; the first request must not contain it)",
}


def task_prompt(agent: dict[str, Any], tools: Sequence[dict[str, Any]], level: str, world: str) -> list[dict[str, str]]:
    specs = tool_specs(tools)
    world = {"files": f"The tools act on a fresh folder {WORKSPACE} (and an empty knowledge graph); list the files that "
                      "exist before the task in initial_files (paths under /workspace/).",
             "backend": "The tools act on a real application that starts with its own default data (accounts, records, "
                        "files); gold actions that need an id or a name should first look it up with a read-only tool.",
             "state": "The tools act on an application whose state you describe in initial_state (a small JSON document "
                      "with the records the task needs)."}[world]
    return [{"role": "system", "content": "You write evaluation tasks for tool-using AI assistants. Reply with JSON only."},
            {"role": "user", "content": (
                f"Assistant: {agent.get('role', '')}\nSystem prompt: {agent.get('system_prompt', '')}\nTools, one JSON per line:\n{specs}\n\n"
                f"Write {LEVEL_TEXT[level]}. {world}\n"
                "user_goal: what the user wants, in the user's words. known_info: details the user gives when asked. "
                "success_criteria: checkable statements that must hold at the end. checkpoints: intermediate steps a "
                "grader checks. gold_actions: the tool calls (name and arguments valid for the tool's schema) that "
                "solve the task, in order.")}]


async def write_task(client: LLMClient, agent: dict[str, Any], tools: Sequence[dict[str, Any]], level: str, task_id: str,
                     stats: Stats, prefix: Any = None, replay: bool = True) -> dict[str, Any]:
    """One task with its rubric; its gold actions checked against the schemas and, for executable agents,
    replayed in a fresh environment to the expected end state."""
    executable = agent.get("kind") == "executable"
    names = [t["tool"]["function"]["name"] for t in tools]
    files = executable and any(t["source"] == "mcp" for t in tools)
    world = "files" if files else ("backend" if executable else "state")
    base = {"id": task_id, "agent_id": agent["id"], "level": level, "executable": executable}
    out = await ask_json(client, task_prompt(agent, tools, level, world), task_schema(names, world), stats,
                         "task_generator", max_tokens=1024)
    if out is None:
        return {**base, "ok": False, "reason": "llm_invalid_json"}
    task = {k: out[k] for k in ("user_goal", "known_info", "hidden_info", "success_criteria", "checkpoints", "gold_actions")}
    task["expected_tools"] = list(dict.fromkeys(a["name"] for a in task["gold_actions"]))
    if world == "files":
        task["initial_files"] = {f["path"]: f["content"] for f in out.get("initial_files", [])}
    elif world == "state":
        task["initial_state"] = out.get("initial_state", {})
    if not task["gold_actions"] and level != "single_call":
        stats.add("tasks.no_gold_actions")
    openai_tools = [t["tool"] for t in tools]
    for i, a in enumerate(task["gold_actions"]):
        _, err = check_call(a["name"], a["arguments"], openai_tools)
        if err is not None:
            return {**base, "ok": False, "reason": f"gold_invalid:{err.kind}", "detail": f"gold action {i}: {err}", "task": task}
    rec = {**base, "ok": True, "task": task, "gold_end_state": None}
    if executable and replay:
        if not task["gold_actions"]:
            return {**base, "ok": False, "reason": "gold_missing", "task": task}
        async with Environment(list(tools), task_id, initial_files=task.get("initial_files") or {}, prefix=prefix) as env:
            for i, a in enumerate(task["gold_actions"]):
                r = await env.call(f"functions.{a['name']}:{i}", a["name"], a["arguments"])
                if r.is_error:
                    return {**base, "ok": False, "reason": "gold_replay_failed", "detail": f"gold action {i}: {r.output[:300]}",
                            "task": task}
            rec["gold_end_state"] = env.end_state()
    return rec
