"""LocalClient: an in-process model behind the same interface, with schema-constrained decoding."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))

from serve_helpers import (  # noqa: E402
    HELLO_A,
    HELLO_Q,
    WEATHER_Q,
    WEATHER_RESULT,
    WEATHER_TOOL,
    tiny_tool_model,
)

from openk2.serve.constrained import SchemaGrammar  # noqa: E402
from openk2.llm.local import LocalClient  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def client():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread, immune to a busy machine
    yield LocalClient(tiny_tool_model())
    torch.set_num_threads(threads)


def test_tool_call_roundtrip_through_the_k2_format(client):
    r = client.chat(WEATHER_Q, tools=[WEATHER_TOOL])
    assert r.finish_reason == "tool_calls" and r.content is None and r.parse_errors == []
    assert r.tool_calls == [{"id": "functions.get_weather:0", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    follow = client.chat(WEATHER_Q + [r.message(), WEATHER_RESULT], tools=[WEATHER_TOOL])
    assert follow.content == "It is 21 C in Paris." and follow.finish_reason == "stop"
    # usage: the prompt, the reply tokens and the closing <|im_end|>
    assert follow.usage.completion_tokens == len(client.chat_model.text_prompt_ids("It is 21 C in Paris.")) + 1


def test_plain_chat_and_token_accounting(client):
    before = client.totals.completion_tokens
    r = client.chat(HELLO_Q)
    assert r.content == HELLO_A and r.tool_calls == []
    assert client.totals.completion_tokens - before == r.usage.completion_tokens > 0


def test_tool_choice_none_bans_the_section_and_named_choice_forces_the_tool(client):
    r = client.chat(WEATHER_Q, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=12)
    assert r.tool_calls == [] and "<|tool_calls_section_begin|>" not in (r.content or "")
    forced = client.chat(HELLO_Q, tools=[WEATHER_TOOL], max_tokens=24,
                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert forced.finish_reason == "tool_calls" and forced.parse_errors == []
    (call,) = forced.tool_calls
    assert call["id"] == "functions.get_weather:0" and call["function"]["name"] == "get_weather"
    import json

    assert "city" in json.loads(call["function"]["arguments"])  # constrained to the tool's schema
    with pytest.raises(ValueError, match="not among the declared tools"):
        client.chat(HELLO_Q, tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}})


def test_json_schema_is_enforced_while_decoding(client):
    # the tiny model knows nothing about people: only the constraint makes this JSON
    r = client.chat([{"role": "user", "content": "Describe Ada as JSON."}], json_schema=PERSON, max_tokens=64)
    assert isinstance(r.parsed, dict) and set(r.parsed) >= {"name", "age"} and isinstance(r.parsed["age"], int)
    assert client.totals.schema_retries == 0
    sampled = client.chat([{"role": "user", "content": "Describe Ada as JSON."}], json_schema=PERSON,
                          max_tokens=64, temperature=1.0, seed=7)
    assert SchemaGrammar(PERSON).matches(sampled.content)


def test_chat_many_batches_and_matches_one_by_one(client):
    reqs = [{"messages": HELLO_Q}, {"messages": WEATHER_Q, "tools": [WEATHER_TOOL]},
            {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}]
    batched = client.chat_many(reqs)
    single = [client.chat(**r) for r in reqs]
    assert [(b.content, b.tool_calls) for b in batched] == [(s.content, s.tool_calls) for s in single]
    assert batched[2].content == "It is 4."


def test_local_cache(tmp_path, client):
    c = LocalClient(client.chat_model, cache_dir=tmp_path)
    a = c.chat(HELLO_Q)
    b = c.chat(HELLO_Q)
    assert not a.cached and b.cached and b.content == a.content == HELLO_A
    assert c.totals.cached == 1 and c.totals.completion_tokens == a.usage.completion_tokens
    many = c.chat_many([{"messages": HELLO_Q}, {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}])
    assert many[0].cached and many[0].content == HELLO_A and not many[1].cached  # the batch reads the cache
    again = c.chat_many([{"messages": [{"role": "user", "content": "What is 2 + 2?"}]}])
    assert again[0].cached and again[0].content == many[1].content  # ... and writes it


def test_schema_grammar_accepts_and_rejects():
    g = SchemaGrammar(PERSON)
    assert g.matches('{"name":"Ada","age":36}')
    assert g.matches('{"name": "Ada", "age": -1, "tags": ["a","b"]}')
    assert not g.matches('{"age":36}')  # required name
    assert not g.matches('{"name":"Ada","age":3.5}')  # integer
    assert not g.matches('{"name":"Ada","age":36,"tags":["c"]}')  # enum
    assert not g.matches('{"name":"Ada Lovelace Byron","age":36}')  # maxLength
    anything = SchemaGrammar({})
    for ok in ['{"x":[1,2.5e-3,{"y":null}],"z":"q\\u00e9"}', "[]", '"s"', "true", "-0.5"]:
        assert anything.matches(ok), ok
    for bad in ["{x:1}", "[1,]", "01", '"\n"', "tru"]:
        assert not anything.matches(bad), bad
    refs = SchemaGrammar({"$defs": {"p": {"type": "object", "properties": {"v": {"type": "boolean"}}, "required": ["v"]}},
                          "type": "array", "items": {"$ref": "#/$defs/p"}, "minItems": 1})
    assert refs.matches('[{"v":true},{"v":false}]') and not refs.matches("[]")


@pytest.mark.slow
def test_smollm2_offline_with_a_schema():
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from openk2.serve.backends import smollm2_path

    try:
        smollm2_path()
    except Exception as e:
        pytest.skip(str(e))
    c = LocalClient("smollm2")
    r = c.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}], max_tokens=16)
    assert "Paris" in r.content
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"]}
    j = c.chat([{"role": "user", "content": "Give the capital of France as JSON with keys city and country."}],
               json_schema=schema, max_tokens=40)
    assert j.parsed["city"] == "Paris"
    # HF backend batching: left padding + position ids + cache compaction match one-by-one decoding
    reqs = [{"messages": [{"role": "user", "content": q}], "max_tokens": 12}
            for q in ("Name a colour.", "What is 2 + 2? Reply with the number only.", "Say hi.")]
    assert [r.content for r in c.chat_many(reqs)] == [c.chat(**r).content for r in reqs]


def test_local_client_takes_another_chat_template():
    from openk2.chat import render

    c = LocalClient(tiny_tool_model(), chat_template="k2-instruct")
    assert c.chat_model.template_name == "k2-instruct"
    ids = c.chat_model.chat_prompt_ids([{"role": "user", "content": "hi"}])
    text = c.chat_model.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == render([{"role": "user", "content": "hi"}], add_generation_prompt=True, template="k2-instruct")
