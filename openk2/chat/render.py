"""Render a conversation in Kimi K2's chat and tool-call format, with the SFT loss mask.

A conversation renders to::

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
markers). The markers are the released Kimi-K2-Instruct special tokens and
its chat template (``tokenizer_config.json`` on the Hub, and
``docs/tool_call_guidance.md`` in github.com/MoonshotAI/Kimi-K2); the report
trains tool use on such conversations in SFT (arXiv 2507.20534, §3.1).
Tool-call ids keep K2's ``functions.NAME:IDX`` form, IDX counting calls over
the whole conversation; OpenAI-style ids (``call_abc``) are rewritten to it.

For SFT, every assistant turn's content and its closing ``<|im_end|>`` carry
loss; role headers, the system prompt, user turns and tool results do not.
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

DEFAULT_ROLE_NAMES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
ROLE_MARKER = {"system": st.IM_SYSTEM, "user": st.IM_USER, "assistant": st.IM_ASSISTANT, "tool": st.IM_SYSTEM}
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
    """The tool_declare payload: OpenAI-style tool list as compact JSON."""
    return json.dumps(list(tools), ensure_ascii=False, separators=(",", ":"))


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
            m = K2_CALL_ID.match(result_id)
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
