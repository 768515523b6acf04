"""OpenAI's ``tool_choice`` as decoding constraints on K2's tool-call format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from openk2.chat.parse import tool_index
from openk2.chat.render import Message
from openk2.data import special_tokens as st


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
