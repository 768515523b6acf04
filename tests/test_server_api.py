"""The HTTP server's contract at its edges: malformed and hostile requests, n, logprobs, cancellation, limits.

Driven over real HTTP on loopback (uvicorn), with the official openai client and raw httpx.
"""

import dataclasses
import json
import math
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))

from serve_helpers import (  # noqa: E402
    HELLO_A,
    HELLO_Q,
    SERVED_NAME,
    WEATHER_Q,
    WEATHER_TOOL,
    LoopbackServer,
    chat_model,  # noqa: F401  (fixture)
    oai,  # noqa: F401  (fixture)
    tiny_tool_model,
)

from openk2.serve.backends import load_chat_model  # noqa: E402
from openk2.serve.engine import SamplingParams  # noqa: E402
from openk2.serve.server import ServerLimits, create_app  # noqa: E402

NAME = SERVED_NAME
CONTEXT = 1024  # the tiny model's max_position_embeddings
TWO_PLUS_TWO = "<|im_user|>user<|im_middle|>What is 2 + 2?<|im_end|><|im_assistant|>assistant<|im_middle|>"


@pytest.fixture(scope="module")
def server(chat_model):
    app = create_app(chat_model, limits=ServerLimits(max_tokens=256), batch_window_s=0.02)  # bodies up to 1 MiB
    with LoopbackServer(app) as srv:
        srv.app = app
        yield srv


class _Slow:
    """The backend, with a sleep in every decode step (so requests are still decoding when the next one arrives).
    Everything else is the backend's own; both engine interfaces are covered (prefill/decode, forward)."""

    def __init__(self, backend, delay):
        self._backend, self._delay = backend, delay

    def __getattr__(self, name):  # prefill, merge, select, new_cache, max_context... exactly as the backend has them
        return getattr(self._backend, name)

    def decode(self, *args, **kwargs):
        time.sleep(self._delay)
        return self._backend.decode(*args, **kwargs)

    def forward(self, ids, *args, **kwargs):  # one call per prefill chunk or decode step
        if ids.shape[-1] == 1:
            time.sleep(self._delay)
        return self._backend.forward(ids, *args, **kwargs)


def _slow_model(chat_model, delay=0.05):
    return dataclasses.replace(chat_model, backend=_Slow(chat_model.backend, delay))


def _wait_until(pred, timeout=20.0):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            return False
        time.sleep(0.01)
    return True


def _local_port(r: httpx.Response) -> int:
    """The client-side port of the connection that carried ``r`` (same port: the connection was kept alive)."""
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


def _is_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "File \"" not in r.text
    return err


def _chat_body(**kw):
    return {"model": NAME, "messages": HELLO_Q, "temperature": 0, **kw}


# --------------------------------------------------------------------------- malformed requests


MALFORMED = {
    "nan temperature": (b'{"model": "k2-test", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                        "temperature"),
    "infinite top_p": (b'{"model": "k2-test", "messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
                       "top_p"),
    "overflowing float": (b'{"model": "k2-test", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
                          "temperature"),
    "stream_options not an object": (json.dumps(_chat_body(stream=True, stream_options="yes")).encode(), "stream_options"),
    "json_schema not an object": (json.dumps(_chat_body(response_format={"type": "json_schema", "json_schema": "x"})).encode(),
                                  "response_format"),
    "lone surrogate": (b'{"model": "k2-test", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
                       "messages[0].content"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, None),
    "stream not a bool": (json.dumps(_chat_body(stream="yes")).encode(), "stream"),
    "unresolvable $ref": (json.dumps(_chat_body(response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}, "required": ["x"]}}})).encode(),
        "response_format"),
    "remote $ref in a tool": (json.dumps(_chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "https://example.com/x.json"}}}}}])).encode(),
        "tools[0].function.parameters"),
    "n too large": (json.dumps(_chat_body(n=17)).encode(), "n"),
    "top_logprobs without logprobs": (json.dumps(_chat_body(top_logprobs=2)).encode(), "top_logprobs"),
    "top_logprobs over 20": (json.dumps(_chat_body(logprobs=True, top_logprobs=21)).encode(), "top_logprobs"),
    "logprobs not a bool": (json.dumps(_chat_body(logprobs=3)).encode(), "logprobs"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_an_openai_400_and_the_connection_survives(server, case):
    body, param = MALFORMED[case]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        bad = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        err = _is_openai_error(bad, 400)
        assert err["param"] == param and err["type"] == "invalid_request_error"
        if param is not None:
            assert param.split("[")[0].split(".")[0] in err["message"]
        assert bad.headers.get("connection") != "close"
        bad_port = _local_port(bad)
        good = c.post("/v1/chat/completions", json=_chat_body(max_tokens=4))
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
        assert _local_port(good) == bad_port  # the same kept-alive connection


def test_completions_validation(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for body, param in [({"prompt": "hi", "logprobs": 6}, "logprobs"), ({"prompt": "hi", "logprobs": True}, "logprobs"),
                            ({"prompt": "a\ud800"}, "prompt"), ({"prompt": "hi", "n": 0}, "n"),
                            ({"prompt": "hi", "echo": True}, "echo"), ({"prompt": "hi", "best_of": 3}, "best_of"),
                            ({"prompt": "hi", "stream_options": {"include_usage": "yes"}, "stream": True},
                             "stream_options.include_usage")]:
            r = c.post("/v1/completions", content=json.dumps({"model": NAME, **body}), headers={"content-type": "application/json"})
            assert _is_openai_error(r, 400)["param"] == param, body


def test_chunked_body_over_the_limit_is_413_json(server):
    def chunks():  # a generator body: chunked transfer encoding, no Content-Length
        yield b'{"model": "k2-test", "messages": [{"role": "user", "content": "'
        for _ in range(1100):  # 1.1 MB, over the default limit of 1 MiB
            yield b"x" * 1024
        yield b'"}]}'

    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert _is_openai_error(r, 413)["code"] == "body_too_large"
        good = c.post("/v1/chat/completions", json=_chat_body(max_tokens=2))
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_unknown_route_and_method_are_openai_shaped(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert _is_openai_error(c.get("/v1/nothing"), 404)["code"] == "not_found"
        assert _is_openai_error(c.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


def test_unexpected_exception_is_an_openai_500_without_internals(chat_model):
    cm = dataclasses.replace(chat_model)

    def broken_parse(*a, **k):
        raise RuntimeError("secret-internal-detail")

    cm.parse = broken_parse
    with LoopbackServer(create_app(cm, batch_window_s=0.0)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=_chat_body(max_tokens=3))
        err = _is_openai_error(r, 500)
        assert err["type"] == "server_error" and "secret-internal-detail" not in r.text
        port = _local_port(r)
        ok = c.post("/v1/completions", json={"model": NAME, "prompt": TWO_PLUS_TWO, "max_tokens": 8, "temperature": 0})
        assert ok.json()["choices"][0]["text"] == "It is 4." and _local_port(ok) == port


def test_a_recursive_schema_with_a_root_ref_is_accepted(oai):
    tree = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4},
                                             "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1}},
            "required": ["name"]}
    r = oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, max_tokens=64, response_format={
        "type": "json_schema", "json_schema": {"name": "tree", "schema": tree}})
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value["name"], str) and len(value["name"]) <= 4


# --------------------------------------------------------------------------- one request's failure stays its own


def test_a_bad_request_does_not_fail_the_requests_decoding_beside_it(chat_model):
    app = create_app(_slow_model(chat_model, 0.05), batch_window_s=0.0)
    results = []
    with LoopbackServer(app) as srv:
        engine = app.state.openk2["engine"]

        def good():
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                results.append(c.post("/v1/chat/completions", json=_chat_body()))

        threads = [threading.Thread(target=good) for _ in range(3)]
        for t in threads:
            t.start()
        assert _wait_until(lambda: engine.running == 3)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            nan = c.post("/v1/chat/completions", headers={"content-type": "application/json"},
                         content=b'{"model": "k2-test", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
            ref = c.post("/v1/chat/completions", json=_chat_body(response_format={"type": "json_schema", "json_schema": {
                "name": "a", "schema": {"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}, "required": ["x"]}}}))
            forced = c.post("/v1/chat/completions", json=_chat_body(
                tools=[{"type": "function", "function": {"name": "f", "parameters": {
                    "type": "object", "properties": {"x": {"$ref": "#/definitions/gone"}}, "required": ["x"]}}}],
                tool_choice={"type": "function", "function": {"name": "f"}}))
        for t in threads:
            t.join()
    assert _is_openai_error(nan, 400)["param"] == "temperature"
    assert _is_openai_error(ref, 400)["param"] == "response_format" and "#/$defs/nope" in ref.json()["error"]["message"]
    assert _is_openai_error(forced, 400)["param"] == "tools[0].function.parameters" and "#/definitions/gone" in forced.json()["error"]["message"]
    assert [r.status_code for r in results] == [200] * 3
    assert [r.json()["choices"][0]["message"]["content"] for r in results] == [HELLO_A] * 3


class _Poisoned(_Slow):
    """The slow backend, failing the prefill of any prompt that contains the word 'poison'."""

    def __init__(self, chat_model, delay):
        super().__init__(chat_model.backend, delay)
        self._decode_text = chat_model.decode

    def _check(self, prompts):
        if any("poison" in self._decode_text(list(p)) for p in prompts):
            raise RuntimeError("CUDA-ish failure in prefill")

    def prefill(self, prompts, *args, **kwargs):
        self._check(prompts)
        return self._backend.prefill(prompts, *args, **kwargs)

    def forward(self, ids, *args, **kwargs):
        if ids.shape[-1] > 1:
            self._check(ids.tolist())
        return super().forward(ids, *args, **kwargs)


def test_an_engine_error_is_that_requests_500_only(chat_model):
    cm = dataclasses.replace(chat_model, backend=_Poisoned(chat_model, 0.05))
    app = create_app(cm, batch_window_s=0.0)
    with LoopbackServer(app) as srv:
        engine = app.state.openk2["engine"]
        out = {}

        def good():
            with openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) as c:
                s = c.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, stream=True)
                out["text"] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

        t = threading.Thread(target=good)
        t.start()
        assert _wait_until(lambda: engine.running == 1)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            bad = c.post("/v1/chat/completions", json=_chat_body(messages=[{"role": "user", "content": "poison"}]))
            port = _local_port(bad)
            again = c.post("/v1/completions", json={"model": NAME, "prompt": TWO_PLUS_TWO, "max_tokens": 8, "temperature": 0})
            same_connection = _local_port(again) == port
        t.join()
    err = _is_openai_error(bad, 500)
    assert err["type"] == "server_error" and err["code"] == "generation_failed"
    assert again.json()["choices"][0]["text"] == "It is 4." and same_connection
    assert out["text"] == HELLO_A


# --------------------------------------------------------------------------- cancellation


def test_non_streaming_client_timeout_cancels_decoding(chat_model):
    app = create_app(_slow_model(chat_model, 0.05), batch_window_s=0.0)
    with LoopbackServer(app) as srv:
        engine = app.state.openk2["engine"]
        body = _chat_body(messages=[{"role": "user", "content": "Ramble."}], max_tokens=200, temperature=1.0, seed=1,
                          ignore_eos=True)
        with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(60, read=0.5)) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/chat/completions", json=body)
        # 200 tokens at 0.05 s a step is 10 s of decoding; the server must stop long before
        _wait_until(lambda: engine.stats["requests"] == 1 and engine.running == 0, timeout=8)
        assert engine.stats["requests"] == 1 and engine.running == 0
        assert engine.stats["generated_tokens"] < 100


# --------------------------------------------------------------------------- max_tokens


def test_omitted_max_tokens_is_clamped_to_the_context(oai):
    long = [{"role": "user", "content": "x " * 400}]
    r = oai.chat.completions.create(model=NAME, messages=long, temperature=0, extra_body={"ignore_eos": True})
    prompt = r.usage.prompt_tokens
    assert prompt > CONTEXT - 256  # so the default (256) would not fit
    assert r.usage.completion_tokens == CONTEXT - prompt and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context"):
        oai.chat.completions.create(model=NAME, messages=long, temperature=0, max_tokens=CONTEXT - prompt + 1)


# --------------------------------------------------------------------------- n


def test_n_choices_share_a_prompt_and_follow_their_seeds(oai):
    one = oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0)
    r = oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [one.choices[0].message.content] * 2
    u = one.usage
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        u.prompt_tokens, 2 * u.completion_tokens, u.prompt_tokens + 2 * u.completion_tokens)

    q = [{"role": "user", "content": "Ramble."}]
    many = oai.chat.completions.create(model=NAME, messages=q, temperature=1.0, seed=7, n=3, max_tokens=8)
    singles = [oai.chat.completions.create(model=NAME, messages=q, temperature=1.0, seed=7 + i, max_tokens=8)
               for i in range(3)]
    assert [c.message.content for c in many.choices] == [s.choices[0].message.content for s in singles]
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert len({c.message.content for c in many.choices}) > 1  # three seeds, not one sample three times


def test_n_streaming_sends_each_choice_with_its_index(oai):
    chunks = list(oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, n=3, stream=True,
                                              stream_options={"include_usage": True}))
    text = {0: "", 1: "", 2: ""}
    finish = {}
    for ch in chunks:
        for c in ch.choices:
            text[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert text == {0: HELLO_A, 1: HELLO_A, 2: HELLO_A} and finish == {0: "stop", 1: "stop", 2: "stop"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 48


def test_n_streaming_tool_calls(oai):
    chunks = list(oai.chat.completions.create(model=NAME, messages=WEATHER_Q, tools=[WEATHER_TOOL], temperature=0,
                                              n=2, stream=True))
    calls = {0: [], 1: []}
    for ch in chunks:
        for c in ch.choices:
            calls[c.index] += [(tc.function.name, tc.function.arguments) for tc in c.delta.tool_calls or []]
            assert not c.delta.content
    assert calls == {0: [("get_weather", '{"city": "Paris"}')], 1: [("get_weather", '{"city": "Paris"}')]}
    assert sorted(c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason) == ["tool_calls"] * 2


def test_n_completions(oai):
    r = oai.completions.create(model=NAME, prompt=TWO_PLUS_TWO, max_tokens=8, temperature=0, n=2)
    assert [(c.index, c.text) for c in r.choices] == [(0, "It is 4."), (1, "It is 4.")]
    s = list(oai.completions.create(model=NAME, prompt=TWO_PLUS_TWO, max_tokens=8, temperature=0, n=2, stream=True))
    assert ["".join(c.choices[0].text for c in s if c.choices and c.choices[0].index == i) for i in (0, 1)] == ["It is 4."] * 2


# --------------------------------------------------------------------------- logprobs (the real engine)


def _first_token_logprobs(chat_model, messages):
    ids, _, _ = chat_model.prepare_chat(messages, None, None, SamplingParams())
    with torch.inference_mode():  # the model itself, no cache, no batching
        logits = chat_model.backend.model(torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_chat_logprobs_match_the_model(oai, chat_model):
    r = oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens - 1  # every output token; not the stop token
    assert "".join(t.token for t in content) == choice.message.content == HELLO_A
    for t in content:
        assert t.bytes == list(t.token.encode()) and t.logprob <= 0
        assert len(t.top_logprobs) == 3
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)  # greedy: the top token
    expected = _first_token_logprobs(chat_model, HELLO_Q)
    top3 = torch.topk(expected, 3)
    assert [x.logprob for x in content[0].top_logprobs] == pytest.approx(top3.values.tolist(), abs=1e-4)
    assert [x.token for x in content[0].top_logprobs] == [chat_model.decode([i]) for i in top3.indices.tolist()]

    plain = oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0)
    assert plain.choices[0].logprobs is None
    no_top = oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, logprobs=True)
    assert [t.logprob for t in no_top.choices[0].logprobs.content] == [t.logprob for t in content]
    assert all(t.top_logprobs == [] for t in no_top.choices[0].logprobs.content)

    streamed = list(oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, logprobs=True,
                                                top_logprobs=3, stream=True))
    got = [t for ch in streamed if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in got] == [
        (t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in content]


def test_completion_logprobs_legacy_format(oai):
    r = oai.completions.create(model=NAME, prompt=TWO_PLUS_TWO, max_tokens=8, temperature=0, logprobs=2)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text == "It is 4." and "".join(lp.tokens) == c.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == r.usage.completion_tokens - 1
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and top[tok] == logprob == max(top.values()) and logprob <= 0
    s = list(oai.completions.create(model=NAME, prompt=TWO_PLUS_TWO, max_tokens=8, temperature=0, logprobs=2, stream=True))
    streamed = [t for ch in s if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


# --------------------------------------------------------------------------- logprobs formatting (a scripted engine)


class _ScriptedEngine:
    """Answers every request with the same tokens and log-probabilities: the server's formatting, exactly."""

    def __init__(self, chat_model, ids, logprobs, tops, stop_token, stop_logprob):
        self.cm, self.ids, self.lps, self.tops = chat_model, ids, logprobs, tops
        self.stop_token, self.stop_logprob = stop_token, stop_logprob
        self.pending = self.running = 0
        self.stats = {"requests": 0, "generated_tokens": 0}
        self.seen = []

    def submit(self, req):
        self.seen.append(req)
        threading.Thread(target=self._run, args=(req,), daemon=True).start()
        return req

    def _run(self, req):
        k = req.params.top_logprobs
        for tok, lp, top in zip(self.ids, self.lps, self.tops):
            req.output_ids.append(tok)
            if req.params.logprobs:
                req.logprobs.append(lp)
                req.top_logprobs.append(top[:k])
            req.text = self.cm.decode(req.output_ids)
            req.on_token(req, tok)
        req.stop_token = self.stop_token
        if req.params.logprobs:
            req.logprobs.append(self.stop_logprob)
            req.top_logprobs.append([(self.stop_token, self.stop_logprob)][:k])
        req.finish_reason = "stop"
        req.on_token(req, None)
        req.done.set()

    def close(self):
        pass


@pytest.fixture(scope="module")
def scripted(chat_model):
    tok = chat_model.tokenizer
    hello, bang = tok.encode("Hello")[0], tok.encode("!")[0]
    e1, e2 = tok.encode("é")  # two byte tokens, each half of a UTF-8 character
    ids = [hello, e1, e2, bang]
    lps = [-0.25, -0.5, -0.125, -1.0]
    tops = [[(hello, -0.25), (bang, -2.0)], [(e1, -0.5), (hello, -3.0)], [(e2, -0.125), (bang, -4.0)],
            [(bang, -1.0), (hello, -1.5)]]
    engine = _ScriptedEngine(chat_model, ids, lps, tops, chat_model.stop_ids[0], -0.0625)
    with LoopbackServer(create_app(chat_model, engine=engine)) as srv:
        srv.engine, srv.names = engine, {"hello": hello, "bang": bang, "e1": e1, "e2": e2}
        yield srv


def test_chat_logprobs_format(scripted):
    with httpx.Client(base_url=scripted.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=_chat_body(logprobs=True, top_logprobs=2)).json()
    assert scripted.engine.seen[-1].params.logprobs is True and scripted.engine.seen[-1].params.top_logprobs == 2
    choice = r["choices"][0]
    assert choice["message"]["content"] == "Helloé!"
    hello = {"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello")}
    bang = {"token": "!", "logprob": -1.0, "bytes": [33]}
    assert choice["logprobs"] == {"content": [
        {**hello, "top_logprobs": [hello, {**bang, "logprob": -2.0}]},
        {"token": "\ufffd", "logprob": -0.5, "bytes": [0xC3],
         "top_logprobs": [{"token": "\ufffd", "logprob": -0.5, "bytes": [0xC3]}, {**hello, "logprob": -3.0}]},
        {"token": "\ufffd", "logprob": -0.125, "bytes": [0xA9],
         "top_logprobs": [{"token": "\ufffd", "logprob": -0.125, "bytes": [0xA9]}, {**bang, "logprob": -4.0}]},
        {**bang, "top_logprobs": [bang, {**hello, "logprob": -1.5}]},
    ], "refusal": None}
    assert b"".join(bytes(t["bytes"]) for t in choice["logprobs"]["content"]).decode() == "Helloé!"


def test_completion_logprobs_format(scripted):
    with httpx.Client(base_url=scripted.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": NAME, "prompt": "x", "logprobs": 1}).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == "Helloé!"
    assert lp == {"tokens": ["Hello", "\ufffd", "\ufffd", "!"], "token_logprobs": [-0.25, -0.5, -0.125, -1.0],
                  "top_logprobs": [{"Hello": -0.25}, {"\ufffd": -0.5}, {"\ufffd": -0.125}, {"!": -1.0}],
                  "text_offset": [0, 5, 5, 6]}  # offsets into the text: the two halves of "é" both start at 5
    assert r["usage"]["completion_tokens"] == 5


def test_streamed_logprobs_format(scripted):
    with httpx.Client(base_url=scripted.url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=_chat_body(logprobs=True, top_logprobs=1, stream=True)) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    toks = [(t["token"], t["logprob"], len(t["top_logprobs"])) for e in events for ch in e["choices"]
            if ch.get("logprobs") for t in ch["logprobs"]["content"]]
    assert toks == [("Hello", -0.25, 1), ("\ufffd", -0.5, 1), ("\ufffd", -0.125, 1), ("!", -1.0, 1)]
    assert "".join(ch["delta"].get("content") or "" for e in events for ch in e["choices"]) == "Helloé!"


# --------------------------------------------------------------------------- the event loop stays free


def test_rendering_tokenising_and_compiling_run_off_the_event_loop(chat_model):
    seen = {}
    cm = dataclasses.replace(chat_model)

    def recording(name, fn):
        def wrapped(*a, **k):
            seen.setdefault(name, set()).add(threading.current_thread().name)
            return fn(*a, **k)
        return wrapped

    cm.prepare_chat = recording("prepare_chat", chat_model.prepare_chat)
    cm.text_prompt_ids = recording("text_prompt_ids", chat_model.text_prompt_ids)
    import openk2.serve.constrained as constrained

    srv = LoopbackServer(create_app(cm, batch_window_s=0.0))
    with srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        loop_thread = srv.thread.name
        assert c.post("/v1/chat/completions", json=_chat_body(max_tokens=2)).status_code == 200
        assert c.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2}).status_code == 200
        compile_name = "grammar_for" if hasattr(constrained, "grammar_for") else "SchemaGrammar"
        original = getattr(constrained, compile_name)
        setattr(constrained, compile_name, recording("compile", original))
        try:
            r = c.post("/v1/chat/completions", json=_chat_body(max_tokens=8, response_format={"type": "json_object"}))
        finally:
            setattr(constrained, compile_name, original)
        assert r.status_code == 200
    assert set(seen) == {"prepare_chat", "text_prompt_ids", "compile"}
    assert all(loop_thread not in threads for threads in seen.values()), (loop_thread, seen)


def test_health_and_models_still_answer(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and math.isfinite(r.json()["pending"])
