"""Kimi K2's chat and tool-call format: render conversations, mask SFT losses, parse tool calls.

A conversation renders to (shared/RESOURCES.md, K2 chat format)::

    <|im_system|>tool_declare<|im_middle|>[tools JSON]<|im_end|>
    <|im_system|>system<|im_middle|>You are a helpful agent.<|im_end|>
    <|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>
    <|im_assistant|>assistant<|im_middle|>Let me check.<|tool_calls_section_begin|>
        <|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>
    <|tool_calls_section_end|><|im_end|>
    <|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0
    {"temp_c": 21}<|im_end|>
    <|im_assistant|>assistant<|im_middle|>It is 21 C in Paris.<|im_end|>

(one line per turn here for reading; the real string has no newlines between
markers). Tool-call ids keep K2's ``functions.NAME:IDX`` form, IDX counting calls
over the whole conversation; OpenAI-style ids (``call_abc``) are rewritten to it.

For SFT, every assistant turn's content and its closing ``<|im_end|>`` carry
loss; role headers, the system prompt, user turns and tool results do not.
Segments are split at special tokens only, so encoding them one by one gives
the same ids as encoding the whole string.

Parsing turns a model's raw completion back into OpenAI-style ``tool_calls``.
Anything malformed (a truncated section, invalid JSON, an unknown tool,
arguments that break the tool's JSON schema) becomes a :class:`ParseError` in
``ParseResult.errors``; the parser never raises on model output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

from openk2.data import special_tokens as st

Message = dict[str, Any]

DEFAULT_ROLE_NAMES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
ROLE_MARKER = {"system": st.IM_SYSTEM, "user": st.IM_USER, "assistant": st.IM_ASSISTANT, "tool": st.IM_SYSTEM}
GENERATION_PROMPT = f"{st.IM_ASSISTANT}assistant{st.IM_MIDDLE}"
# Where an assistant completion ends: K2 closes a turn with <|im_end|>; a
# pre-trained-only checkpoint may emit [EOS] instead.
STOP_STRINGS = (st.IM_END, st.EOS)

_K2_ID = re.compile(r"^\s*(?:functions\.)?([A-Za-z0-9_\-.]+?):(\d+)\s*$")


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool  # True: these tokens carry SFT loss


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


# --------------------------------------------------------------------------- render


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type", "text") == "text":
                parts.append(str(p.get("text", "")))
            else:
                raise ValueError(f"unsupported content part: {p!r}")
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def tools_json(tools: Sequence[dict[str, Any]]) -> str:
    """The tool_declare payload: OpenAI-style tool list as compact JSON."""
    return json.dumps(list(tools), ensure_ascii=False, separators=(",", ":"))


class _IdMap:
    """Rewrites tool-call ids into K2's functions.NAME:IDX, IDX counting calls over the conversation."""

    def __init__(self) -> None:
        self.count = 0
        self.mapping: dict[str, str] = {}

    def call_id(self, original: str | None, name: str) -> str:
        m = _K2_ID.match(original or "")
        new = f"functions.{name}:{self.count}"
        if m and m.group(1) == name:
            new = f"functions.{name}:{m.group(2)}"
        self.count += 1
        if original:
            self.mapping[original] = new
        return new

    def result_id(self, original: str | None) -> str:
        if original in self.mapping:
            return self.mapping[original]
        m = _K2_ID.match(original or "")
        if m:
            return f"functions.{m.group(1)}:{m.group(2)}"
        return original or "functions.unknown:0"


def render_segments(
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    train_on: str = "all",
) -> list[Segment]:
    """The conversation as text segments, each marked train/no-train.

    train_on: "all" (every assistant turn carries loss), "last" (only the final
    assistant turn) or "none".
    """
    if train_on not in ("all", "last", "none"):
        raise ValueError(f"train_on must be all, last or none, got {train_on!r}")
    segs: list[Segment] = []
    if tools:
        segs.append(Segment(f"{st.IM_SYSTEM}tool_declare{st.IM_MIDDLE}{tools_json(tools)}{st.IM_END}", False))
    ids = _IdMap()
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ROLE_MARKER:
            raise ValueError(f"message {i}: unknown role {role!r}")
        if role == "tool":
            result_id = ids.result_id(msg.get("tool_call_id"))
            m = _K2_ID.match(result_id)
            name = msg.get("name") or (m.group(1) if m else "tool")
            body = f"## Return of {result_id}\n{_text_of(msg.get('content'))}"
            segs.append(Segment(f"{st.IM_SYSTEM}{name}{st.IM_MIDDLE}{body}{st.IM_END}", False))
            continue
        name = msg.get("name") or DEFAULT_ROLE_NAMES[role]
        header = f"{ROLE_MARKER[role]}{name}{st.IM_MIDDLE}"
        body = _text_of(msg.get("content"))
        if role == "assistant" and msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                fn = call.get("function", call)
                cid = ids.call_id(call.get("id"), fn["name"])
                calls.append(
                    f"{st.TOOL_CALL_BEGIN}{cid}{st.TOOL_CALL_ARGUMENT_BEGIN}"
                    f"{_arguments_text(fn.get('arguments', {}))}{st.TOOL_CALL_END}"
                )
            body += st.TOOL_CALLS_SECTION_BEGIN + "".join(calls) + st.TOOL_CALLS_SECTION_END
        if role == "assistant":
            train = train_on == "all" or (train_on == "last" and i == last_assistant)
            segs.append(Segment(header, False))
            segs.append(Segment(body + st.IM_END, train))
        else:
            segs.append(Segment(header + body + st.IM_END, False))
    if add_generation_prompt:
        segs.append(Segment(GENERATION_PROMPT, False))
    return segs


def render(
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as one K2-format string."""
    return "".join(s.text for s in render_segments(messages, tools, add_generation_prompt))


def encode_conversation(
    tokenizer: TextTokenizer,
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    train_on: str = "all",
) -> tuple[list[int], list[int]]:
    """Token ids and the SFT loss mask (1 on assistant content and its <|im_end|>, else 0)."""
    ids: list[int] = []
    mask: list[int] = []
    for seg in render_segments(messages, tools, add_generation_prompt, train_on):
        seg_ids = list(tokenizer.encode(seg.text, add_special_tokens=False))
        ids.extend(seg_ids)
        mask.extend([int(seg.train)] * len(seg_ids))
    return ids, mask


# --------------------------------------------------------------------------- parse


def tool_index(tools: Iterable[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """name -> JSON schema of the parameters, from an OpenAI-style tool list."""
    out: dict[str, dict[str, Any]] = {}
    for t in tools or []:
        fn = t.get("function", t)
        out[fn["name"]] = fn.get("parameters") or {"type": "object"}
    return out


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Violations of a JSON schema, as short messages (empty when valid)."""
    import jsonschema  # serve extra; imported here so SFT data prep does not need it

    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema)
    msgs = []
    for err in sorted(validator.iter_errors(instance), key=lambda e: list(e.path)):
        where = "/".join(str(p) for p in err.path) or "<root>"
        msgs.append(f"{where}: {err.message}")
    return msgs


def _cut_at_stop(text: str) -> tuple[str, bool]:
    cut = min((p for p in (text.find(s) for s in STOP_STRINGS) if p >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _parse_call(raw: str, index: int, tools: dict[str, dict[str, Any]] | None) -> ToolCall | ParseError:
    if st.TOOL_CALL_ARGUMENT_BEGIN not in raw:
        return ParseError("truncated_call", "no <|tool_call_argument_begin|> after the call id", index, raw=raw)
    call_id, args_text = raw.split(st.TOOL_CALL_ARGUMENT_BEGIN, 1)
    m = _K2_ID.match(call_id)
    if not m:
        return ParseError("bad_id", f"call id {call_id.strip()!r} is not functions.NAME:IDX", index, raw=raw)
    name = m.group(1)
    try:
        args = json.loads(args_text)
    except json.JSONDecodeError as e:
        return ParseError("invalid_json", f"arguments are not JSON ({e.msg} at char {e.pos})", index, name, raw)
    if not isinstance(args, dict):
        return ParseError("not_an_object", f"arguments must be a JSON object, got {type(args).__name__}", index, name, raw)
    if tools is not None:
        if name not in tools:
            known = ", ".join(sorted(tools)) or "none"
            return ParseError("unknown_tool", f"no tool named {name!r} (declared: {known})", index, name, raw)
        problems = schema_errors(args, tools[name])
        if problems:
            return ParseError("schema_violation", "; ".join(problems), index, name, raw)
    return ToolCall(f"functions.{name}:{m.group(2)}", name, args)


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


# --------------------------------------------------------------------------- tool_choice


@dataclass
class ToolChoicePlan:
    """How to honour an OpenAI ``tool_choice`` while decoding K2's format.

    ``prefix`` is forced after the generation prompt (it becomes part of the
    prompt and of the parsed text), ``arguments_schema`` constrains what follows,
    ``suffix`` closes the section once the arguments are complete, and
    ``forbid_calls`` bans the section-begin token.
    """

    prefix: str = ""
    arguments_schema: dict[str, Any] | None = None
    suffix: str = ""
    forbid_calls: bool = False


def count_tool_calls(messages: Sequence[Message]) -> int:
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def plan_tool_choice(messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None, tool_choice: Any) -> ToolChoicePlan:
    """``auto``/None: free; ``none``: no calls; ``required``: some call; ``{"type": "function",
    "function": {"name": N}}``: a call of N whose arguments are constrained to N's schema."""
    if tool_choice in (None, "auto"):
        return ToolChoicePlan()
    if tool_choice == "none" or not tools:
        if isinstance(tool_choice, dict) or tool_choice == "required":
            raise ValueError("tool_choice asks for a tool call but no tools were given")
        return ToolChoicePlan(forbid_calls=True)
    opener = st.TOOL_CALLS_SECTION_BEGIN + st.TOOL_CALL_BEGIN + "functions."
    if tool_choice == "required":
        return ToolChoicePlan(prefix=opener)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        declared = tool_index(tools)
        if name not in declared:
            raise ValueError(f"tool_choice names {name!r}, which is not among the declared tools")
        idx = count_tool_calls(messages)
        return ToolChoicePlan(
            prefix=f"{opener}{name}:{idx}{st.TOOL_CALL_ARGUMENT_BEGIN}",
            arguments_schema=declared[name],
            suffix=st.TOOL_CALL_END + st.TOOL_CALLS_SECTION_END,
        )
    raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a function object, got {tool_choice!r}")
