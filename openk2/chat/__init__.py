"""Kimi K2's chat and tool-call format, shared by serving, SFT, RL and evaluation.

    from openk2.chat import render, encode_conversation, parse_tool_calls

| module | what it does |
|---|---|
| ``render``      | a conversation -> K2's string; ``encode_conversation`` -> (ids, SFT loss mask) |
| ``template``    | the named templates as Jinja (``templates/*.jinja``), a checkpoint's own template, ``render_jinja`` |
| ``parse``       | a raw completion -> content + OpenAI ``tool_calls`` + every ``ParseError`` |
| ``tool_choice`` | OpenAI ``tool_choice`` -> a decoding plan (forced prefix, argument schema or one alternative per tool, banned section) |
| ``tool_prompt`` | tools for templates without tool syntax: the tool prompt, ``<tool_call>{json}</tool_call>`` calls and their parser |
| ``schema``      | JSON schemas: validate a value, a schema, a ``response_format``; check a JSON reply |

See docs/serving.md section 1.
"""

from openk2.chat.parse import ParseError, ParseResult, ToolCall, format_parse_errors, parse_tool_calls, tool_index
from openk2.chat.render import (
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TEMPLATE,
    GENERATION_PROMPT,
    TEMPLATE_NAMES,
    STOP_STRINGS,
    Message,
    Segment,
    encode_conversation,
    normalize_messages,
    render,
    render_segments,
    tools_json,
)
from openk2.chat.schema import check_json, response_schema, schema_errors, schema_problem, strip_code_fence
from openk2.chat.template import (
    checkpoint_template,
    encode_conversation_jinja,
    jinja_segments,
    render_jinja,
    resolve_template,
    template_name,
    template_text,
)
from openk2.chat.tool_choice import ToolChoicePlan, count_tool_calls, plan_tool_choice
from openk2.chat.tool_prompt import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    flatten_content,
    format_tool_call,
    parse_tagged_tool_calls,
    render_tool_messages,
    template_renders_tools,
    tool_system_prompt,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "DEFAULT_TEMPLATE", "TEMPLATE_NAMES", "checkpoint_template", "encode_conversation_jinja",
    "jinja_segments", "normalize_messages",
    "render_jinja", "resolve_template", "template_name", "template_text",
    "GENERATION_PROMPT", "STOP_STRINGS", "Message", "ParseError", "ParseResult", "Segment", "ToolCall",
    "ToolChoicePlan", "check_json", "count_tool_calls", "encode_conversation", "format_parse_errors",
    "parse_tool_calls", "plan_tool_choice", "render", "render_segments", "response_schema", "schema_errors",
    "schema_problem", "strip_code_fence", "tool_index", "tools_json",
    "TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "TOOL_RESPONSE_CLOSE", "TOOL_RESPONSE_OPEN", "flatten_content",
    "format_tool_call", "parse_tagged_tool_calls", "render_tool_messages", "template_renders_tools",
    "tool_system_prompt",
]
