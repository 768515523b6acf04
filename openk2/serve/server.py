"""An OpenAI-compatible HTTP server for openk2 checkpoints (``openk2 serve CHECKPOINT``).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (tools,
tool_choice, response_format, streaming over SSE), ``POST /v1/completions``,
``GET /health``. Requests go to an :class:`~openk2.serve.engine.Engine` thread
that batches concurrent requests; the event loop only parses, validates and
streams.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 for an invalid request, 401 for a wrong API key, 404 for an unknown model,
413 for a body over the limit, 503 (with Retry-After) when the queue is full or
the server is shutting down.

Tool calls come back parsed (``message.tool_calls``). When the model writes a
malformed call, the well-formed calls are still returned, the problems are
listed in ``message.openk2_parse_errors``, and if no call survived, the raw
completion is returned as ``content`` so that nothing is lost.
"""


# No `from __future__ import annotations` here: FastAPI reads the route
# signatures' annotations (Request) at definition time.
import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from openk2.chat.schema import response_schema, schema_problem
from openk2.data import special_tokens as st
from openk2.serve.engine import Engine, EngineClosed, GenRequest, SamplingParams


@dataclass
class ServerLimits:
    max_tokens: int = 1024  # per request (max_tokens / max_completion_tokens)
    max_prompt_tokens: int | None = None  # default: the model's context minus one
    max_body_bytes: int = 1 << 20
    max_queue: int = 256  # waiting requests before 503
    default_max_tokens: int = 256  # chat requests that name none


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type_, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- validation


def _num(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(400, f"{name} must be a number", name)
    if v > hi or v < lo or (lo_open and v <= lo):
        raise APIError(400, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{name} must be an integer", name)
    if not lo <= v <= hi:
        raise APIError(400, f"{name} must be between {lo} and {hi}, got {v}", name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 4 or not all(isinstance(s, str) and s for s in v):
        raise APIError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    return tuple(v)


def _common(body: dict, limits: ServerLimits, default_max_tokens: int) -> SamplingParams:
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported", name)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise APIError(400, "logprobs are not supported", "logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    mt = _int({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1, limits.max_tokens)
    return SamplingParams(
        max_tokens=mt,
        temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),
        stop=_stop(body),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )


def _messages(body: dict) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            m["role"] = role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role must be system, user, assistant or tool, got {role!r}", f"messages[{i}].role")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
        if role == "tool" and not m.get("tool_call_id"):
            raise APIError(400, f"messages[{i}] (tool) needs tool_call_id", f"messages[{i}].tool_call_id")
    return msgs


def _tools(body: dict) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list", "tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}].function.name must be a non-empty string", f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}]")
            _check_schema(params, f"tools[{i}].function.parameters")
    return tools or None


def _check_schema(schema: dict, param: str) -> None:
    problem = schema_problem(schema)
    if problem is not None:
        raise APIError(400, f"{param} is not a valid JSON schema: {problem}", param)


def _response_schema(body: dict) -> dict[str, Any] | None:
    try:
        return response_schema(body.get("response_format"))
    except ValueError as e:
        raise APIError(400, str(e), "response_format") from None


# --------------------------------------------------------------------------- the app


class _BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (Content-Length or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Any) -> None:
        body = json.dumps(APIError(413, f"request body over {self.limit} bytes", code="body_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(chat_model: Any, *, limits: ServerLimits | None = None, api_key: str | None = None,
               max_batch_size: int = 16, batch_window_s: float = 0.005, engine: Engine | None = None) -> Any:
    """The FastAPI app serving ``chat_model`` (a :class:`openk2.serve.backends.ChatModel`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    limits = limits or ServerLimits()
    context = int(chat_model.backend.max_context)
    max_prompt = min(limits.max_prompt_tokens or context - 1, context - 1)
    state: dict[str, Any] = {"engine": engine, "closing": False}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if state["engine"] is None:
            state["engine"] = Engine(chat_model, max_batch_size=max_batch_size, batch_window_s=batch_window_s)
        yield
        # graceful shutdown: uvicorn has stopped accepting and drained in-flight requests
        state["closing"] = True
        await asyncio.to_thread(state["engine"].close)

    app = FastAPI(title="openk2", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.openk2 = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def read_json(request: Request) -> dict[str, Any]:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid API key", code="invalid_api_key", type_="authentication_error")
        if state["closing"]:
            raise APIError(503, "the server is shutting down", code="shutting_down", type_="server_error",
                           headers={"Retry-After": "5"})
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get("model")
        if model not in (None, "", chat_model.name):
            raise APIError(404, f"model {model!r} does not exist (this server has {chat_model.name!r})", "model",
                           "model_not_found")
        return body

    def check_prompt(ids: list[int], params: SamplingParams) -> None:
        if len(ids) > max_prompt:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over the limit of {max_prompt}", "messages",
                           "context_length_exceeded")
        if len(ids) + params.max_tokens > context:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                           f"context of {context} tokens", "max_tokens", "context_length_exceeded")

    def submit(ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
               events: asyncio.Queue | None = None) -> tuple[GenRequest, asyncio.Event]:
        engine: Engine = state["engine"]
        if engine.pending >= limits.max_queue:
            raise APIError(503, "the server is busy", code="overloaded", type_="server_error", headers={"Retry-After": "1"})
        finished = asyncio.Event()

        def on_token(req: GenRequest, tok: int | None) -> None:
            if events is not None:
                loop.call_soon_threadsafe(events.put_nowait, tok)
            if tok is None:
                loop.call_soon_threadsafe(finished.set)

        req = GenRequest(ids, params, on_token=on_token)
        try:
            engine.submit(req)
        except EngineClosed:
            raise APIError(503, "the server is shutting down", code="shutting_down", type_="server_error",
                           headers={"Retry-After": "5"}) from None
        return req, finished

    async def wait(req: GenRequest, finished: asyncio.Event) -> None:
        try:
            await finished.wait()
        except asyncio.CancelledError:  # the client went away: stop decoding for it
            req.cancelled = True
            raise
        if req.finish_reason == "error":
            raise APIError(500, f"generation failed: {req.error}", type_="server_error")

    def usage(req: GenRequest) -> dict[str, int]:
        completion = len(req.output_ids) + (req.stop_token is not None)
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(req.prompt_ids) + completion}

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = state["engine"]
        return {"status": "closing" if state["closing"] else "ok", "model": chat_model.name,
                "pending": engine.pending if engine else 0, "running": engine.running if engine else 0,
                **(engine.stats if engine else {})}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid API key", code="invalid_api_key", type_="authentication_error")
        return {"object": "list", "data": [{"id": chat_model.name, "object": "model", "created": created,
                                            "owned_by": "openk2", "max_model_len": context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_json(request)
        messages, tools = _messages(body), _tools(body)
        params = _common(body, limits, limits.default_max_tokens)
        params.json_schema = _response_schema(body)
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            ids, params, plan = chat_model.prepare_chat(messages, tools, body.get("tool_choice"), params)
        except Exception as e:  # ValueError from our renderer, jinja errors from an HF chat template
            raise APIError(400, f"cannot render the conversation: {e}", "messages") from None
        check_prompt(ids, params)
        loop = asyncio.get_running_loop()
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def message_of(req: GenRequest) -> tuple[dict[str, Any], str]:
            parsed = chat_model.finish_chat(req.text, plan, tools, complete=req.finish_reason == "stop")
            calls = [c.to_openai() for c in parsed.tool_calls]
            msg: dict[str, Any] = {"role": "assistant", "content": parsed.content or None}
            if calls:
                msg["tool_calls"] = calls
            if parsed.errors:
                msg["openk2_parse_errors"] = [str(e) for e in parsed.errors]
                if not calls:  # keep the raw completion rather than lose it
                    msg["content"] = plan.prefix + req.text
            if msg["content"] is None and not calls:
                msg["content"] = ""
            reason = "tool_calls" if calls else ("length" if req.finish_reason == "length" else "stop")
            return msg, reason

        if not stream:
            req, finished = submit(ids, params, loop)
            await wait(req, finished)
            msg, reason = message_of(req)
            return {"id": rid, "object": "chat.completion", "created": now, "model": chat_model.name,
                    "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": reason}],
                    "usage": usage(req)}

        events: asyncio.Queue = asyncio.Queue()
        req, finished = submit(ids, params, loop, events)
        holdback = max((len(s) for s in params.stop), default=1) - 1

        def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": now,
                                          "model": chat_model.name,
                                          "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                       "finish_reason": reason}]}) + "\n\n"

        async def sse() -> AsyncIterator[str]:
            sent, in_tools = 0, bool(plan.prefix)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    tok = await events.get()
                    done = tok is None
                    text = req.text
                    if not in_tools and st.TOOL_CALLS_SECTION_BEGIN in text:
                        in_tools = True
                        text = text[: text.index(st.TOOL_CALLS_SECTION_BEGIN)]
                    elif in_tools:
                        text = text[:sent]
                    if not done:  # hold back what may be the start of a stop string or a partial character
                        text = text[: max(sent, len(text) - holdback)].rstrip("\ufffd") if not in_tools else text
                    if len(text) > sent and not (done and req.finish_reason == "error"):
                        yield chunk({"content": text[sent:]})
                        sent = len(text)
                    if done:
                        break
                if req.finish_reason == "error":
                    yield "data: " + json.dumps(APIError(500, f"generation failed: {req.error}", type_="server_error").body()) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                msg, reason = message_of(req)
                if msg.get("tool_calls"):
                    yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(msg["tool_calls"])]})
                elif msg["content"] and len(msg["content"]) > sent and msg.get("openk2_parse_errors"):
                    yield chunk({"content": msg["content"][sent:]})
                yield chunk({}, reason)
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": now,
                                                 "model": chat_model.name, "choices": [], "usage": usage(req)}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not req.done.is_set():
                    req.cancelled = True

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = chat_model.text_prompt_ids(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(not 0 <= t < chat_model.backend.vocab_size for t in prompt):
                raise APIError(400, "prompt token ids out of the vocabulary", "prompt")
            ids = list(prompt)
        else:
            raise APIError(400, "prompt must be a string (or one string, or a list of token ids)", "prompt")
        if not ids:
            raise APIError(400, "prompt is empty", "prompt")
        params = _common(body, limits, 16)
        check_prompt(ids, params)
        loop = asyncio.get_running_loop()
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def text_of(req: GenRequest) -> str:
            return req.text

        if not body.get("stream"):
            req, finished = submit(ids, params, loop)
            await wait(req, finished)
            return {"id": rid, "object": "text_completion", "created": now, "model": chat_model.name,
                    "choices": [{"index": 0, "text": text_of(req), "logprobs": None,
                                 "finish_reason": "length" if req.finish_reason == "length" else "stop"}],
                    "usage": usage(req)}

        events: asyncio.Queue = asyncio.Queue()
        req, finished = submit(ids, params, loop, events)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(text: str, reason: str | None = None) -> str:
            return "data: " + json.dumps({"id": rid, "object": "text_completion", "created": now, "model": chat_model.name,
                                          "choices": [{"index": 0, "text": text, "logprobs": None,
                                                       "finish_reason": reason}]}) + "\n\n"

        async def sse() -> AsyncIterator[str]:
            sent = 0
            try:
                while True:
                    tok = await events.get()
                    text = req.text
                    if tok is not None:
                        text = text[: max(sent, len(text) - holdback)].rstrip("\ufffd")
                    if len(text) > sent and req.finish_reason != "error":
                        yield chunk(text[sent:])
                        sent = len(text)
                    if tok is None:
                        break
                if req.finish_reason == "error":
                    yield "data: " + json.dumps(APIError(500, f"generation failed: {req.error}", type_="server_error").body()) + "\n\n"
                else:
                    yield chunk("", "length" if req.finish_reason == "length" else "stop")
                    if include_usage:
                        yield "data: " + json.dumps({"id": rid, "object": "text_completion", "created": now,
                                                     "model": chat_model.name, "choices": [], "usage": usage(req)}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not req.done.is_set():
                    req.cancelled = True

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    wrapped = _BodyLimit(app, limits.max_body_bytes)
    wrapped.state = app.state  # tests and the CLI reach the engine through here
    return wrapped
