"""OpenAI's ``tool_choice`` as decoding constraints, for K2's tool-call format and the tagged tool-prompt syntax."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from openk2.chat.parse import tool_index
from openk2.chat.render import Message
from openk2.chat.tool_prompt import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from openk2.data import special_tokens as st

SYNTAXES = ("k2", "tagged")

# One way to finish a forced call: text, then a JSON value matching the schema (None: any), then text.
Alternative = tuple[str, "dict[str, Any] | None", str]


@dataclass
class ToolChoicePlan:
    """How to honour an OpenAI ``tool_choice`` while decoding.

    ``prefix`` is forced after the generation prompt (it becomes part of the
    prompt and of the parsed text). Then either ``arguments_schema`` constrains
    what follows (one tool possible), or ``alternatives`` does: the output must be
    one alternative's prefix text + a JSON value matching its schema + its suffix
    text (one alternative per allowed tool; the serving side compiles them into a
    ``ChoiceGrammar``). ``suffix`` is put back once the constrained part is complete.
    ``forbid_calls`` (K2) bans the section-begin token; ``stop`` (tagged syntax)
    ends the completion where a call would start. ``first_call_index`` is the
    number of calls earlier in the conversation (call ids count over it).
    """

    prefix: str = ""
    arguments_schema: dict[str, Any] | None = None
    suffix: str = ""
    forbid_calls: bool = False
    alternatives: list[Alternative] = field(default_factory=list)
    stop: tuple[str, ...] = ()
    first_call_index: int = 0
    syntax: str = "k2"


def count_tool_calls(messages: Sequence[Message]) -> int:
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def _k2_alternative(name: str, idx: int, schema: dict[str, Any]) -> Alternative:
    return (f"functions.{name}:{idx}{st.TOOL_CALL_ARGUMENT_BEGIN}", schema, st.TOOL_CALL_END)


def _tagged_alternative(name: str, schema: dict[str, Any]) -> Alternative:
    return (f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": ', schema, f"}}{TOOL_CALL_CLOSE}")


def plan_tool_choice(messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None, tool_choice: Any,
                     syntax: str = "k2") -> ToolChoicePlan:
    """``auto``/None: free; ``none``: no calls; ``required``: a call of one of the tools, its
    arguments valid for that tool's schema; ``{"type": "function", "function": {"name": N}}``:
    a call of N, its arguments constrained to N's schema.

    ``syntax``: ``k2`` (K2's special-token format) or ``tagged`` (``<tool_call>{"name": ...,
    "arguments": ...}</tool_call>``, :mod:`openk2.chat.tool_prompt`). With one possible tool
    the whole call header is forced and only the arguments are constrained; with several, the
    text their headers share (``functions.get_``) is forced and the rest is one alternative per tool.
    """
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}")
    idx = count_tool_calls(messages)
    if tool_choice in (None, "auto"):
        return ToolChoicePlan(first_call_index=idx, syntax=syntax)
    if tool_choice == "none" or not tools:
        if isinstance(tool_choice, dict) or tool_choice == "required":
            raise ValueError("tool_choice asks for a tool call but no tools were given")
        if tool_choice != "none":
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a function object, got {tool_choice!r}")
        if syntax == "k2":
            return ToolChoicePlan(forbid_calls=True, first_call_index=idx, syntax=syntax)
        return ToolChoicePlan(stop=(TOOL_CALL_OPEN,), first_call_index=idx, syntax=syntax)
    declared = tool_index(tools)
    if tool_choice == "required":
        names = list(declared)
    elif isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in declared:
            raise ValueError(f"tool_choice names {name!r}, which is not among the declared tools")
        names = [name]
    else:
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a function object, got {tool_choice!r}")
    if syntax == "k2":
        prefix, suffix = st.TOOL_CALLS_SECTION_BEGIN + st.TOOL_CALL_BEGIN, st.TOOL_CALLS_SECTION_END
        alternatives = [_k2_alternative(n, idx, declared[n]) for n in names]
    else:
        prefix, suffix = TOOL_CALL_OPEN, ""
        alternatives = [_tagged_alternative(n, declared[n]) for n in names]
    if len(alternatives) == 1:  # nothing to choose: force the header, constrain the arguments
        head, schema, tail = alternatives[0]
        return ToolChoicePlan(prefix=prefix + head, arguments_schema=schema, suffix=tail + suffix,
                              first_call_index=idx, syntax=syntax)
    # the text every alternative starts with is forced too: fewer tokens to decode under the grammar
    common = os.path.commonprefix([a[0] for a in alternatives])
    alternatives = [(head[len(common):], schema, tail) for head, schema, tail in alternatives]
    return ToolChoicePlan(prefix=prefix + common, suffix=suffix, alternatives=alternatives, first_call_index=idx,
                          syntax=syntax)
