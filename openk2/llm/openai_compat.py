"""An OpenAI-compatible endpoint (vLLM, SGLang, ``openk2 serve``, hosted APIs) behind :class:`LLMClient`.

The official ``openai`` SDK does the HTTP: connection pooling, timeouts, and
retries on connection errors, timeouts and 408/409/429/5xx, waiting what the
server asks for (``retry-after-ms``, ``Retry-After`` in seconds or as an HTTP
date, up to 2 minutes) or else exponential backoff (0.5 s x 2^k, capped at
8 s, minus up to 25% jitter). This module adds only what the SDK does not
have: a limit on requests in flight, the on-disk cache, token and retry
accounting, and (in :class:`LLMClient`) schema validate-and-retry.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any, Sequence

from openk2.llm.base import ChatRequest, ChatResponse, LLMClient, LLMError, LLMRequestError, Usage
from openk2.llm.cache import DiskCache, cache_key


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


def _retries_of(request: Any) -> int:
    """How many retries the SDK made before sending ``request`` (it numbers every attempt in a header)."""
    try:
        return int(request.headers.get("x-stainless-retry-count", 0))
    except (AttributeError, TypeError, ValueError):
        return 0


def _request_error(e: Exception) -> tuple[LLMRequestError, int]:
    """The SDK's exception as an LLMRequestError naming the server's message, and the retries made."""
    import openai

    retries = _retries_of(getattr(e, "request", None))
    if isinstance(e, openai.APIStatusError):
        text = e.response.text[:500]
        err = e.body.get("error", e.body) if isinstance(e.body, dict) else None
        detail = err.get("message", text) if isinstance(err, dict) else (str(err) if err is not None else text)
        status: int | None = e.status_code
        msg = f"HTTP {status}: {detail}"
        retryable = status in (408, 409, 429) or status >= 500
    else:  # APIConnectionError, APITimeoutError
        text, status, msg, retryable = "", None, f"{type(e).__name__}: {e}", True
    if retryable:
        msg = f"gave up after {retries + 1} tries: {msg}"
    return LLMRequestError(msg, status, text), retries


class OpenAICompatClient(LLMClient):
    """Client for an OpenAI-compatible server.

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
        schema_retries: int = 2,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.cache = DiskCache(cache_dir) if cache_dir else None
        self.schema_retries = schema_retries
        self._sync_sem = threading.BoundedSemaphore(max_concurrency)
        self._sync_client: Any = None
        # one SDK client + semaphore per event loop; those of closed loops (each asyncio.run() makes one)
        # are dropped on the next call
        self._loops: dict[asyncio.AbstractEventLoop, tuple[Any, asyncio.Semaphore]] = {}

    # -- plumbing
    def _sdk_kwargs(self) -> dict[str, Any]:
        # the SDK insists on a key; local servers ignore the header
        return {"base_url": self.base_url, "api_key": self.api_key or "unused", "max_retries": self.max_retries,
                "timeout": self.timeout}

    def _sync(self) -> Any:
        if self._sync_client is None:
            import openai

            self._sync_client = openai.OpenAI(**self._sdk_kwargs())
        return self._sync_client

    def _loop_state(self) -> tuple[Any, asyncio.Semaphore]:
        import openai

        loop = asyncio.get_running_loop()
        for old in [x for x in self._loops if x.is_closed()]:
            del self._loops[old]
        state = self._loops.get(loop)
        if state is None or state[0].is_closed():
            state = (openai.AsyncOpenAI(**self._sdk_kwargs()), asyncio.Semaphore(self.max_concurrency))
            self._loops[loop] = state
        return state

    @staticmethod
    def _endpoint(sdk: Any, path: str) -> Any:
        """The SDK resource that POSTs to ``path``, returning the raw HTTP response (we cache its JSON)."""
        return {"/chat/completions": sdk.chat.completions, "/completions": sdk.completions}[path].with_raw_response

    def _cached(self, path: str, body: dict[str, Any]) -> tuple[str | None, ChatResponse | None]:
        if self.cache is None:
            return None, None
        key = cache_key(body, path)
        hit = self.cache.get(key)
        return key, (response_from_openai(hit, cached=True) if hit is not None else None)

    def _finish(self, raw: Any, key: str | None) -> ChatResponse:
        try:
            data = json.loads(raw.text)
        except json.JSONDecodeError as e:
            self._account(ChatResponse(None), _retries_of(raw.http_request), failed=True)
            raise LLMRequestError(f"{self.base_url}: HTTP {raw.status_code} with a body that is not JSON "
                                  f"({e.msg}): {raw.text[:200]!r}", status=raw.status_code, body=raw.text) from None
        resp = response_from_openai(data)
        if self.cache is not None and key is not None:
            self.cache.put(key, data)
        self._account(resp, _retries_of(raw.http_request))
        return resp

    def _fail(self, e: Exception) -> LLMRequestError:
        err, retries = _request_error(e)
        self._account(ChatResponse(None), retries, failed=True)
        return err

    # -- sync
    def _post(self, path: str, body: dict[str, Any]) -> ChatResponse:
        import openai

        key, hit = self._cached(path, body)
        if hit is not None:
            self._account(hit)
            return hit
        with self._sync_sem:
            try:
                raw = self._endpoint(self._sync(), path).create(**body)
            except openai.APIError as e:
                raise self._fail(e) from e
        return self._finish(raw, key)

    def _chat_once(self, req: ChatRequest) -> ChatResponse:
        return self._post("/chat/completions", req.openai_body())

    @staticmethod
    def _completion_body(model: str, prompt: str, max_tokens: int, temperature: float, top_p: float,
                         stop: Sequence[str] | None, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": temperature, "top_p": top_p}
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            body["seed"] = seed
        return body

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None) -> ChatResponse:
        """Plain text completion (/v1/completions), for base models."""
        return self._post("/completions", self._completion_body(self.model, prompt, max_tokens, temperature, top_p, stop, seed))

    def models(self) -> list[str]:
        import openai

        try:
            return [m.id for m in self._sync().models.list().data]
        except openai.APIError as e:
            raise _request_error(e)[0] from e

    # -- async
    async def _apost(self, path: str, body: dict[str, Any]) -> ChatResponse:
        import openai

        key, hit = self._cached(path, body)
        if hit is not None:
            self._account(hit)
            return hit
        sdk, sem = self._loop_state()
        async with sem:
            try:
                raw = await self._endpoint(sdk, path).create(**body)
            except openai.APIError as e:
                raise self._fail(e) from e
        return self._finish(raw, key)

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
        """Close this event loop's HTTP client (call before the loop ends)."""
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state[0].close()

    def close(self) -> None:
        if self._sync_client is not None:
            self._sync_client.close()
            self._sync_client = None

    def __enter__(self) -> "OpenAICompatClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def discover_model(client: OpenAICompatClient, spec: str) -> str:
    """The endpoint's first model (what ``make_client`` uses when no model is named)."""
    models = client.models()
    if not models:
        raise LLMError(f"{spec} serves no models")
    return models[0]
