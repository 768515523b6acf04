"""The one LLM interface every pipeline uses (data synthesis, judging, simulated users, RL).

:class:`LLMClient` gives ``chat`` / ``achat`` / ``chat_many`` / ``complete``
and ``totals``; a backend implements ``_chat_once`` (and may override
``_achat_once``). This layer adds what no backend should repeat:

* structured output: ``chat(..., json_schema=SCHEMA)`` validates the reply and,
  on a violation, asks again quoting the validation error, up to
  ``schema_retries`` times, then raises :class:`StructuredOutputError`;
* token accounting over the client's life (:class:`UsageTotals`; cached
  replies cost nothing).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from openk2.chat.schema import check_json
from openk2.errors import OpenK2Error

Message = dict[str, Any]


class LLMError(OpenK2Error):
    """A request to a language model failed."""


class LLMRequestError(LLMError):
    """The endpoint refused the request (a 4xx other than a rate limit), or retries ran out."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class StructuredOutputError(LLMError):
    """The model did not produce JSON matching the schema within the allowed retries."""

    def __init__(self, message: str, last_text: str = "") -> None:
        super().__init__(message)
        self.last_text = last_text


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChatResponse:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI style
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    parsed: Any = None  # the JSON value when a json_schema was demanded
    cached: bool = False
    # tool-call parse problems reported by a local backend (openk2.chat.ParseError strings)
    parse_errors: list[str] = field(default_factory=list)

    def message(self) -> Message:
        """The reply as an assistant message, ready to append to the conversation."""
        msg: Message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


@dataclass
class UsageTotals:
    """Token accounting over a client's life (cached replies cost no tokens)."""

    requests: int = 0
    cached: int = 0
    retries: int = 0
    schema_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_tokens": self.total_tokens}


def schema_feedback(why: str) -> Message:
    return {
        "role": "user",
        "content": f"Your previous reply was rejected: {why}. Reply again with only a JSON value that matches the schema.",
    }


@dataclass
class ChatRequest:
    """Everything that decides a reply; its canonical JSON is the cache key."""

    messages: list[Message]
    model: str = ""
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    json_schema: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = None  # None: the endpoint's default
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None

    def openai_body(self) -> dict[str, Any]:
        """The /v1/chat/completions body (only the fields that are set)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.tools:
            body["tools"] = self.tools
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        rf = self.response_format_or_schema()
        if rf is not None:
            body["response_format"] = rf
        if self.stop:
            body["stop"] = self.stop
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    def response_format_or_schema(self) -> dict[str, Any] | None:
        """``json_schema=`` as an OpenAI response_format, else the response_format given."""
        if self.json_schema is not None:
            return {"type": "json_schema", "json_schema": {"name": "output", "schema": self.json_schema, "strict": True}}
        return self.response_format


class LLMClient:
    """The interface every pipeline uses. Subclasses implement ``_chat_once`` (and
    may override ``_achat_once``); this class adds structured output and accounting."""

    model: str = ""
    schema_retries: int = 2

    def __init__(self) -> None:
        self.totals = UsageTotals()
        self._totals_lock = threading.Lock()

    # -- to implement
    def _chat_once(self, req: ChatRequest) -> ChatResponse:
        raise NotImplementedError

    async def _achat_once(self, req: ChatRequest) -> ChatResponse:
        return await asyncio.to_thread(self._chat_once, req)

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None) -> ChatResponse:
        """Plain text continuation of ``prompt`` (no chat template), for base models."""
        raise NotImplementedError

    # -- public API
    def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        json_schema: dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> ChatResponse:
        req = self._request(messages, tools, tool_choice, json_schema, response_format, max_tokens, temperature, top_p, stop, seed)
        if req.json_schema is None:
            return self._chat_once(req)
        return self._until_valid(req)

    def _until_valid(self, req: ChatRequest, first: ChatResponse | None = None) -> ChatResponse:
        """Ask again, with the validation error as feedback, until the reply matches the schema (sync).

        `first`: a reply to `req` already in hand (it counts as the first try)."""
        resp, why = first, ""
        for _ in range(self.schema_retries + 1):
            resp = self._chat_once(req) if resp is None else resp
            req, why = self._check(req, resp)
            if not why:
                return resp
            resp = None
        raise self._gave_up(why, req)

    def _check(self, req: ChatRequest, resp: ChatResponse) -> tuple[ChatRequest, str]:
        """("", same request) with `resp.parsed` set if the reply is valid, else (the next request, why not)."""
        value, why = check_json(resp.content, req.json_schema)
        if why is None:
            resp.parsed = value
            return req, ""
        return self._retry_request(req, resp, why), why

    def _gave_up(self, why: str, req: ChatRequest) -> StructuredOutputError:
        last = next((m.get("content") for m in reversed(req.messages) if m.get("role") == "assistant"), "")
        return StructuredOutputError(f"no schema-valid JSON after {self.schema_retries + 1} tries: {why}", last or "")

    async def achat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        json_schema: dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> ChatResponse:
        req = self._request(messages, tools, tool_choice, json_schema, response_format, max_tokens, temperature, top_p, stop, seed)
        if req.json_schema is None:
            return await self._achat_once(req)
        why = ""
        for _ in range(self.schema_retries + 1):
            resp = await self._achat_once(req)
            req, why = self._check(req, resp)
            if not why:
                return resp
        raise self._gave_up(why, req)

    def chat_many(self, requests: Sequence[dict[str, Any]]) -> list[ChatResponse | Exception]:
        """Run many ``chat`` calls concurrently (each a dict of ``chat`` keyword
        arguments incl. ``messages``), bounded by the client's concurrency limit.
        Failures come back in place as exceptions."""

        async def run() -> list[Any]:
            return await asyncio.gather(*(self.achat(**r) for r in requests), return_exceptions=True)

        return asyncio.run(run())

    # -- helpers
    def _request(self, messages, tools, tool_choice, json_schema, response_format, max_tokens, temperature, top_p, stop, seed) -> ChatRequest:
        return ChatRequest(
            messages=[dict(m) for m in messages],
            model=self.model,
            tools=list(tools) if tools else None,
            tool_choice=tool_choice,
            json_schema=json_schema,
            response_format=response_format,
            max_tokens=None if max_tokens is None else int(max_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            stop=list(stop) if stop else None,
            seed=seed,
        )

    def _retry_request(self, req: ChatRequest, resp: ChatResponse, why: str) -> ChatRequest:
        with self._totals_lock:
            self.totals.schema_retries += 1
        messages = req.messages + [{"role": "assistant", "content": resp.content or ""}, schema_feedback(why)]
        return ChatRequest(**{**req.__dict__, "messages": messages})

    def _account(self, resp: ChatResponse, retries: int = 0, failed: bool = False) -> None:
        with self._totals_lock:
            t = self.totals
            t.retries += retries
            if failed:
                t.failures += 1
                return
            t.requests += 1
            if resp.cached:
                t.cached += 1
            else:
                t.prompt_tokens += resp.usage.prompt_tokens
                t.completion_tokens += resp.usage.completion_tokens
