"""Parse a K2 completion back into OpenAI-style ``tool_calls``.

Anything malformed (a truncated section, invalid JSON, an unknown tool,
arguments that break the tool's JSON schema) becomes a :class:`ParseError` in
``ParseResult.errors``; the parser never raises on model output. The format
is the one :mod:`openk2.chat.render` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from openk2.chat.render import K2_CALL_ID, STOP_STRINGS
from openk2.chat.schema import schema_errors
from openk2.data import special_tokens as st


@dataclass
class ToolCall:
    id: str  # functions.NAME:IDX
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass
class ParseError:
    """One malformed piece of a completion. ``kind`` is one of
    truncated_section, truncated_call, bad_id, invalid_json, not_an_object,
    unknown_tool, schema_violation, stray_text."""

    kind: str
    message: str
    index: int | None = None  # position of the call in the section
    name: str | None = None
    raw: str = ""

    def __str__(self) -> str:
        where = f" (call {self.index}{', ' + self.name if self.name else ''})" if self.index is not None else ""
        return f"{self.kind}{where}: {self.message}"


@dataclass
class ParseResult:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)
    finished: bool = False  # the completion reached <|im_end|> / [EOS]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_openai_message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        elif msg["content"] is None:
            msg["content"] = ""
        return msg


def tool_index(tools: Iterable[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """name -> JSON schema of the parameters, from an OpenAI-style tool list."""
    out: dict[str, dict[str, Any]] = {}
    for t in tools or []:
        fn = t.get("function", t)
        out[fn["name"]] = fn.get("parameters") or {"type": "object"}
    return out


def _cut_at_stop(text: str) -> tuple[str, bool]:
    cut = min((p for p in (text.find(s) for s in STOP_STRINGS) if p >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _parse_call(raw: str, index: int, tools: dict[str, dict[str, Any]] | None) -> ToolCall | ParseError:
    if st.TOOL_CALL_ARGUMENT_BEGIN not in raw:
        return ParseError("truncated_call", "no <|tool_call_argument_begin|> after the call id", index, raw=raw)
    call_id, args_text = raw.split(st.TOOL_CALL_ARGUMENT_BEGIN, 1)
    m = K2_CALL_ID.match(call_id)
    if not m:
        return ParseError("bad_id", f"call id {call_id.strip()!r} is not functions.NAME:IDX", index, raw=raw)
    name = m.group(1)
    try:
        args = json.loads(args_text)
    except json.JSONDecodeError as e:
        return ParseError("invalid_json", f"arguments are not JSON ({e.msg} at char {e.pos})", index, name, raw)
    return checked_call(name, args, m.group(2), index, raw, tools)


def checked_call(name: str, args: Any, call_index: Any, index: int, raw: str,
                 tools: dict[str, dict[str, Any]] | None) -> ToolCall | ParseError:
    """A parsed call's arguments checked (an object, a declared tool, its schema): the call, or what is wrong."""
    if not isinstance(args, dict):
        return ParseError("not_an_object", f"arguments must be a JSON object, got {type(args).__name__}", index, name, raw)
    if tools is not None:
        if name not in tools:
            known = ", ".join(sorted(tools)) or "none"
            return ParseError("unknown_tool", f"no tool named {name!r} (declared: {known})", index, name, raw)
        problems = schema_errors(args, tools[name])
        if problems:
            return ParseError("schema_violation", "; ".join(problems), index, name, raw)
    return ToolCall(f"functions.{name}:{call_index}", name, args)


def parse_tool_calls(text: str, tools: Sequence[dict[str, Any]] | None = None) -> ParseResult:
    """Parse a raw assistant completion (decoded with special tokens kept).

    ``tools`` (OpenAI-style list) turns on the unknown-tool and JSON-schema
    checks; without it any well-formed call is accepted. Only valid calls go
    into ``tool_calls``; every problem is listed in ``errors``.
    """
    text, finished = _cut_at_stop(text)
    declared = tool_index(tools) if tools is not None else None
    begin = text.find(st.TOOL_CALLS_SECTION_BEGIN)
    if begin < 0:
        return ParseResult(content=text, finished=finished)
    result = ParseResult(content=text[:begin], finished=finished)
    rest = text[begin + len(st.TOOL_CALLS_SECTION_BEGIN) :]
    end = rest.find(st.TOOL_CALLS_SECTION_END)
    if end < 0:
        section, after = rest, ""
        result.errors.append(ParseError("truncated_section", "<|tool_calls_section_end|> is missing"))
    else:
        section, after = rest[:end], rest[end + len(st.TOOL_CALLS_SECTION_END) :]
    if after.strip():
        result.errors.append(ParseError("stray_text", f"text after the tool-call section: {after[:80]!r}", raw=after))

    pieces = section.split(st.TOOL_CALL_BEGIN)
    if pieces[0].strip():
        result.errors.append(ParseError("stray_text", f"text inside the section before a call: {pieces[0][:80]!r}", raw=pieces[0]))
    for index, piece in enumerate(pieces[1:]):
        if st.TOOL_CALL_END in piece:
            raw, trailing = piece.split(st.TOOL_CALL_END, 1)
            if trailing.strip():
                result.errors.append(ParseError("stray_text", f"text between calls: {trailing[:80]!r}", index, raw=trailing))
        else:
            result.errors.append(ParseError("truncated_call", "<|tool_call_end|> is missing", index, raw=piece))
            continue
        parsed = _parse_call(raw, index, declared)
        if isinstance(parsed, ParseError):
            result.errors.append(parsed)
        else:
            result.tool_calls.append(parsed)
    return result


def format_parse_errors(errors: Sequence[ParseError]) -> str:
    return "; ".join(str(e) for e in errors)
