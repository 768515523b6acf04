"""OpenAICompatClient over real HTTP on loopback: retries, Retry-After, timeouts, cache, concurrency, schemas."""

import asyncio
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))

from serve_helpers import LoopbackServer, recorded, scripted_app  # noqa: E402

from openk2.llm import LLMRequestError, OpenAICompatClient, StructuredOutputError  # noqa: E402
from openk2.llm.cache import cache_key  # noqa: E402

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def ok(name="chat_text", **kw):
    return {"status": 200, "body": recorded(name), **kw}


def serve(script):
    app = scripted_app(script)
    return app, LoopbackServer(app)


def client(url, **kw):
    return OpenAICompatClient(url, api_key="sk-test", model="k2-tiny", **kw)


def test_chat_returns_content_usage_and_sends_the_openai_body():
    app, srv = serve([ok()])
    with srv, client(srv.url) as c:
        r = c.chat(HELLO, max_tokens=16, temperature=0.0, seed=3)
    assert r.content == "Paris is the capital of France." and r.finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (21, 8, 29)
    (req,) = app.state.requests
    assert req["path"] == "chat/completions"
    assert req["headers"]["authorization"] == "Bearer sk-test"
    assert req["body"] == {"model": "k2-tiny", "messages": HELLO, "max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 3}
    assert c.totals.as_dict() == {"requests": 1, "cached": 0, "retries": 0, "schema_retries": 0, "prompt_tokens": 21,
                                  "completion_tokens": 8, "failures": 0, "total_tokens": 29}


def test_tool_calls_pass_through():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    app, srv = serve([ok("chat_tool_call")])
    with srv, client(srv.url) as c:
        r = c.chat(HELLO, tools=tools, tool_choice="auto")
    assert r.finish_reason == "tool_calls" and r.content is None
    assert r.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert r.message()["tool_calls"][0]["id"] == "functions.get_weather:0"
    assert app.state.requests[0]["body"]["tools"] == tools and app.state.requests[0]["body"]["tool_choice"] == "auto"


def test_retry_after_seconds_is_honoured():
    limited = {"status": 429, "body": recorded("error_rate_limit"), "headers": {"Retry-After": "1"}}
    app, srv = serve([limited, ok()])
    with srv, client(srv.url) as c:
        r = c.chat(HELLO)
    assert r.content.startswith("Paris")
    t = app.state.times
    assert len(t) == 2 and t[1] - t[0] >= 0.95  # waited the server's second, not the SDK's 0.5 s backoff
    assert c.totals.retries == 1


def test_retry_after_ms_is_honoured():
    limited = {"status": 503, "body": {"error": "overloaded"}, "headers": {"retry-after-ms": "300"}}
    app, srv = serve([limited, limited, ok()])
    with srv, client(srv.url) as c:
        c.chat(HELLO)
    t = app.state.times
    assert len(t) == 3 and 0.28 <= t[1] - t[0] < 0.37 and 0.28 <= t[2] - t[1]  # 0.3 s, not the SDK's 0.375-0.5 s backoff
    assert c.totals.retries == 2


def test_server_errors_back_off_exponentially_then_give_up():
    app, srv = serve([{"status": 500, "body_text": "boom"}])
    with srv, client(srv.url, max_retries=2) as c:
        with pytest.raises(LLMRequestError, match="gave up after 3 tries: HTTP 500: boom"):
            c.chat(HELLO)
    gaps = [b - a for a, b in zip(app.state.times, app.state.times[1:])]
    assert len(app.state.requests) == 3
    # the SDK's backoff: 0.5 s * 2^k, minus up to 25% jitter
    for k, g in enumerate(gaps):
        assert 0.75 * 0.5 * 2**k - 0.01 <= g <= 0.5 * 2**k + 1.0  # generous upper bound: a busy machine
    assert [int(q["headers"]["x-stainless-retry-count"]) for q in app.state.requests] == [0, 1, 2]
    assert c.totals.failures == 1 and c.totals.retries == 2 and c.totals.requests == 0


def test_client_errors_are_not_retried():
    app, srv = serve([{"status": 400, "body": recorded("error_bad_request")}])
    with srv, client(srv.url) as c:
        with pytest.raises(LLMRequestError, match="HTTP 400: max_tokens must be at most 4096") as e:
            c.chat(HELLO, max_tokens=100000)
    assert e.value.status == 400 and len(app.state.requests) == 1
    assert c.totals.failures == 1 and c.totals.retries == 0


def test_a_200_that_is_not_json_is_a_clear_error():
    app, srv = serve([{"status": 200, "body_text": "<html>proxy error</html>"}])
    with srv, client(srv.url) as c:
        with pytest.raises(LLMRequestError, match="not JSON.*proxy error") as e:
            c.chat(HELLO)
    assert e.value.status == 200 and c.totals.failures == 1


def test_async_clients_do_not_outlive_their_event_loops():
    app, srv = serve([ok()])
    with srv, client(srv.url) as c:
        for _ in range(3):
            assert asyncio.run(c.achat(HELLO)).content
            assert len(c._loops) == 1  # the closed loops of earlier runs were dropped


def test_timeout_is_retried():
    app, srv = serve([ok(delay=2.0), ok()])
    with srv, client(srv.url, timeout=0.3) as c:
        t0 = time.monotonic()
        r = c.chat(HELLO)
        assert time.monotonic() - t0 < 1.9  # did not wait for the slow first answer
    assert r.content.startswith("Paris") and c.totals.retries == 1


def test_connection_refused_gives_up(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with client(f"http://127.0.0.1:{port}", max_retries=1) as c:
        with pytest.raises(LLMRequestError, match="gave up after 2 tries"):
            c.chat(HELLO)


def test_disk_cache_makes_a_rerun_free(tmp_path):
    app, srv = serve([ok()])
    with srv:
        with client(srv.url, cache_dir=tmp_path) as c1:
            first = c1.chat(HELLO, max_tokens=16)
        with client(srv.url, cache_dir=tmp_path) as c2:  # a rerun of the pipeline
            again = c2.chat(HELLO, max_tokens=16)
            other = c2.chat(HELLO, max_tokens=17)  # a different request is not a hit
    assert len(app.state.requests) == 2
    assert not first.cached and again.cached and not other.cached
    assert again.content == first.content and again.usage.total_tokens == 29
    assert c2.totals.cached == 1 and c2.totals.requests == 2 and c2.totals.total_tokens == 29  # the hit cost nothing
    assert len(list(tmp_path.rglob("*.json"))) == 2


def test_cache_key_ignores_url_and_key_but_not_the_request():
    body = {"model": "m", "messages": HELLO, "temperature": 0.0}
    assert cache_key(body) == cache_key(dict(reversed(list(body.items()))))
    assert cache_key(body) != cache_key({**body, "temperature": 0.7})
    assert cache_key(body, "/chat/completions") != cache_key(body, "/completions")


def test_concurrency_limit_holds_for_async_calls():
    app, srv = serve([ok(delay=0.2)])
    with srv:
        c = client(srv.url, max_concurrency=2)
        t0 = time.monotonic()
        results = c.chat_many([{"messages": HELLO, "seed": i} for i in range(6)])
        elapsed = time.monotonic() - t0
    assert all(not isinstance(r, Exception) for r in results)
    assert app.state.max_in_flight == 2
    assert elapsed >= 0.55  # three waves of 0.2 s
    assert c.totals.requests == 6 and c.totals.total_tokens == 6 * 29


def test_concurrency_limit_holds_for_threads():
    from concurrent.futures import ThreadPoolExecutor

    app, srv = serve([ok(delay=0.15)])
    with srv, client(srv.url, max_concurrency=3) as c:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: c.chat(HELLO, seed=i), range(8)))
    assert app.state.max_in_flight == 3 and len(app.state.requests) == 8


def test_structured_output_retries_with_the_validation_error():
    app, srv = serve([ok("chat_bad_json"), ok("chat_good_json")])
    with srv, client(srv.url) as c:
        r = c.chat([{"role": "user", "content": "Describe Ada Lovelace as JSON."}], json_schema=PERSON)
    assert r.parsed == {"name": "Ada", "age": 36}
    first, second = (q["body"] for q in app.state.requests)
    assert first["response_format"]["type"] == "json_schema"
    assert first["response_format"]["json_schema"]["schema"] == PERSON
    feedback = second["messages"][-1]
    assert second["messages"][-2] == {"role": "assistant", "content": '{"name": "Ada", "age": "thirty-six"}'}
    assert feedback["role"] == "user" and "age: 'thirty-six' is not of type 'integer'" in feedback["content"]
    assert c.totals.schema_retries == 1 and c.totals.total_tokens == 52 + 86


def test_structured_output_gives_up_with_a_clear_error():
    app, srv = serve([ok("chat_bad_json")])
    with srv, client(srv.url, schema_retries=1) as c:
        with pytest.raises(StructuredOutputError, match="no schema-valid JSON after 2 tries"):
            c.chat(HELLO, json_schema=PERSON)
    assert len(app.state.requests) == 2


def test_async_api_in_a_running_loop():
    app, srv = serve([ok()])

    async def main(c):
        rs = await asyncio.gather(c.achat(HELLO, seed=1), c.achat(HELLO, seed=2))
        await c.aclose()
        return rs

    with srv:
        rs = asyncio.run(main(client(srv.url)))
    assert [r.content for r in rs] == ["Paris is the capital of France."] * 2
