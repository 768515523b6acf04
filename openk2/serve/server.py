"""An OpenAI-compatible HTTP server for openk2 checkpoints (``openk2 serve CHECKPOINT``).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (tools,
tool_choice, response_format, n, logprobs, streaming over SSE),
``POST /v1/completions`` (n, legacy logprobs), ``GET /health``. Requests go to an
:class:`~openk2.serve.engine.Engine` thread that batches concurrent requests;
the event loop only parses, validates and streams. Rendering the chat template,
tokenising and compiling a JSON-schema grammar run on worker threads
(``asyncio.to_thread``), so a long prompt does not stall other streams.

Every parameter is validated, and a schema compiled, before a request reaches
the engine, so one bad request is its own 400 and never fails the batch it
would have joined. Errors use OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``: 400 for an invalid request (``param`` names the field,
e.g. ``temperature`` or ``messages[0].content``), 401 for a wrong API key, 404
for an unknown model or route, 413 for a body over the limit (declared or
streamed), 503 (with Retry-After) when the queue is full or the server is
shutting down, 500 for a request the engine failed (that request only) or an
unexpected error (no traceback in the body; it goes to the log). The
connection stays open after every error.

A non-streaming request whose client goes away (a timeout, a closed socket) is
cancelled within ``DISCONNECT_POLL_S``; a streaming one as soon as the stream
is closed.

Tool calls come back parsed (``message.tool_calls``). When the model writes a
malformed call, the well-formed calls are still returned, the problems are
listed in ``message.openk2_parse_errors``, and if no call survived, the raw
completion is returned as ``content`` so that nothing is lost.
"""


# No `from __future__ import annotations` here: FastAPI reads the route
# signatures' annotations (Request) at definition time.
import asyncio
import codecs
import dataclasses
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from openk2.chat.schema import response_schema, schema_problem
from openk2.data import special_tokens as st
from openk2.serve import engine as engine_module
from openk2.serve.engine import Engine, EngineClosed, GenRequest, SamplingParams

log = logging.getLogger("openk2.serve")

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # chat top_logprobs
MAX_LEGACY_LOGPROBS = 5  # /v1/completions logprobs
MAX_JSON_DEPTH = 64  # nesting of a request body
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks its client is still there
LOGPROB_FLOOR = -9999.0  # what a -inf log-probability is reported as (JSON has no infinity)


@dataclass
class ServerLimits:
    max_tokens: int = 1024  # per request (max_tokens / max_completion_tokens)
    max_prompt_tokens: int | None = None  # default: the model's context minus one
    max_body_bytes: int = 1 << 20
    max_queue: int = 256  # waiting requests before 503
    # chat requests that name none: this many, clamped to the context the prompt leaves;
    # None (the default): all of it, up to max_tokens
    default_max_tokens: int | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type_, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _internal_error() -> APIError:
    return APIError(500, "internal server error (the server's log has the details)", code="internal_error",
                    type_="server_error")


# --------------------------------------------------------------------------- validation


def _parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says why not."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise APIError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    _check_values(body)
    return body


def _check_values(body: Any) -> None:
    """400 for what JSON parsers accept but no field can hold: NaN, Infinity (or a float that
    overflows to it), a lone surrogate (``"\\ud800"``), nesting past ``MAX_JSON_DEPTH``.
    ``param`` is the path of the offending value, e.g. ``messages[0].content``."""
    todo: list[tuple[Any, str, int]] = [(body, "", 0)]
    while todo:
        v, path, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels (at {path})", path)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise APIError(400, f"{path} must be a finite number, got {v}", path)
        elif isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, dict):
            for k, x in v.items():
                _check_text(k, path or "body")
                todo.append((x, f"{path}.{k}" if path else k, depth + 1))
        elif isinstance(v, list):
            todo.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def _check_text(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{path} is not valid Unicode text (it holds a lone surrogate)", path) from None


def _num(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"{name} must be a finite number", name)
    if v > hi or v < lo or (lo_open and v <= lo):
        raise APIError(400, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int, param: str | None = None) -> int | None:
    v = body.get(name)
    param = param or name
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{param} must be an integer", param)
    if not lo <= v <= hi:
        raise APIError(400, f"{param} must be between {lo} and {hi}, got {v}", param)
    return v


def _bool(body: dict, name: str, default: bool = False, param: str | None = None) -> bool:
    v = body.get(name)
    param = param or name
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"{param} must be true or false", param)
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


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is None:
        return stream, False
    if not isinstance(so, dict):
        raise APIError(400, "stream_options must be an object, e.g. {\"include_usage\": true}", "stream_options")
    return stream, _bool(so, "include_usage", param="stream_options.include_usage")


def _sampling(body: dict, limits: ServerLimits, chat: bool) -> tuple[SamplingParams, int, int | None]:
    """(sampling params, n, the max_tokens the request names or None). ``max_tokens`` in the params is a
    placeholder until the prompt's length is known (:func:`create_app`'s ``sized``)."""
    n = _int(body, "n", 1, 1, MAX_N)
    for name in ("presence_penalty", "frequency_penalty"):
        if _num(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise APIError(400, f"{name} is not supported", name)
    if body.get("logit_bias") not in (None, {}):
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if chat:
        logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        top = top or 0
    else:
        k = _int(body, "logprobs", None, 0, MAX_LEGACY_LOGPROBS)
        logprobs, top = k is not None, k or 0
        if body.get("top_logprobs") is not None:
            raise APIError(400, "top_logprobs is a chat parameter; /v1/completions takes logprobs: k (0-5)", "top_logprobs")
        if _bool(body, "echo"):
            raise APIError(400, "echo is not supported", "echo")
        if body.get("best_of") not in (None, 1):
            raise APIError(400, "best_of is not supported (n is)", "best_of")
        if body.get("suffix") is not None:
            raise APIError(400, "suffix is not supported", "suffix")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, None, 1, limits.max_tokens)
    params = SamplingParams(
        max_tokens=max_tokens or 1,
        temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),
        stop=_stop(body),
        ignore_eos=_bool(body, "ignore_eos"),
        logprobs=logprobs,
        top_logprobs=top,
    )
    return params, n, max_tokens


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
    _check_refs(schema, param)


def _check_refs(schema: dict, param: str) -> None:
    """400 unless every ``$ref`` in ``schema`` is local (``#`` or ``#/...``) and names a schema in it
    (remote references are never fetched; constrained decoding resolves only local ones)."""
    todo: list[Any] = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                if not (ref == "#" or ref.startswith("#/")):
                    raise APIError(400, f"{param}: $ref {ref!r} is not supported (only local references, '#/...')", param)
                target: Any = schema
                for part in ref[2:].split("/") if ref != "#" else []:
                    part = part.replace("~1", "/").replace("~0", "~")
                    if isinstance(target, dict) and part in target:
                        target = target[part]
                    elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                        target = target[int(part)]
                    else:
                        raise APIError(400, f"{param}: $ref {ref!r} does not resolve to anything in the schema", param)
                if not isinstance(target, (dict, bool)):
                    raise APIError(400, f"{param}: $ref {ref!r} does not name a schema", param)
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)


def _response_schema(body: dict) -> dict[str, Any] | None:
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict):
            raise APIError(400, "response_format must be an object", "response_format")
        if rf.get("type") == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                raise APIError(400, "response_format.json_schema must be an object with a schema object: "
                               "{\"name\": ..., \"schema\": {...}}", "response_format")
    try:
        schema = response_schema(rf)
    except ValueError as e:
        raise APIError(400, str(e), "response_format") from None
    if schema is not None:
        _check_refs(schema, "response_format")
    return schema


def _compile_grammar(schema: dict[str, Any], param: str) -> Any:
    """The constrained-decoding grammar of ``schema`` (run on a worker thread); a 400 naming ``param``
    when the compiler rejects it, so that no request carries a schema the engine would fail on."""
    from openk2.serve import constrained

    compile_ = getattr(constrained, "grammar_for", None)  # cached; raises ValueError naming the problem
    try:
        if compile_ is not None:
            return compile_(schema)
        grammar = constrained.SchemaGrammar(schema)
        grammar.can_continue(grammar.initial())  # expands the root now, not in the batch
        return grammar
    except Exception as e:  # ValueError, KeyError (a $ref), RecursionError...
        raise APIError(400, f"{param} cannot be used for constrained decoding: {e}", param) from None


def _seed(seed: int | None, i: int) -> int | None:
    """Choice i's seed: seed + i, kept in int64."""
    return None if seed is None else (seed + i + 2**63) % 2**64 - 2**63


_PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop", "top_logprobs", "logprobs", "n", "prompt")


def _param_named(message: str) -> str | None:
    """The request field an engine error message starts with, if it names one."""
    first = message.split(" ", 1)[0]
    return first if first in _PARAMS else ("response_format" if first == "response" else None)


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else LOGPROB_FLOOR


# --------------------------------------------------------------------------- logprobs


class _TokenPieces:
    """A token's text (decoded alone) and its exact bytes (byte-level BPE: from the token's
    byte alphabet, so each half of a split UTF-8 character has its own byte)."""

    def __init__(self, chat_model: Any) -> None:
        self.chat_model = chat_model
        tok = chat_model.tokenizer
        self.id_to_token = getattr(tok, "id_to_token", None) or getattr(tok, "convert_ids_to_tokens", None)
        self._byte_of: dict[str, int] | None = None
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.chat_model.decode([token_id])
            raw = (self._raw(token_id) if "\ufffd" in text else None) or text.encode("utf-8")
            hit = self._cache[token_id] = (text, raw)
        return hit

    def _raw(self, token_id: int) -> bytes | None:
        if self.id_to_token is None:
            return None
        if self._byte_of is None:
            from openk2.data.tokenizer import bytes_to_unicode

            self._byte_of = {c: b for b, c in bytes_to_unicode().items()}
        try:
            s = self.id_to_token(token_id)
        except Exception:
            return None
        if not isinstance(s, str) or not s or any(c not in self._byte_of for c in s):
            return None
        return bytes(self._byte_of[c] for c in s)


class _LogprobCursor:
    """One choice's recorded log-probabilities in OpenAI's shapes, a slice at a time (streaming)
    or all at once: chat ``{"content": [...], "refusal": None}`` or the legacy completions
    ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``. Covers the output tokens,
    not the stop token."""

    def __init__(self, pieces: _TokenPieces, req: GenRequest, legacy: bool) -> None:
        self.pieces, self.req, self.legacy = pieces, req, legacy
        self.k = req.params.top_logprobs
        self.pos = 0
        self.chars = 0  # characters of the text before token `pos` (legacy text_offset)
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, upto: int | None = None) -> dict[str, Any] | None:
        """The entries of tokens [pos, upto) that have log-probabilities, or None when there are none."""
        req = self.req
        end = min(len(req.output_ids) if upto is None else upto, len(req.output_ids), len(req.logprobs))
        if end <= self.pos:
            return None
        rows = range(self.pos, end)
        self.pos = end
        return self._legacy(rows) if self.legacy else self._chat(rows)

    def all(self) -> dict[str, Any]:
        return self.take() or (self._legacy(range(0)) if self.legacy else self._chat(range(0)))

    def _tops(self, j: int) -> list[tuple[int, float]]:
        tops = self.req.top_logprobs
        return list(tops[j])[: self.k] if j < len(tops) else []

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.pieces(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(raw)}

    def _chat(self, rows: range) -> dict[str, Any]:
        req = self.req
        content = [{**self._entry(req.output_ids[j], req.logprobs[j]),
                    "top_logprobs": [self._entry(t, lp) for t, lp in self._tops(j)]} for j in rows]
        return {"content": content, "refusal": None}

    def _legacy(self, rows: range) -> dict[str, Any]:
        req = self.req
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for j in rows:
            text, raw = self.pieces(req.output_ids[j])
            lp = _finite(req.logprobs[j])
            top = {}
            for t, tlp in self._tops(j):
                top.setdefault(self.pieces(t)[0], _finite(tlp))
            top.setdefault(text, lp)  # the sampled token is always there (up to k + 1 entries)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.chars)
            self.chars += len(self.utf8.decode(raw))
        return out


# --------------------------------------------------------------------------- the app


class _Guard:
    """The outermost ASGI layer: 413 for a request body over ``limit`` bytes (Content-Length or
    streamed), and an OpenAI-shaped 500 for an exception that escapes the app. An exception the
    app already answered (Starlette answers, then re-raises) is not re-raised to uvicorn, which
    would close the kept-alive connection."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._answer(send, _TooLarge(self.limit))
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)  # an APIError: the app answers it (413)
            return msg

        async def tracked(msg: dict) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except Exception as e:
            if started:  # answered already (the app's handlers logged what needed logging)
                return
            if not isinstance(e, APIError):
                log.error("unhandled error in %s %s", scope.get("method"), scope.get("path"), exc_info=e)
                e = _internal_error()
            await self._answer(tracked, e)

    @staticmethod
    async def _answer(send: Any, err: APIError) -> None:
        body = json.dumps(err.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes", code="body_too_large")


def create_app(chat_model: Any, *, limits: ServerLimits | None = None, api_key: str | None = None,
               max_batch_size: int = 16, batch_window_s: float = 0.005, engine: Engine | None = None) -> Any:
    """The FastAPI app serving ``chat_model`` (a :class:`openk2.serve.backends.ChatModel`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or ServerLimits()
    context = int(chat_model.backend.max_context)
    max_prompt = min(limits.max_prompt_tokens or context - 1, context - 1)
    state: dict[str, Any] = {"engine": engine, "closing": False}
    created = int(time.time())
    pieces = _TokenPieces(chat_model)

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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(_internal_error().body(), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid API key", code="invalid_api_key", type_="authentication_error")

    async def read_json(request: Request) -> dict[str, Any]:
        check_key(request)
        if state["closing"]:
            raise APIError(503, "the server is shutting down", code="shutting_down", type_="server_error",
                           headers={"Retry-After": "5"})
        body = _parse_body(await request.body())
        model = body.get("model")
        if model not in (None, "", chat_model.name):
            raise APIError(404, f"model {model!r} does not exist (this server has {chat_model.name!r})", "model",
                           "model_not_found")
        return body

    def sized(ids: list[int], params: SamplingParams, explicit: int | None, default: int | None,
              param: str) -> SamplingParams:
        """``params`` with max_tokens: the request's (which must fit the context) or, when it named
        none, ``default`` clamped to the context the prompt leaves."""
        if len(ids) > max_prompt:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over the limit of {max_prompt}", param,
                           "context_length_exceeded")
        if explicit is None:
            default = limits.max_tokens if default is None else default
            return dataclasses.replace(params, max_tokens=max(1, min(default, limits.max_tokens, context - len(ids))))
        if len(ids) + explicit > context:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({explicit}) exceeds the model's "
                           f"context of {context} tokens", "max_tokens", "context_length_exceeded")
        return dataclasses.replace(params, max_tokens=explicit)

    async def submit(ids: list[int], params: SamplingParams, n: int,
                     stream: bool) -> tuple[list[GenRequest], asyncio.Queue | None, asyncio.Event]:
        """n requests for one prompt (choice i seeded seed + i). Streaming: (i, token) events, then (i, None)."""
        engine: Engine = state["engine"]
        if engine.pending + n > limits.max_queue:
            raise APIError(503, "the server is busy", code="overloaded", type_="server_error", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue | None = asyncio.Queue() if stream else None
        all_done = asyncio.Event()
        left = [n]

        def one_done() -> None:
            left[0] -= 1
            if left[0] == 0:
                all_done.set()

        def on_token_of(i: int) -> Callable[[GenRequest, int | None], None]:
            def on_token(req: GenRequest, tok: int | None) -> None:  # on the engine thread
                try:
                    if events is not None:
                        loop.call_soon_threadsafe(events.put_nowait, (i, tok))
                    if tok is None:
                        loop.call_soon_threadsafe(one_done)
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                    req.cancelled = True
            return on_token

        reqs = [GenRequest(ids, params if i == 0 else dataclasses.replace(params, seed=_seed(params.seed, i)),
                           on_token=on_token_of(i)) for i in range(n)]
        prepare = getattr(engine_module, "prepare", None)  # the engine's own checks and constraint set-up
        try:
            if prepare is not None:  # on a worker thread: it builds the token constraint (and the vocabulary once)
                await asyncio.to_thread(lambda: [prepare(r, chat_model) for r in reqs])
            for r in reqs:
                engine.submit(r)
        except EngineClosed:
            cancel(reqs)
            raise APIError(503, "the server is shutting down", code="shutting_down", type_="server_error",
                           headers={"Retry-After": "5"}) from None
        except ValueError as e:  # the engine's InvalidRequest: what this server's checks did not catch
            cancel(reqs)
            raise APIError(400, str(e), _param_named(str(e))) from None
        return reqs, events, all_done

    def cancel(reqs: list[GenRequest]) -> None:
        for r in reqs:
            if not r.done.is_set():
                r.cancelled = True

    def generation_error(req: GenRequest) -> APIError:
        log.error("generation failed: %s", req.error)
        return APIError(500, f"generation failed: {req.error}", type_="server_error", code="generation_failed")

    async def wait(request: Request, reqs: list[GenRequest], all_done: asyncio.Event) -> None:
        """Until every request is done; cancels them when the client goes away meanwhile."""
        waiter = asyncio.ensure_future(all_done.wait())
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
                if not waiter.done() and await request.is_disconnected():
                    raise APIError(499, "the client closed the request", code="client_closed")
        except BaseException:  # the client is gone (or the task was cancelled): stop decoding for it
            cancel(reqs)
            raise
        finally:
            waiter.cancel()
        for r in reqs:
            if r.finish_reason == "error":
                raise generation_error(r)

    def usage(reqs: list[GenRequest]) -> dict[str, int]:
        completion = sum(len(r.output_ids) + (r.stop_token is not None) for r in reqs)
        prompt = len(reqs[0].prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj: dict[str, Any]) -> str:
        return "data: " + json.dumps(obj) + "\n\n"

    def sse_error(err: APIError) -> list[str]:
        return [sse(err.body()), "data: [DONE]\n\n"]

    def visible(text: str, sent: int, done: bool, holdback: int) -> str:
        """What of ``text`` may be streamed now: not what may start a stop string or be half a character."""
        return text if done else text[: max(sent, len(text) - holdback)].rstrip("\ufffd")

    def streaming_response(lines: AsyncIterator[str]) -> Any:
        return StreamingResponse(lines, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def stream_choices(rid: str, reqs: list[GenRequest], events: asyncio.Queue, legacy: bool,
                             content: Callable[[int, str, Any], str],
                             streamable: Callable[[int, GenRequest, int, bool], str],
                             finish: Callable[[int, GenRequest, int, Any], list[str]],
                             head: list[str], tail: Callable[[], list[str]]) -> AsyncIterator[str]:
        """The SSE lines of n streamed choices (both endpoints): ``head``; for each choice, as its
        tokens arrive, ``content(i, new_text, logprobs)`` with what ``streamable(i, req, sent, done)``
        allows; at its end ``finish(i, req, sent, rest_of_logprobs)``; then ``tail()`` and ``[DONE]``.
        Tokens already queued when the loop gets to them go out in one chunk per choice. A failed
        choice ends the stream with its error event; the requests are cancelled when the stream
        closes (the client went away)."""
        n = len(reqs)
        sent, ntok, left = [0] * n, [0] * n, n
        cursors = [_LogprobCursor(pieces, r, legacy) if r.params.logprobs else None for r in reqs]

        def take(i: int, upto: int | None = None) -> Any:
            return cursors[i].take(upto) if cursors[i] is not None else None

        try:
            for line in head:
                yield line
            while left:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                last = {i: k for k, (i, _) in enumerate(batch)}  # each choice's last event in this batch
                for k, (i, tok) in enumerate(batch):
                    req, done = reqs[i], tok is None
                    if done and req.finish_reason == "error":
                        for line in sse_error(generation_error(req)):
                            yield line
                        return
                    ntok[i] += not done
                    if not done and last[i] != k:  # a later token of this choice is queued: one chunk for both
                        continue
                    text = streamable(i, req, sent[i], done)
                    if len(text) > sent[i]:
                        yield content(i, text[sent[i]:], take(i, ntok[i]))
                        sent[i] = len(text)
                    if done:
                        left -= 1
                        for line in finish(i, req, sent[i], take(i)):
                            yield line
            for line in tail():
                yield line
            yield "data: [DONE]\n\n"
        except Exception as e:  # never a half-closed stream: an error event, then [DONE]
            log.error("streaming %s failed", rid, exc_info=e)
            for line in sse_error(_internal_error()):
                yield line
        finally:
            cancel(reqs)

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = state["engine"]
        return {"status": "closing" if state["closing"] else "ok", "model": chat_model.name,
                "pending": engine.pending if engine else 0, "running": engine.running if engine else 0,
                **(engine.stats if engine else {})}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": chat_model.name, "object": "model", "created": created,
                                            "owned_by": "openk2", "max_model_len": context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_json(request)
        messages, tools = _messages(body), _tools(body)
        params, n, explicit = _sampling(body, limits, chat=True)
        stream, include_usage = _stream(body)
        params.json_schema = _response_schema(body)
        try:
            ids, params, plan = await asyncio.to_thread(chat_model.prepare_chat, messages, tools,
                                                        body.get("tool_choice"), params)
        except Exception as e:  # ValueError from our renderer, jinja errors from an HF chat template
            raise APIError(400, f"cannot render the conversation: {e}", "messages") from None
        params = sized(ids, params, explicit, limits.default_max_tokens, "messages")
        if params.json_schema is not None and getattr(params, "grammar", None) is None:
            param = "response_format" if plan.arguments_schema is None else "tools"
            params = dataclasses.replace(params, grammar=await asyncio.to_thread(_compile_grammar, params.json_schema, param))
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        marker = getattr(chat_model, "tool_call_marker", st.TOOL_CALLS_SECTION_BEGIN)

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
            reqs, _, all_done = await submit(ids, params, n, stream=False)
            await wait(request, reqs, all_done)
            choices = []
            for i, req in enumerate(reqs):
                msg, reason = message_of(req)
                lp = _LogprobCursor(pieces, req, legacy=False).all() if params.logprobs else None
                choices.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": reason})
            return {"id": rid, "object": "chat.completion", "created": now, "model": chat_model.name,
                    "choices": choices, "usage": usage(reqs)}

        reqs, events, _ = await submit(ids, params, n, stream=True)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        in_tools = [bool(plan.prefix)] * n  # once the tool-call marker shows, the rest is the call, not content

        def chunk(i: int, delta: dict[str, Any], reason: str | None = None, logprobs: Any = None) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": chat_model.name,
                        "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]})

        def streamable(i: int, req: GenRequest, sent: int, done: bool) -> str:
            text = req.text
            if not in_tools[i] and marker in text:
                in_tools[i] = True
                return text[: text.index(marker)]
            return text[:sent] if in_tools[i] else visible(text, sent, done, holdback)

        def finish(i: int, req: GenRequest, sent: int, rest: Any) -> list[str]:
            msg, reason = message_of(req)
            out = []
            if msg.get("tool_calls"):
                out.append(chunk(i, {"tool_calls": [{"index": j, **c} for j, c in enumerate(msg["tool_calls"])]}, logprobs=rest))
                rest = None
            elif msg["content"] and len(msg["content"]) > sent and msg.get("openk2_parse_errors"):
                out.append(chunk(i, {"content": msg["content"][sent:]}, logprobs=rest))
                rest = None
            return out + [chunk(i, {}, reason, logprobs=rest)]

        def tail() -> list[str]:  # once every choice is done
            return [sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": chat_model.name,
                         "choices": [], "usage": usage(reqs)})] if include_usage else []

        return streaming_response(stream_choices(
            rid, reqs, events, False, lambda i, text, lp: chunk(i, {"content": text}, logprobs=lp), streamable, finish,
            head=[chunk(i, {"role": "assistant", "content": ""}) for i in range(n)], tail=tail))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        params, n, explicit = _sampling(body, limits, chat=False)
        stream, include_usage = _stream(body)
        if isinstance(prompt, str):
            try:
                ids = await asyncio.to_thread(chat_model.text_prompt_ids, prompt)
            except Exception as e:
                raise APIError(400, f"cannot tokenise the prompt: {e}", "prompt") from None
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(not 0 <= t < chat_model.backend.vocab_size for t in prompt):
                raise APIError(400, "prompt token ids out of the vocabulary", "prompt")
            ids = list(prompt)
        else:
            raise APIError(400, "prompt must be a string (or one string, or a list of token ids)", "prompt")
        if not ids:
            raise APIError(400, "prompt is empty", "prompt")
        params = sized(ids, params, explicit, 16, "prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def reason_of(req: GenRequest) -> str:
            return "length" if req.finish_reason == "length" else "stop"

        if not stream:
            reqs, _, all_done = await submit(ids, params, n, stream=False)
            await wait(request, reqs, all_done)
            return {"id": rid, "object": "text_completion", "created": now, "model": chat_model.name,
                    "choices": [{"index": i, "text": r.text,
                                 "logprobs": _LogprobCursor(pieces, r, legacy=True).all() if params.logprobs else None,
                                 "finish_reason": reason_of(r)} for i, r in enumerate(reqs)],
                    "usage": usage(reqs)}

        reqs, events, _ = await submit(ids, params, n, stream=True)
        holdback = max((len(s) for s in params.stop), default=1) - 1

        def chunk(i: int, text: str, reason: str | None = None, logprobs: Any = None) -> str:
            return sse({"id": rid, "object": "text_completion", "created": now, "model": chat_model.name,
                        "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}]})

        def tail() -> list[str]:
            return [sse({"id": rid, "object": "text_completion", "created": now, "model": chat_model.name,
                         "choices": [], "usage": usage(reqs)})] if include_usage else []

        return streaming_response(stream_choices(
            rid, reqs, events, True, lambda i, text, lp: chunk(i, text, logprobs=lp),
            lambda i, req, sent, done: visible(req.text, sent, done, holdback),
            lambda i, req, sent, rest: [chunk(i, "", reason_of(req), logprobs=rest)], head=[], tail=tail))

    wrapped = _Guard(app, limits.max_body_bytes)
    wrapped.state = app.state  # tests and the CLI reach the engine through here
    return wrapped
