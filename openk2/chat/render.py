"""Render a conversation in Kimi K2's chat and tool-call format, with the SFT loss mask.

Two named templates, each written twice: as Jinja (``openk2/chat/templates/NAME.jinja``,
shipped in every checkpoint openk2 writes) and here in Python (the SFT loss mask needs
the turn boundaries). tests/test_chat_template.py proves the two render the same string.

``k2-instruct-0905`` (openk2's default, ``DEFAULT_TEMPLATE``) renders::

    <|im_system|>tool_declare<|im_middle|>
      # Tools
      [{"type": "function", "function": {"name": "get_weather", ...}}]<|im_end|>
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
    <|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>
    <|im_assistant|>assistant<|im_middle|>Let me check.<|tool_calls_section_begin|>
        <|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>
    <|tool_calls_section_end|><|im_end|>
    <|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0
        {"temp_c": 21}<|im_end|>
    <|im_assistant|>assistant<|im_middle|>It is 21 C in Paris.<|im_end|>

(one line per turn for reading; the only newlines in the real string are the one
and the indents after ``<|im_middle|>`` of tool_declare, and the newline and four
spaces after ``## Return of ID``). The facts, shared by both templates:

- a default system turn (``DEFAULT_SYSTEM_PROMPT``) when the first message is not a system message;
- tools and dict arguments as ``json.dumps`` with its default ``", "``/``": "`` separators, non-ASCII kept
  (what transformers' ``tojson`` writes);
- a tool result is ``## Return of {tool_call_id}`` + ``"\\n    "`` + its content.

They differ in two places. ``k2-instruct`` (the July 2025 tool-call revision of
Kimi-K2-Instruct) writes the tool list right after ``<|im_middle|>`` and fixed role
names (``system``, ``user``, ``assistant``, ``tool``). ``k2-instruct-0905`` puts
``"\\n  # Tools\\n  "`` before the list and names each turn by the message's ``name``
when it has one, else by its role.

Tool-call ids keep K2's ``functions.NAME:IDX`` form, IDX counting calls over the
whole conversation; OpenAI-style ids (``call_abc``) are rewritten to it before
rendering (``normalize_messages``: the released models copy whatever ids they are
shown). The Jinja templates write ids as given, so they render the same string for
normalised messages.

For SFT, every assistant turn's content and its closing ``<|im_end|>`` carry
loss; role headers, system prompts, user turns and tool results do not.
Segments are split at special tokens only, so encoding them one by one gives
the same ids as encoding the whole string.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from openk2.data import special_tokens as st

Message = dict[str, Any]

ROLE_MARKER = {"system": st.IM_SYSTEM, "user": st.IM_USER, "assistant": st.IM_ASSISTANT, "tool": st.IM_SYSTEM}
TEMPLATE_NAMES = ("k2-instruct", "k2-instruct-0905")
# openk2's own default: the newest released K2 Instruct format (see docs/serving.md).
DEFAULT_TEMPLATE = "k2-instruct-0905"
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
# Between tool_declare's <|im_middle|> and the tool list.
TOOLS_PREFIX = {"k2-instruct": "", "k2-instruct-0905": "\n  # Tools\n  "}
# Between "## Return of ID" and a tool result's content.
TOOL_RESULT_SEPARATOR = "\n    "
GENERATION_PROMPT = f"{st.IM_ASSISTANT}assistant{st.IM_MIDDLE}"
# Where an assistant completion ends: K2 closes a turn with <|im_end|>; a
# pre-trained-only checkpoint may emit [EOS] instead.
STOP_STRINGS = (st.IM_END, st.EOS)

# K2's tool-call id: functions.NAME:IDX (the "functions." prefix is optional on input).
K2_CALL_ID = re.compile(r"^\s*(?:functions\.)?([A-Za-z0-9_\-.]+?):(\d+)\s*$")


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool  # True: these tokens carry SFT loss


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
    """The tool_declare payload: the OpenAI-style tool list as transformers' ``tojson`` writes it."""
    return json.dumps(list(tools), ensure_ascii=False)


def check_template(template: str) -> str:
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"unknown chat template {template!r} (known: {', '.join(TEMPLATE_NAMES)})")
    return template


class _IdMap:
    """Rewrites tool-call ids into K2's functions.NAME:IDX, IDX counting calls over the conversation."""

    def __init__(self) -> None:
        self.count = 0
        self.mapping: dict[str, str] = {}

    def call_id(self, original: str | None, name: str) -> str:
        m = K2_CALL_ID.match(original or "")
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
        m = K2_CALL_ID.match(original or "")
        if m:
            return f"functions.{m.group(1)}:{m.group(2)}"
        return original or "functions.unknown:0"


def normalize_messages(messages: Sequence[Message]) -> list[Message]:
    """Copies of the messages with K2's tool-call ids and OpenAI's tool-call shape.

    Every call becomes ``{"id": "functions.NAME:IDX", "type": "function", "function":
    {"name", "arguments"}}`` and every tool result's ``tool_call_id`` the id of its call.
    Both renderers (Python and Jinja) see conversations in this form.
    """
    ids = _IdMap()
    out: list[Message] = []
    for msg in messages:
        msg = dict(msg)
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                fn = call.get("function", call)
                calls.append({"id": ids.call_id(call.get("id"), fn["name"]), "type": "function",
                              "function": {"name": fn["name"], "arguments": fn.get("arguments", {})}})
            msg["tool_calls"] = calls
        elif msg.get("role") == "tool":
            msg["tool_call_id"] = ids.result_id(msg.get("tool_call_id"))
        out.append(msg)
    return out


def render_segments(
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    train_on: str = "all",
    template: str = DEFAULT_TEMPLATE,
) -> list[Segment]:
    """The conversation as text segments, each marked train/no-train.

    train_on: "all" (every assistant turn carries loss), "last" (only the final
    assistant turn) or "none". template: one of ``TEMPLATE_NAMES``.
    """
    if train_on not in ("all", "last", "none"):
        raise ValueError(f"train_on must be all, last or none, got {train_on!r}")
    check_template(template)
    messages = normalize_messages(messages)
    segs: list[Segment] = []
    if tools:
        segs.append(Segment(f"{st.IM_SYSTEM}tool_declare{st.IM_MIDDLE}{TOOLS_PREFIX[template]}{tools_json(tools)}"
                            f"{st.IM_END}", False))
    if messages and messages[0].get("role") != "system":
        segs.append(Segment(f"{st.IM_SYSTEM}system{st.IM_MIDDLE}{DEFAULT_SYSTEM_PROMPT}{st.IM_END}", False))
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ROLE_MARKER:
            raise ValueError(f"message {i}: unknown role {role!r}")
        name = (msg.get("name") or role) if template == "k2-instruct-0905" else role
        header = f"{ROLE_MARKER[role]}{name}{st.IM_MIDDLE}"
        if role == "tool":
            body = f"## Return of {msg['tool_call_id']}{TOOL_RESULT_SEPARATOR}{_text_of(msg.get('content'))}"
            segs.append(Segment(header + body + st.IM_END, False))
            continue
        body = _text_of(msg.get("content"))
        if role == "assistant" and msg.get("tool_calls"):
            calls = [
                f"{st.TOOL_CALL_BEGIN}{call['id']}{st.TOOL_CALL_ARGUMENT_BEGIN}"
                f"{_arguments_text(call['function']['arguments'])}{st.TOOL_CALL_END}"
                for call in msg["tool_calls"]
            ]
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
    template: str = DEFAULT_TEMPLATE,
) -> str:
    """The conversation as one K2-format string."""
    return "".join(s.text for s in render_segments(messages, tools, add_generation_prompt, template=template))


def encode_conversation(
    tokenizer: TextTokenizer,
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    train_on: str = "all",
    template: str = DEFAULT_TEMPLATE,
) -> tuple[list[int], list[int]]:
    """Token ids and the SFT loss mask (1 on assistant content and its <|im_end|>, else 0)."""
    return encode_segments(tokenizer, render_segments(messages, tools, add_generation_prompt, train_on, template))


def encode_segments(tokenizer: TextTokenizer, segments) -> tuple[list[int], list[int]]:
    """Encode rendered segments one by one: (ids, loss mask with each segment's `train` flag per token)."""
    ids: list[int] = []
    mask: list[int] = []
    for seg in segments:
        seg_ids = list(tokenizer.encode(seg.text, add_special_tokens=False))
        ids.extend(seg_ids)
        mask.extend([int(seg.train)] * len(seg_ids))
    return ids, mask
