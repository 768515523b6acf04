"""One LLM client for every pipeline: an OpenAI-compatible endpoint or a model in this process.

    from openk2.llm import make_client, OpenAICompatClient, LocalClient

| module | what it does |
|---|---|
| ``base``          | ``LLMClient`` (chat, achat, chat_many, complete, totals), request/response types, errors, schema validate-and-retry |
| ``openai_compat`` | ``OpenAICompatClient``: the official ``openai`` SDK plus a concurrency limit, the cache and accounting |
| ``local``         | ``LocalClient``: the serving engine in-process (an openk2 checkpoint or SmolLM2), schema-constrained decoding |
| ``cache``         | the on-disk reply cache keyed by the canonical request |

``OpenAICompatClient`` and ``LocalClient`` are imported on first use (the SDK
and torch are not loaded by ``import openk2.llm``). See docs/serving.md section 3.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from openk2.llm.base import (
    ChatRequest,
    ChatResponse,
    LLMClient,
    LLMError,
    LLMRequestError,
    Message,
    StructuredOutputError,
    Usage,
    UsageTotals,
)

_LAZY = {"OpenAICompatClient": "openk2.llm.openai_compat", "LocalClient": "openk2.llm.local",
         "DiskCache": "openk2.llm.cache", "cache_key": "openk2.llm.cache"}

__all__ = ["ChatRequest", "ChatResponse", "DiskCache", "LLMClient", "LLMError", "LLMRequestError", "LocalClient",
           "Message", "OpenAICompatClient", "StructuredOutputError", "Usage", "UsageTotals", "cache_key", "make_client"]


def make_client(spec: str = "smollm2", *, model: str | None = None, api_key: str | None = None,
                cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> LLMClient:
    """The client a pipeline's ``--llm`` flag names.

    ``http://host:port`` (or ``https://...``) -> :class:`OpenAICompatClient` (``model``
    defaults to the endpoint's first model); anything else (``smollm2``, an
    openk2 checkpoint directory, a .gguf file) -> an in-process :class:`LocalClient`.
    """
    if spec.startswith(("http://", "https://")):
        from openk2.llm.openai_compat import OpenAICompatClient, discover_model

        client = OpenAICompatClient(spec, api_key=api_key, model=model or "", cache_dir=cache_dir, **kwargs)
        if not client.model:
            client.model = discover_model(client, spec)
        return client
    from openk2.llm.local import LocalClient

    return LocalClient(spec, cache_dir=cache_dir, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'openk2.llm' has no attribute {name!r}")
