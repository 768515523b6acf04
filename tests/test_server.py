"""`openk2 serve` over real HTTP on loopback, driven by the official openai client."""

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import pytest

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
    WEATHER_RESULT,
    WEATHER_TOOL,
    LoopbackServer,
    chat_model,  # noqa: F401  (fixture)
    oai,  # noqa: F401  (fixture)
    tiny_tool_model,
)

from openk2.serve.backends import load_chat_model  # noqa: E402
from openk2.llm import OpenAICompatClient  # noqa: E402
from openk2.serve.server import ServerLimits, create_app  # noqa: E402

NAME = SERVED_NAME


@pytest.fixture(scope="module")
def server(chat_model):
    limits = ServerLimits(max_tokens=256, max_body_bytes=64 * 1024)
    app = create_app(chat_model, limits=limits, batch_window_s=0.05)
    with LoopbackServer(app) as srv:
        srv.app = app
        yield srv


def test_models(oai):
    (m,) = oai.models.list().data
    assert m.id == NAME and m.owned_by == "openk2"


def test_chat_completion(oai):
    r = oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0)
    assert r.choices[0].message.content == HELLO_A and r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == NAME
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (52, 16)  # default system turn + user turn; 15 text tokens + <|im_end|>


def test_tool_call_roundtrip(oai):
    r = oai.chat.completions.create(model=NAME, messages=WEATHER_Q, tools=[WEATHER_TOOL], temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id == "functions.get_weather:0" and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    follow = oai.chat.completions.create(
        model=NAME, temperature=0, tools=[WEATHER_TOOL],
        messages=WEATHER_Q + [choice.message.model_dump(exclude_none=True), WEATHER_RESULT],
    )
    assert follow.choices[0].message.content == "It is 21 C in Paris."


def test_tool_choice_forces_a_schema_valid_call(oai):
    r = oai.chat.completions.create(model=NAME, messages=HELLO_Q, tools=[WEATHER_TOOL], temperature=0, max_tokens=24,
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    none = oai.chat.completions.create(model=NAME, messages=WEATHER_Q, tools=[WEATHER_TOOL], tool_choice="none",
                                       temperature=0, max_tokens=8)
    assert not none.choices[0].message.tool_calls


def test_streaming_chat_text_and_usage(oai):
    chunks = list(oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == HELLO_A
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].choices == []


def test_streaming_tool_calls(oai):
    chunks = list(oai.chat.completions.create(model=NAME, messages=WEATHER_Q, tools=[WEATHER_TOOL], temperature=0,
                                              stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.id, tc.function.name, tc.function.arguments) for tc in calls] == [
        (0, "functions.get_weather:0", "get_weather", '{"city": "Paris"}')]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_stop_strings_and_length(oai):
    r = oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, stop=["help"])
    assert r.choices[0].message.content == "Hello! How can I " and r.choices[0].finish_reason == "stop"
    s = oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, stop=["help"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s) == "Hello! How can I "
    short = oai.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_completions_endpoint(oai):
    r = oai.completions.create(model=NAME, prompt="<|im_user|>user<|im_middle|>What is 2 + 2?<|im_end|>"
                               "<|im_assistant|>assistant<|im_middle|>", max_tokens=8, temperature=0)
    assert r.choices[0].text == "It is 4." and r.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(model=NAME, prompt="<|im_user|>user<|im_middle|>What is 2 + 2?<|im_end|>"
                                      "<|im_assistant|>assistant<|im_middle|>", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "It is 4."


def test_json_schema_response_format(oai):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "why": {"type": "string", "maxLength": 10}},
              "required": ["answer", "why"]}
    r = oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "What is 2 + 2?"}], temperature=0,
                                    max_tokens=48, response_format={"type": "json_schema",
                                                                    "json_schema": {"name": "a", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value["answer"], int) and isinstance(value["why"], str)


@pytest.mark.parametrize("kwargs, status, fragment", [
    ({"max_tokens": 100000}, 400, "max_tokens must be between 1 and 256"),
    ({"temperature": 3}, 400, "temperature must be in [0.0, 2.0]"),
    ({"messages": []}, 400, "messages must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role must be system, user, assistant or tool"),
    ({"model": "gpt-9"}, 404, "model 'gpt-9' does not exist"),
    ({"n": 17}, 400, "n must be between 1 and 16"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, 400,
     "not a valid JSON schema"),
    ({"tool_choice": {"type": "function", "function": {"name": "missing"}}, "tools": [WEATHER_TOOL]}, 400,
     "not among the declared tools"),
    ({"messages": [{"role": "user", "content": "x " * 400}], "max_tokens": 256}, 400, "exceeds the model's context of 1024"),
    ({"messages": [{"role": "user", "content": "x " * 1000}]}, 400, "tokens, over the limit of 1023"),
])
def test_validation_errors_are_clear_4xx(oai, kwargs, status, fragment):
    args = {"model": NAME, "messages": HELLO_Q, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        oai.chat.completions.create(**args)
    assert e.value.status_code == status and fragment in e.value.message


def test_body_size_limit_and_bad_json(server):
    big = {"model": NAME, "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_concurrent_requests_share_a_batch(server):
    engine = server.app.state.openk2["engine"]
    before = engine.stats["max_batch"]

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
            qs = [HELLO_Q, WEATHER_Q, [{"role": "user", "content": "What is 2 + 2?"}]] * 3
            rs = await asyncio.gather(*(c.chat.completions.create(model=NAME, messages=q, temperature=0,
                                                                  tools=[WEATHER_TOOL] if q is WEATHER_Q else None)
                                        for q in qs))
            return qs, rs

    qs, rs = asyncio.run(main())
    for q, r in zip(qs, rs):
        m = r.choices[0].message
        if q is WEATHER_Q:
            assert m.tool_calls[0].function.arguments == '{"city": "Paris"}'
        else:
            assert m.content in (HELLO_A, "It is 4.")
    assert max(before, engine.stats["max_batch"]) > 1


def test_our_client_against_our_server(server, tmp_path):
    with OpenAICompatClient(server.url, model=NAME, cache_dir=tmp_path) as c:
        r = c.chat(WEATHER_Q, tools=[WEATHER_TOOL])
        assert r.tool_calls[0]["function"]["name"] == "get_weather"
        j = c.chat([{"role": "user", "content": "What is 2 + 2?"}], max_tokens=40,
                   json_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
        assert isinstance(j.parsed["n"], int)
        again = c.chat(WEATHER_Q, tools=[WEATHER_TOOL])
        assert again.cached and c.totals.cached == 1


# --------------------------------------------------------------------------- private servers


class _Slow:
    """A backend wrapper that sleeps per decode step, to make timing deterministic."""

    def __init__(self, backend, delay):
        self.backend, self.delay = backend, delay
        self.max_context, self.vocab_size = backend.max_context, backend.vocab_size
        self.prefill_chunk = getattr(backend, "prefill_chunk", 256)

    def new_cache(self, rows, capacity):
        return self.backend.new_cache(rows, capacity)

    def forward(self, ids, view):
        if ids.shape[1] == 1:  # a decode step
            time.sleep(self.delay)
        return self.backend.forward(ids, view)


def _slow_model(chat_model, delay=0.05):
    import dataclasses

    return dataclasses.replace(chat_model, backend=_Slow(chat_model.backend, delay))


def test_full_queue_answers_503_with_retry_after(chat_model):
    app = create_app(_slow_model(chat_model, 0.1), limits=ServerLimits(max_queue=1), batch_window_s=0.0,
                     max_batch_size=1)  # the second request must wait in the queue, not join the batch
    with LoopbackServer(app) as srv:
        body = {"model": NAME, "messages": HELLO_Q, "temperature": 0}
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            first = threading.Thread(target=lambda: c.post("/v1/chat/completions", json=body))
            first.start()  # occupies the engine for ~1.5 s
            time.sleep(0.3)
            second = threading.Thread(target=lambda: c.post("/v1/chat/completions", json=body))
            second.start()  # waits in the queue
            time.sleep(0.3)
            r = c.post("/v1/chat/completions", json=body)
            first.join(), second.join()
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"


def test_api_key(chat_model):
    app = create_app(chat_model, api_key="s3cret")
    with LoopbackServer(app) as srv:
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0) as good:
            assert good.models.list().data[0].id == NAME


def test_client_disconnect_cancels_generation(chat_model):
    app = create_app(_slow_model(chat_model, 0.05), batch_window_s=0.0)
    with LoopbackServer(app) as srv:
        body = {"model": NAME, "messages": [{"role": "user", "content": "Ramble."}], "max_tokens": 200,
                "temperature": 1.0, "seed": 1, "stream": True}
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                next(r.iter_lines())
        engine = app.state.openk2["engine"]
        t0 = time.time()
        while (engine.stats["requests"] < 1 or engine.running) and time.time() - t0 < 8:
            time.sleep(0.05)
        # decoding stopped long before 200 tokens x 0.05 s = 10 s
        assert engine.stats["requests"] == 1 and engine.running == 0 and engine.stats["generated_tokens"] < 100


def test_graceful_shutdown_finishes_in_flight_requests(chat_model):
    app = create_app(_slow_model(chat_model, 0.05), batch_window_s=0.0)
    srv = LoopbackServer(app).__enter__()
    result = {}

    def call():
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) as c:
            result["r"] = c.chat.completions.create(model=NAME, messages=HELLO_Q, temperature=0)

    t = threading.Thread(target=call)
    t.start()
    engine = app.state.openk2["engine"]
    t0 = time.time()
    while not engine.running and time.time() - t0 < 10:  # wait until it is decoding (16 steps x 0.05 s)
        time.sleep(0.01)
    srv.__exit__(None, None, None)  # like SIGTERM: stop accepting, drain, run the lifespan shutdown
    t.join(10)
    assert result["r"].choices[0].message.content == HELLO_A
    assert app.state.openk2["closing"] and not app.state.openk2["engine"]._thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")


def test_truncated_tool_call_comes_back_as_raw_content_with_parse_errors(oai):
    r = oai.chat.completions.create(model=NAME, messages=WEATHER_Q, tools=[WEATHER_TOOL], temperature=0, max_tokens=5)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith("<|tool_calls_section_begin|><|tool_call_begin|>function")
    errors = choice.message.model_dump()["openk2_parse_errors"]
    assert errors[0].startswith("truncated_section") and errors[1].startswith("truncated_call")


def test_make_client_picks_the_backend(server, chat_model):
    from openk2.llm import LocalClient, OpenAICompatClient, make_client

    http = make_client(server.url)
    assert isinstance(http, OpenAICompatClient) and http.model == NAME
    assert http.chat(HELLO_Q, temperature=0).content == HELLO_A
    local = make_client(str(tiny_tool_model()))
    assert isinstance(local, LocalClient) and local.chat(HELLO_Q).content == HELLO_A


# --------------------------------------------------------------------------- chat templates


def _copy_checkpoint(tmp_path, template_text=None):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_tool_model(), d)
    if template_text is not None:
        (d / "chat_template.jinja").write_text(template_text)
    return d


def test_serve_uses_the_checkpoints_own_template(tmp_path):
    from openk2.chat import encode_conversation, render, template_text

    cm = load_chat_model(tiny_tool_model())
    assert (cm.template_name, cm.chat_jinja, cm.template_source) == ("k2-instruct-0905", None, "from the checkpoint")
    msgs = [{"role": "user", "name": "ann", "content": "Hi"}]
    # a checkpoint shipping k2-instruct renders with k2-instruct (the Python renderer: the text is the named template)
    july = load_chat_model(_copy_checkpoint(tmp_path, template_text("k2-instruct")))
    assert july.template_name == "k2-instruct" and july.chat_jinja is None
    assert july.chat_prompt_ids(msgs) == encode_conversation(july.tokenizer, msgs, add_generation_prompt=True,
                                                             template="k2-instruct")[0]
    assert july.chat_prompt_ids(msgs) != cm.chat_prompt_ids(msgs)  # 0905 names the turn "ann"


def test_serve_renders_any_other_template_with_jinja(tmp_path):
    from openk2.chat import encode_conversation, template_text

    edited = "{#- a local copy -#}\n" + template_text("k2-instruct-0905")
    cm = load_chat_model(_copy_checkpoint(tmp_path, edited))
    assert cm.template_name == "custom" and cm.chat_jinja == edited
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"id": "call_9", "function": {"name": "get_weather", "arguments": {}}}]},
            {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}]
    # same text as the named template renders, so the same ids (foreign ids rewritten before Jinja too)
    assert cm.chat_prompt_ids(msgs) == encode_conversation(cm.tokenizer, msgs, add_generation_prompt=True)[0]
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    cm = load_chat_model(_copy_checkpoint(tmp_path / "b", plain))
    assert cm.tokenizer.decode(cm.chat_prompt_ids([{"role": "user", "content": "xyz"}])) == "xyz"


def test_chat_template_flag_overrides_the_checkpoint(tmp_path):
    from openk2.errors import OpenK2Error
    from openk2.chat import template_text

    cm = load_chat_model(tiny_tool_model(), chat_template="k2-instruct")
    assert (cm.template_name, cm.template_source) == ("k2-instruct", "from --chat-template")
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    cm = load_chat_model(tiny_tool_model(), chat_template=str(tmp_path / "t.jinja"))
    assert cm.chat_jinja == "{{ messages[0]['content'] }}" and cm.template_banner().startswith("k2 format, chat template ")
    (tmp_path / "same.jinja").write_text(template_text("k2-instruct"))
    assert load_chat_model(tiny_tool_model(), chat_template=str(tmp_path / "same.jinja")).chat_jinja is None
    with pytest.raises(OpenK2Error, match="--chat-template"):
        load_chat_model(tiny_tool_model(), chat_template="chatml")
