"""Tool execution for trajectories and gold-action replay.

Every call is checked before it runs (the tool is in the agent's set, the arguments are a JSON object that
validates against the tool's schema: :func:`openk2.chat.parse.checked_call`); a violation is returned as an
error observation, as a real tool would. Then:

* real execution where the tool is real and safe: the MCP filesystem server inside a throw-away directory
  (shown to the agent as ``/workspace``), the MCP memory server with its own throw-away file, and the
  stateful Python backends of PyPI ``bfcl-eval`` (:mod:`openk2.synth.bfcl`), a fresh instance each;
* otherwise a tool simulator that acts as a world model: an LLM that keeps a JSON state document across the
  trajectory's calls, answers consistently with it, and returns a state update (a JSON merge patch), with
  controlled randomness: each call is a success, a failure, a partial failure or an edge case at the
  configured rates, drawn from a generator seeded by the trajectory id and the call's index.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from openk2.chat.parse import ParseError, checked_call, tool_index
from openk2.llm.base import LLMClient
from openk2.synth.common import Stats, ask_json, rng_for
from openk2.synth.mcp import MCPSession, default_install_dir, server_by_name

WORKSPACE = "/workspace"  # what the agent sees as the filesystem server's root
EXECUTABLE_SERVERS = ("filesystem", "memory")


@dataclass
class SimRates:
    failure: float = 0.1
    partial: float = 0.05
    edge: float = 0.1

    def draw(self, rng: Any) -> str:
        x = rng.random()
        for mode, p in (("failure", self.failure), ("partial", self.partial), ("edge", self.edge)):
            if x < p:
                return mode
            x -= p
        return "success"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def parse_arguments(raw: Any) -> tuple[Any, str | None]:
    """An OpenAI tool call's ``arguments`` (a JSON string, or already a value) -> (value, problem)."""
    if isinstance(raw, (dict, list)):
        return raw, None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}, None
    try:
        return json.loads(raw), None
    except (TypeError, json.JSONDecodeError) as e:
        return None, f"arguments are not valid JSON ({getattr(e, 'msg', e)})"


def check_call(name: str, raw_args: Any, tools: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, ParseError | None]:
    """(arguments, None) for a call that may run, else (None, what is wrong) -- unknown tool, bad JSON, schema."""
    args, why = parse_arguments(raw_args)
    if why is not None:
        return None, ParseError("invalid_json", why, 0, name)
    got = checked_call(name, args, 0, 0, "", tool_index(tools))
    if isinstance(got, ParseError):
        return None, got
    return got.arguments, None


def error_observation(err: ParseError) -> str:
    return json.dumps({"error": {"unknown_tool": "unknown_tool", "schema_violation": "invalid_arguments",
                                 "invalid_json": "invalid_arguments", "not_an_object": "invalid_arguments"}.get(err.kind, err.kind),
                       "message": err.message}, ensure_ascii=False)


SIM_SCHEMA = {
    "type": "object",
    "properties": {"output": {"type": "string", "maxLength": 1500}, "updates": {"type": "object"}},
    "required": ["output", "updates"], "additionalProperties": False,
}

MODE_TEXT = {
    "success": "The call succeeds: return the result a real implementation would return, consistent with the state.",
    "failure": "The call FAILS: return a realistic error message (not found, permission denied, conflict, invalid value, "
               "service unavailable...) consistent with the state; updates must be {}.",
    "partial": "The call PARTIALLY fails: part of the work is done or only part of the data is returned; say clearly what "
               "failed; updates hold only what really changed.",
    "edge": "The call hits an edge case: a valid but unusual result (an empty list, a limit reached, a warning, a value at "
            "a boundary), consistent with the state.",
}


@dataclass
class CallRecord:
    id: str
    name: str
    arguments: Any
    output: str
    is_error: bool
    executor: str  # mcp:<server> | simulator | check
    mode: str = ""  # the simulator's drawn outcome


@dataclass
class Environment:
    """The tools of one trajectory (or one gold replay) and their state."""

    tools: list[dict[str, Any]]  # repository entries
    key: str  # seeds the simulator's randomness
    simulator: LLMClient | None = None
    rates: SimRates = field(default_factory=SimRates)
    initial_state: dict[str, Any] = field(default_factory=dict)
    initial_files: dict[str, str] = field(default_factory=dict)
    real: bool = True  # run the executable MCP servers for real
    prefix: Path | None = None
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.openai_tools = [e["tool"] for e in self.tools]
        self.by_name = {e["tool"]["function"]["name"]: e for e in self.tools}
        self.state: dict[str, Any] = copy.deepcopy(self.initial_state)
        self.log: list[CallRecord] = []
        self._sessions: dict[str, MCPSession] = {}
        self._bfcl: dict[str, Any] = {}
        self._stack = contextlib.AsyncExitStack()
        self._tmp: Path | None = None

    # -- lifetime
    async def __aenter__(self) -> "Environment":
        servers = sorted({e["server"] for e in self.tools if self._runs_real(e) and e["source"] == "mcp"})
        for api in sorted({e["bfcl"]["api"] for e in self.tools if self._runs_real(e) and e["source"] == "bfcl"}):
            from openk2.synth.bfcl import Backend

            self._bfcl[api] = Backend(api)
        if servers or self.initial_files:
            self._tmp = Path(tempfile.mkdtemp(prefix="openk2-env-"))
            fs = self._tmp / "filesystem"
            fs.mkdir()
            for rel, text in self.initial_files.items():
                p = (fs / rel.removeprefix(WORKSPACE).lstrip("/")).resolve()
                if fs.resolve() not in p.parents:
                    continue  # a path outside the workspace is ignored
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(text)
        try:
            for s in servers:
                sess = MCPSession(server_by_name(s), self._tmp / s, self.prefix or default_install_dir())
                self._sessions[s] = await self._stack.enter_async_context(sess)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        with contextlib.suppress(Exception):
            await self._stack.aclose()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _runs_real(self, e: dict[str, Any]) -> bool:
        if not self.real:
            return False
        return (e.get("source") == "mcp" and e.get("server") in EXECUTABLE_SERVERS) or e.get("source") == "bfcl"

    @property
    def executable(self) -> bool:
        """Every tool runs for real: gold actions can be replayed to an exact end state."""
        return bool(self.tools) and all(self._runs_real(e) for e in self.tools)

    # -- calls
    async def call(self, call_id: str, name: str, raw_args: Any) -> CallRecord:
        args, err = check_call(name, raw_args, self.openai_tools)
        if err is not None:
            self.stats.add(f"calls.rejected:{err.kind}")
            rec = CallRecord(call_id, name, raw_args, error_observation(err), True, "check")
        else:
            entry = self.by_name[name]
            if self._runs_real(entry) and entry["source"] == "bfcl":
                text, is_error = self._bfcl[entry["bfcl"]["api"]].call(name, args)
                rec = CallRecord(call_id, name, args, text, is_error, f"bfcl:{entry['bfcl']['api']}")
            elif self._runs_real(entry):
                rec = await self._call_mcp(call_id, entry, args)
            else:
                rec = await self._call_sim(call_id, entry, args)
        self.stats.add(f"calls.{rec.executor.split(':')[0]}")
        self.log.append(rec)
        return rec

    def _to_real(self, value: Any) -> Any:
        root = str(self._tmp / "filesystem")
        if isinstance(value, str):
            return root + value[len(WORKSPACE):] if value == WORKSPACE or value.startswith(WORKSPACE + "/") else value
        if isinstance(value, list):
            return [self._to_real(v) for v in value]
        if isinstance(value, dict):
            return {k: self._to_real(v) for k, v in value.items()}
        return value

    def _to_virtual(self, text: str) -> str:
        root = str(self._tmp / "filesystem")
        real_root = str((self._tmp / "filesystem").resolve())
        return text.replace(real_root, WORKSPACE).replace(root, WORKSPACE)

    async def _call_mcp(self, call_id: str, entry: dict[str, Any], args: dict[str, Any]) -> CallRecord:
        server = entry["server"]
        real_args = self._to_real(args) if server == "filesystem" else args
        text, is_error = await self._sessions[server].call_tool(entry["tool"]["function"]["name"], real_args)
        return CallRecord(call_id, entry["tool"]["function"]["name"], args, self._to_virtual(text), is_error, f"mcp:{server}")

    async def _call_sim(self, call_id: str, entry: dict[str, Any], args: dict[str, Any]) -> CallRecord:
        name = entry["tool"]["function"]["name"]
        if self.simulator is None:
            return CallRecord(call_id, name, args, json.dumps({"error": "tool_unavailable",
                                                               "message": "no simulator for this tool"}), True, "simulator")
        mode = self.rates.draw(rng_for(self.key, len(self.log), name))
        sem = entry.get("semantics") or {}
        messages = [
            {"role": "system", "content": (
                "You are the backend of a software application, acting as a world model for its tools. You keep the "
                "application's state as a JSON document. Answer every tool call consistently with the state and with "
                "earlier answers; never contradict them. Reply with JSON: `output` (what the tool returns, as its text "
                "or JSON) and `updates` (a JSON merge patch applied to the state: changed keys, null deletes; {} if "
                "nothing changes).")},
            {"role": "user", "content": (
                f"Tools of this application:\n{json.dumps(self.openai_tools, ensure_ascii=False)[:6000]}\n\n"
                f"Current state:\n{json.dumps(self.state, ensure_ascii=False)[:6000]}\n\n"
                f"Call: {name}({json.dumps(args, ensure_ascii=False)})\n"
                + (f"This tool reads: {sem.get('reads')}; changes: {sem.get('changes')}\n" if sem else "")
                + f"Outcome: {MODE_TEXT[mode]}")},
        ]
        out = await ask_json(self.simulator, messages, SIM_SCHEMA, self.stats, "simulator", max_tokens=700)
        if out is None:
            return CallRecord(call_id, name, args, json.dumps({"error": "internal_error", "message": "the service did not answer"}),
                              True, "simulator", "no_answer")
        if mode != "failure" and isinstance(out.get("updates"), dict):
            self.state = merge_patch(self.state, out["updates"])
        return CallRecord(call_id, name, args, out["output"], mode == "failure", "simulator", mode)

    # -- state
    def end_state(self) -> dict[str, Any]:
        """The state a gold replay and a trajectory are compared on: files of the workspace, the memory
        server's knowledge graph, the simulator's JSON document."""
        out: dict[str, Any] = {}
        if self._tmp is not None:
            fs = self._tmp / "filesystem"
            files = {}
            for p in sorted(fs.rglob("*")):
                if p.is_file():
                    files[str(p.relative_to(fs))] = p.read_text(errors="replace")
                elif p.is_dir() and not any(p.iterdir()):
                    files[str(p.relative_to(fs)) + "/"] = None
            out["files"] = files
            mem = self._tmp / "memory" / "memory.jsonl"
            if "memory" in self._sessions:
                lines = mem.read_text().splitlines() if mem.exists() else []
                out["memory"] = sorted((json.loads(x) for x in lines if x.strip()), key=lambda d: json.dumps(d, sort_keys=True))
        if self._bfcl:
            out["bfcl"] = {api: b.state() for api, b in sorted(self._bfcl.items())}
        if any(not self._runs_real(e) for e in self.tools):
            out["simulated"] = self.state
        return out
