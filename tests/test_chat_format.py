"""K2 chat format: golden render strings (openk2's default template, k2-instruct-0905), SFT loss masks,
tool-call parsing incl. malformed output. tests/test_chat_template.py checks the renderer against the Jinja templates."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))

from serve_helpers import tiny_tokenizer  # noqa: E402

from openk2.data import special_tokens as st  # noqa: E402
from openk2.chat import (  # noqa: E402
    GENERATION_PROMPT,
    encode_conversation,
    parse_tool_calls,
    render,
    render_segments,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TOOLS = [WEATHER]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful agent."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "It is 21 C in Paris."},
]

GOLDEN = (
    '<|im_system|>tool_declare<|im_middle|>\n  # Tools\n  [{"type": "function", "function": {"name": "get_weather", '
    '"description": "Current weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, '
    '"unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}]<|im_end|>'
    "<|im_system|>system<|im_middle|>You are a helpful agent.<|im_end|>"
    "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>Let me check."
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
    '<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n    {"temp_c": 21}<|im_end|>'
    "<|im_assistant|>assistant<|im_middle|>It is 21 C in Paris.<|im_end|>"
)
KIMI = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"


def test_render_golden_tool_conversation():
    assert render(CONVERSATION, TOOLS) == GOLDEN


def test_render_plain_chat_with_generation_prompt():
    msgs = [{"role": "user", "content": "Hi"}]
    assert render(msgs, add_generation_prompt=True) == (
        KIMI + "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )
    assert GENERATION_PROMPT == "<|im_assistant|>assistant<|im_middle|>"


def test_render_ids_count_over_the_conversation_and_dict_arguments():
    msgs = [
        {"role": "user", "content": "two cities"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "a", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
                {"id": "b", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "b", "name": "get_weather", "content": "12"},
        {"role": "tool", "tool_call_id": "a", "content": "3"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "functions.get_weather:7", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
    ]
    assert render(msgs) == (
        KIMI + "<|im_user|>user<|im_middle|>two cities<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
        '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:1\n    12<|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n    3<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.get_weather:7<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_calls_section_end|><|im_end|>"
    )


def test_prompt_is_a_prefix_of_the_full_conversation():
    prompt = render(CONVERSATION[:-1], TOOLS, add_generation_prompt=True)
    assert GOLDEN.startswith(prompt)
    assert GOLDEN[len(prompt) :] == "It is 21 C in Paris.<|im_end|>"


def test_content_parts_and_bad_roles():
    assert render([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == (
        KIMI + "<|im_user|>user<|im_middle|>ab<|im_end|>"
    )
    with pytest.raises(ValueError, match="unknown role"):
        render([{"role": "robot", "content": "x"}])


def test_loss_mask_covers_exactly_assistant_content_and_im_end():
    tok = tiny_tokenizer()
    ids, mask = encode_conversation(tok, CONVERSATION, TOOLS)
    assert len(ids) == len(mask)
    # Segment-wise encoding equals whole-string encoding (segments split at special tokens).
    assert ids == tok.encode(GOLDEN, add_special_tokens=False)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == (
        "Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "It is 21 C in Paris.<|im_end|>"
    )
    im_end = tok.token_to_id(st.IM_END)
    # Two assistant turns, each closed by a trained <|im_end|>; the other five <|im_end|> are masked.
    assert sum(1 for i, m in zip(ids, mask) if i == im_end and m) == 2
    assert sum(1 for i, m in zip(ids, mask) if i == im_end and not m) == 4
    _, last_only = encode_conversation(tok, CONVERSATION, TOOLS, train_on="last")
    assert tok.decode([i for i, m in zip(ids, last_only) if m]) == "It is 21 C in Paris.<|im_end|>"


def test_special_tokens_are_single_ids():
    tok = tiny_tokenizer()
    for s in st.K2_SPECIAL_TOKENS:
        assert tok.encode(s, add_special_tokens=False) == [tok.token_to_id(s)]


def test_segments_roundtrip():
    segs = render_segments(CONVERSATION, TOOLS)
    assert "".join(s.text for s in segs) == GOLDEN
    assert [s.train for s in segs].count(True) == 2


# --------------------------------------------------------------------------- parse

CALL = (
    "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris", "unit": "c"}<|tool_call_end|>'
)


def test_parse_plain_content():
    r = parse_tool_calls("Paris is sunny.<|im_end|>garbage after stop", TOOLS)
    assert r.content == "Paris is sunny." and r.tool_calls == [] and r.ok and r.finished
    assert r.to_openai_message() == {"role": "assistant", "content": "Paris is sunny."}


def test_parse_golden_tool_calls():
    text = (
        "Checking both.<|tool_calls_section_begin|>"
        + CALL
        + '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city":"Rome"}<|tool_call_end|>'
        + "<|tool_calls_section_end|><|im_end|>"
    )
    r = parse_tool_calls(text, TOOLS)
    assert r.ok, r.errors
    assert r.content == "Checking both."
    assert r.to_openai_message() == {
        "role": "assistant",
        "content": "Checking both.",
        "tool_calls": [
            {
                "id": "functions.get_weather:0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
            },
            {
                "id": "functions.get_weather:1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    }


def test_parse_roundtrip_of_rendered_assistant_turn():
    tail = GOLDEN.split("<|im_assistant|>assistant<|im_middle|>")[1]
    r = parse_tool_calls(tail, TOOLS)
    assert r.ok and r.content == "Let me check."
    assert [(c.id, c.name, c.arguments) for c in r.tool_calls] == [("functions.get_weather:0", "get_weather", {"city": "Paris"})]


@pytest.mark.parametrize(
    "text, kinds, n_valid",
    [
        # truncated: the section never closes (max_tokens hit mid-call)
        ("<|tool_calls_section_begin|>" + CALL + '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"ci',
         ["truncated_section", "truncated_call"], 1),
        ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{city: Paris}"
         "<|tool_call_end|><|tool_calls_section_end|>", ["invalid_json"], 0),
        ("<|tool_calls_section_begin|><|tool_call_begin|>functions.launch_rocket:0<|tool_call_argument_begin|>{}"
         "<|tool_call_end|><|tool_calls_section_end|>", ["unknown_tool"], 0),
        ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
         '{"city": 7, "unit": "kelvin"}<|tool_call_end|><|tool_calls_section_end|>', ["schema_violation"], 0),
        ("<|tool_calls_section_begin|><|tool_call_begin|>get weather<|tool_call_argument_begin|>{}"
         "<|tool_call_end|><|tool_calls_section_end|>", ["bad_id"], 0),
        ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>[1]"
         "<|tool_call_end|><|tool_calls_section_end|>", ["not_an_object"], 0),
        ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_end|><|tool_calls_section_end|>",
         ["truncated_call"], 0),
        ("<|tool_calls_section_begin|>" + CALL + "<|tool_calls_section_end|> and more", ["stray_text"], 1),
        ("<|tool_calls_section_begin|>", ["truncated_section"], 0),
    ],
)
def test_malformed_output_is_a_structured_error(text, kinds, n_valid):
    r = parse_tool_calls(text, TOOLS)
    assert [e.kind for e in r.errors] == kinds
    assert len(r.tool_calls) == n_valid
    assert all(str(e) for e in r.errors)


def test_schema_violation_message_names_the_field():
    text = (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"unit": "kelvin"}<|tool_call_end|><|tool_calls_section_end|>'
    )
    (err,) = parse_tool_calls(text, TOOLS).errors
    assert err.kind == "schema_violation" and err.name == "get_weather" and err.index == 0
    assert "'city' is a required property" in err.message and "unit: 'kelvin' is not one of ['c', 'f']" in err.message


def test_without_tools_any_well_formed_call_is_accepted():
    text = "<|tool_calls_section_begin|><|tool_call_begin|>functions.anything:3<|tool_call_argument_begin|>{\"x\": 1}<|tool_call_end|><|tool_calls_section_end|>"
    r = parse_tool_calls(text)
    assert r.ok and r.tool_calls[0].to_openai()["function"] == {"name": "anything", "arguments": json.dumps({"x": 1})}


def test_parser_never_raises_on_noise():
    import random

    rng = random.Random(0)
    alphabet = [st.TOOL_CALLS_SECTION_BEGIN, st.TOOL_CALLS_SECTION_END, st.TOOL_CALL_BEGIN, st.TOOL_CALL_END,
                st.TOOL_CALL_ARGUMENT_BEGIN, st.IM_END, "functions.get_weather:0", "{", "}", '"city"', ":", "x", " "]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        parse_tool_calls(text, TOOLS)


# --------------------------------------------------------------------------- JSON schemas (openk2.chat.schema)


def test_response_format_to_schema():
    from openk2.chat import response_schema

    person = {"type": "object", "properties": {"name": {"type": "string"}}}
    assert response_schema(None) is None and response_schema({"type": "text"}) is None
    assert response_schema({"type": "json_object"}) == {"type": "object"}
    assert response_schema({"type": "json_schema", "json_schema": {"name": "p", "schema": person}}) == person
    with pytest.raises(ValueError, match="type must be text, json_object or json_schema"):
        response_schema({"type": "yaml"})
    with pytest.raises(ValueError, match="schema must be an object"):
        response_schema({"type": "json_schema", "json_schema": {"name": "p"}})
    with pytest.raises(ValueError, match="is not a valid JSON schema"):
        response_schema({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}})


def test_check_json_strips_fences_and_names_each_violation():
    from openk2.chat import check_json

    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    assert check_json('```json\n{"age": 3}\n```', schema) == ({"age": 3}, None)
    assert check_json("", schema) == (None, "the reply was empty")
    assert check_json("{age: 3}", schema)[1].startswith("the reply is not valid JSON (Expecting property name")
    assert check_json('{"age": "x"}', schema)[1] == "the JSON does not match the schema: age: 'x' is not of type 'integer'"
