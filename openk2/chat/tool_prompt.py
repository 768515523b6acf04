"""Tool use for models whose chat template has no tool syntax: a tool prompt and a tagged call syntax.

Many chat templates (SmolLM2's, for one) never render ``tools``, have no place for an
assistant's tool calls and no tool role. For them openk2 writes the tools into the system
message itself (:func:`tool_system_prompt`) and teaches one call syntax, one call per tag::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

:func:`render_tool_messages` rewrites an OpenAI-style conversation into messages any plain
template renders: the tool prompt joins the system message, an assistant's ``tool_calls``
become that syntax after its text, and tool results (role ``tool``) become a user turn of
``<tool_response>...</tool_response>`` blocks, one per result, in order.
:func:`parse_tagged_tool_calls` reads a completion back into the :class:`ParseResult` /
:class:`ToolCall` objects of K2's parser (ids ``functions.NAME:IDX``, so the next turn's
``tool_call_id`` matches), every malformed call a :class:`ParseError`, never an exception.

:func:`template_renders_tools` decides which path a template takes: it renders a probe
conversation with a probe tool and looks for the tool's name in the result.

:func:`flatten_content` is shared by every template: ``content: None`` becomes ``""`` and a
list of text parts is joined; any other part is a ValueError naming the message.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from openk2.chat.parse import ParseError, ParseResult, ToolCall, checked_call, tool_index
from openk2.chat.render import Message

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

# The probe's tool name: a word no template writes on its own.
PROBE_TOOL_NAME = "openk2_probe_tool_7f3a"
PROBE_TOOL = {"type": "function", "function": {
    "name": PROBE_TOOL_NAME, "description": "probe",
    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
PROBE_MESSAGES = [{"role": "user", "content": "hi"}]

TOOL_PROMPT_HEADER = (
    "# Tools\n\n"
    "You may call one or more functions to help with the user's request. "
    "The functions you can call are declared here as JSON schemas:\n"
)
TOOL_PROMPT_FOOTER = (
    "\nTo call a function, write a JSON object with the function's name and its arguments "
    f"between {TOOL_CALL_OPEN} and {TOOL_CALL_CLOSE} tags, one pair of tags per call, like this:\n"
    f'{TOOL_CALL_OPEN}{{"name": "function_name", "arguments": {{"argument": "value"}}}}{TOOL_CALL_CLOSE}\n'
    f"The results come back in {TOOL_RESPONSE_OPEN}{TOOL_RESPONSE_CLOSE} tags, in the order of the calls."
)


def flatten_content(messages: Sequence[Message]) -> list[Message]:
    """Copies of the messages whose ``content`` is a string: None -> "", text parts joined.

    Raises ValueError naming the message index for a part that is not text (an image) or
    content that is neither a string, None nor a list.
    """
    out: list[Message] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i}: must be an object, got {type(msg).__name__}")
        msg = dict(msg)
        content = msg.get("content")
        if content is None:
            msg["content"] = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, str):
                    parts.append(part)
                elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text", ""), str):
                    parts.append(part.get("text", ""))
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"message {i}: content part {j} is of type {kind!r}; only text parts are supported")
            msg["content"] = "".join(parts)
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, null or a list of text parts, "
                             f"got {type(content).__name__}")
        out.append(msg)
    return out


def template_renders_tools(render: Callable[[list[Message], list[dict[str, Any]]], str]) -> bool:
    """Whether a chat template writes the tools it is given.

    ``render(messages, tools)`` renders with the template (e.g. a tokenizer's
    ``apply_chat_template(..., tokenize=False)``). The probe tool's name must appear in the
    result; a template that ignores ``tools`` or raises on them has no tool syntax.
    """
    try:
        text = render([dict(m) for m in PROBE_MESSAGES], [PROBE_TOOL])
    except Exception:
        return False
    return isinstance(text, str) and PROBE_TOOL_NAME in text


def tool_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The tool declarations (one JSON line per tool: name, description, parameters) and the call syntax."""
    lines = []
    for t in tools:
        fn = t.get("function", t)
        decl = {"name": fn["name"]}
        if fn.get("description"):
            decl["description"] = fn["description"]
        decl["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
        lines.append(json.dumps(decl, ensure_ascii=False))
    return TOOL_PROMPT_HEADER + "\n".join(lines) + "\n" + TOOL_PROMPT_FOOTER


def format_tool_call(name: str, arguments: Any) -> str:
    """One call in the tagged syntax; ``arguments`` a dict or its JSON text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # written as given: the conversation shows what the model produced
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}{TOOL_CALL_CLOSE}'


def render_tool_messages(messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None) -> list[Message]:
    """The conversation as system/user/assistant messages with string content, in the tagged syntax.

    With ``tools`` the tool prompt is appended to the first system message (a system message
    holding only the tool prompt is put first when there is none). Tool results that follow
    one another become one user turn.
    """
    out: list[Message] = []
    merging = False  # the last message in out is a user turn of tool results
    for msg in flatten_content(messages):
        role = msg.get("role")
        if role == "tool":
            block = f"{TOOL_RESPONSE_OPEN}\n{msg['content']}\n{TOOL_RESPONSE_CLOSE}"
            if merging:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            merging = True
            continue
        merging = False
        new = {k: v for k, v in msg.items() if k not in ("tool_calls", "tool_call_id")}
        if role == "assistant" and msg.get("tool_calls"):
            calls = []
            for c in msg["tool_calls"]:
                fn = c.get("function", c)
                calls.append(format_tool_call(fn["name"], fn.get("arguments", {})))
            new["content"] = "\n".join(([new["content"]] if new["content"] else []) + calls)
        out.append(new)
    if tools:
        prompt = tool_system_prompt(tools)
        if out and out[0].get("role") == "system":
            first = out[0]["content"]
            out[0]["content"] = f"{first}\n\n{prompt}" if first else prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((p for p in (text.find(s) for s in stops if s) if p >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _parse_one(raw: str, index: int, call_index: int, tools: dict[str, dict[str, Any]] | None) -> ToolCall | ParseError:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return ParseError("invalid_json", f"the call is not JSON ({e.msg} at char {e.pos})", index, raw=raw)
    if not isinstance(obj, dict):
        return ParseError("not_an_object", f"the call must be a JSON object, got {type(obj).__name__}", index, raw=raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ParseError("bad_call", 'the call has no "name" string', index, raw=raw)
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as JSON text, as OpenAI's API does
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            return ParseError("invalid_json", f"arguments are not JSON ({e.msg} at char {e.pos})", index, name, raw)
    return checked_call(name, args, call_index, index, raw, tools)


def parse_tagged_tool_calls(text: str, tools: Sequence[dict[str, Any]] | None = None, stops: Sequence[str] = (),
                            first_call_index: int = 0) -> ParseResult:
    """Parse a completion in the tagged syntax into content, tool calls and errors.

    ``stops``: texts that end the completion (the template's end-of-turn); ``finished`` says
    one was found. ``tools`` turns on the unknown-tool and JSON-schema checks. Content is the
    text before the first ``<tool_call>``; call k gets the id ``functions.NAME:first_call_index+k``
    (ids count calls over the conversation, as in K2's format). Problems (kinds as in
    :mod:`openk2.chat.parse`, plus ``bad_call`` for a call without a name) go into ``errors``.
    """
    text, finished = _cut_at_stops(text, stops)
    declared = tool_index(tools) if tools is not None else None
    begin = text.find(TOOL_CALL_OPEN)
    if begin < 0:
        return ParseResult(content=text, finished=finished)
    result = ParseResult(content=text[:begin].rstrip(), finished=finished)
    rest = text[begin:]
    index = 0
    while rest:
        if not rest.startswith(TOOL_CALL_OPEN):
            nxt = rest.find(TOOL_CALL_OPEN)
            stray = rest if nxt < 0 else rest[:nxt]
            if stray.strip():
                result.errors.append(ParseError("stray_text", f"text after a tool call: {stray[:80]!r}", raw=stray))
            if nxt < 0:
                break
            rest = rest[nxt:]
            continue
        body = rest[len(TOOL_CALL_OPEN):]
        end = body.find(TOOL_CALL_CLOSE)
        if end < 0:
            result.errors.append(ParseError("truncated_call", f"{TOOL_CALL_CLOSE} is missing", index, raw=body))
            break
        parsed = _parse_one(body[:end].strip(), index, first_call_index + len(result.tool_calls), declared)
        if isinstance(parsed, ParseError):
            result.errors.append(parsed)
        else:
            result.tool_calls.append(parsed)
        index += 1
        rest = body[end + len(TOOL_CALL_CLOSE):]
    return result
