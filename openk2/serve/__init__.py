"""Serving K2: the chat and tool-call format, an OpenAI-compatible server, and the LLM clients.

    from openk2.serve import render, encode_conversation, parse_tool_calls   # chat_format
    from openk2.serve import make_client, OpenAICompatClient, LocalClient    # clients

Names are imported on first use, so `import openk2.serve` stays cheap. See docs/serving.md.
"""

from importlib import import_module

_EXPORTS = {
    "render": "chat_format",
    "render_segments": "chat_format",
    "encode_conversation": "chat_format",
    "parse_tool_calls": "chat_format",
    "ParseResult": "chat_format",
    "ParseError": "chat_format",
    "ToolCall": "chat_format",
    "LLMClient": "client",
    "ChatResponse": "client",
    "OpenAICompatClient": "client",
    "make_client": "client",
    "LLMError": "client",
    "LLMRequestError": "client",
    "StructuredOutputError": "client",
    "LocalClient": "local",
    "load_chat_model": "backends",
    "create_app": "server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"openk2.serve.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'openk2.serve' has no attribute {name!r}")
