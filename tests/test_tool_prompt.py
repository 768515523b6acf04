"""Tools for every model: openk2's tool prompt for chat templates without tool syntax (SmolLM2's),
the ``<tool_call>{json}</tool_call>`` syntax and its parser, content null / text parts in every
template, and tool_choice (none / required / named) for K2's format and the tagged syntax.

The SmolLM2 tests use its real tokenizer and chat template (``load_smollm2``, loaded once) and two
short real decodes through ``openk2.serve.engine.generate_batch``.
"""

import json
import sys
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))

from serve_helpers import tiny_tokenizer  # noqa: E402

from openk2.chat import (  # noqa: E402
    TOOL_CALL_OPEN,
    ToolChoicePlan,
    flatten_content,
    format_tool_call,
    parse_tagged_tool_calls,
    plan_tool_choice,
    render,
    render_tool_messages,
    template_renders_tools,
    template_text,
    tool_system_prompt,
)
from openk2.data import special_tokens as st  # noqa: E402
from openk2.serve.chat_model import ChatModel  # noqa: E402
from openk2.serve.engine import GenRequest, SamplingParams, generate_batch  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# what openk2's own LLM client sends back after a tool call: content null, the call, its result
CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]
PLAIN = [  # the same conversation with string content
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": CONVERSATION[1]["tool_calls"]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def smol():
    from openk2.serve.backends import load_smollm2, smollm2_path
    from openk2.errors import OpenK2Error

    try:
        smollm2_path()
    except OpenK2Error as e:
        pytest.skip(str(e))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield load_smollm2()
    torch.set_num_threads(threads)


def k2_model() -> ChatModel:
    from types import SimpleNamespace

    tok = tiny_tokenizer()
    return ChatModel("k2-test", SimpleNamespace(vocab_size=tok.vocab_size), tok, "k2", [tok.token_to_id(st.IM_END)])


# --------------------------------------------------------------------------- SmolLM2: the tool prompt


def test_smollm2_template_has_no_tool_syntax_so_the_tools_go_into_the_system_prompt(smol):
    # its own template drops `tools`: the model would never learn they exist
    own = smol.tokenizer.apply_chat_template(WEATHER_Q, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert "get_weather" not in own
    assert smol.uses_tool_prompt and smol.tool_syntax == "tagged" and smol.tool_call_marker == "<tool_call>"
    prompt = smol.decode(smol.chat_prompt_ids(WEATHER_Q, [WEATHER]))
    assert prompt.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(WEATHER["function"]["parameters"]) in prompt and '"name": "get_weather"' in prompt
    assert prompt.endswith("<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    # no tools: exactly the template's own rendering (its default system prompt included)
    assert smol.chat_prompt_text(WEATHER_Q) == smol.tokenizer.apply_chat_template(
        WEATHER_Q, tokenize=False, add_generation_prompt=True)


def test_smollm2_renders_a_whole_tool_conversation_with_null_content_and_text_parts(smol):
    text = smol.chat_prompt_text(CONVERSATION, [WEATHER])
    tail = ("<|im_start|>user\nWeather in Paris?<|im_end|>\n"
            '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n'
            '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>\n'
            "<|im_start|>assistant\n")
    assert text.endswith(tail) and text.count("<|im_start|>") == 5
    assert smol.chat_prompt_text(PLAIN, [WEATHER]) == text
    # a system message keeps its text; the tool prompt follows it
    sys_text = smol.chat_prompt_text([{"role": "system", "content": "Be brief."}] + CONVERSATION, [WEATHER])
    assert sys_text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and sys_text.count("<|im_start|>system") == 1


def test_consecutive_tool_results_become_one_user_turn_in_order():
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}}
             for i, c in enumerate(["Paris", "Oslo"])]
    msgs = render_tool_messages([
        {"role": "user", "content": "Paris and Oslo?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c0", "content": "21"},
        {"role": "tool", "tool_call_id": "c1", "content": "9"},
    ], None)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == ('Checking both.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
                                  '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    assert msgs[2]["content"] == "<tool_response>\n21\n</tool_response>\n<tool_response>\n9\n</tool_response>"
    assert all(set(m) == {"role", "content"} for m in msgs)
    # what was rendered parses back into the same calls (ids count over the conversation)
    back = parse_tagged_tool_calls(msgs[1]["content"], TOOLS)
    assert back.content == "Checking both." and back.errors == []
    assert [(c.id, c.name, c.arguments) for c in back.tool_calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "Paris"}), ("functions.get_weather:1", "get_weather", {"city": "Oslo"})]


def test_probe_finds_a_template_with_its_own_tool_syntax(smol):
    own = smol.tokenizer.chat_template
    assert not template_renders_tools(lambda m, t: smol.tokenizer.apply_chat_template(m, tools=t, tokenize=False))
    try:  # a template that writes the tools keeps its own syntax
        smol.tokenizer.chat_template = ("{% if tools %}{{ tools | tojson }}{% endif %}"
                                        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
        assert not smol.uses_tool_prompt and smol.tool_syntax is None and smol.tool_call_marker is None
        assert '"name": "get_weather"' in smol.chat_prompt_text(WEATHER_Q, [WEATHER])
        with pytest.raises(ValueError, match="tool_choice='required'"):
            smol.prepare_chat(WEATHER_Q, [WEATHER], "required", SamplingParams())
    finally:
        smol.tokenizer.chat_template = own
    assert smol.uses_tool_prompt  # probed again for the restored template
    assert template_renders_tools(lambda m, t: render(m, t)) and not template_renders_tools(lambda m, t: 1 / 0)


# --------------------------------------------------------------------------- content in every template


def test_null_content_and_text_parts_render_in_k2_python_and_jinja():
    cm = k2_model()
    python_ids = cm.chat_prompt_ids(CONVERSATION, [WEATHER])
    assert python_ids == cm.chat_prompt_ids(PLAIN, [WEATHER])
    cm.chat_jinja = template_text(cm.template_name)  # the Jinja path renders the same
    assert cm.chat_prompt_ids(CONVERSATION, [WEATHER]) == python_ids
    assert cm.decode(python_ids).count(st.TOOL_CALL_BEGIN) == 1


def test_a_non_text_part_is_a_value_error_naming_the_message(smol):
    bad = [{"role": "user", "content": "hi"},
           {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}]}]
    for cm in (smol, k2_model()):
        with pytest.raises(ValueError, match=r"message 1: content part 1 is of type 'image_url'"):
            cm.chat_prompt_ids(bad)
    with pytest.raises(ValueError, match="message 0: content must be"):
        flatten_content([{"role": "user", "content": 7}])
    assert flatten_content([{"role": "user", "content": ["a", {"text": "b"}]}])[0]["content"] == "ab"


# --------------------------------------------------------------------------- the tagged parser


def test_tagged_parser_reads_calls_and_records_every_malformed_one():
    good = format_tool_call("get_weather", {"city": "Paris"})
    as_text = r'<tool_call>{"name": "get_time", "arguments": "{\"timezone\": \"CET\"}"}</tool_call>'  # arguments as JSON text
    r = parse_tagged_tool_calls(f"Let me check.\n{good}\n{as_text}<|im_end|>",
                                TOOLS, stops=["<|im_end|>"], first_call_index=3)
    assert r.ok and r.finished and r.content == "Let me check."
    assert [c.to_openai() for c in r.tool_calls] == [
        {"id": "functions.get_weather:3", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "functions.get_time:4", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "CET"}'}}]
    cases = {
        '<tool_call>{"name": "get_weather", "arguments": {city: 1}}</tool_call>': "invalid_json",
        '<tool_call>{"name": "get_stock", "arguments": {}}</tool_call>': "unknown_tool",
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>': "not_an_object",
        '<tool_call>["get_weather"]</tool_call>': "not_an_object",
        '<tool_call>{"name": "get_weather", "arguments": {"city": 7}}</tool_call>': "schema_violation",
        '<tool_call>{"name": "get_weather", "arguments": {"unit": "c"}}</tool_call>': "schema_violation",
        '<tool_call>{"arguments": {}}</tool_call>': "bad_call",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa': "truncated_call",
        f"{good} and then some words": "stray_text",
    }
    for text, kind in cases.items():
        r = parse_tagged_tool_calls(text, TOOLS)
        assert [e.kind for e in r.errors] == [kind], text
        assert len(r.tool_calls) == (1 if kind == "stray_text" else 0)
    # one bad call does not lose the good one next to it; without tools any name is accepted
    r = parse_tagged_tool_calls('<tool_call>{"name": "nope", "arguments": {}}</tool_call>' + good, TOOLS)
    assert [c.name for c in r.tool_calls] == ["get_weather"] and [(e.kind, e.index) for e in r.errors] == [("unknown_tool", 0)]
    assert parse_tagged_tool_calls('<tool_call>{"name": "nope", "arguments": {}}</tool_call>').ok
    # never raises: every prefix of a completion parses
    full = "Sure. " + good + format_tool_call("get_time", {"timezone": "UTC"})
    kinds = set()
    for i in range(len(full) + 1):
        kinds |= {e.kind for e in parse_tagged_tool_calls(full[:i], TOOLS).errors}
    assert "truncated_call" in kinds and parse_tagged_tool_calls(full, TOOLS).ok


def test_smollm2_parse_cuts_at_im_end_and_returns_calls(smol):
    r = smol.parse('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>junk', [WEATHER])
    assert r.finished and r.ok and r.content == "" and [c.arguments for c in r.tool_calls] == [{"city": "Oslo"}]
    assert r.to_openai_message()["content"] is None


# --------------------------------------------------------------------------- tool_choice


def test_plan_tool_choice_for_both_syntaxes():
    assert plan_tool_choice(WEATHER_Q, TOOLS, "none", syntax="tagged").stop == ("<tool_call>",)
    assert plan_tool_choice(WEATHER_Q, TOOLS, "none").forbid_calls
    named = plan_tool_choice(PLAIN, TOOLS, NAMED, syntax="tagged")
    assert (named.prefix, named.suffix, named.first_call_index) == ('<tool_call>{"name": "get_weather", "arguments": ', "}</tool_call>", 1)
    assert named.arguments_schema == SCHEMAS["get_weather"] and named.alternatives == []
    req = plan_tool_choice(WEATHER_Q, TOOLS, "required", syntax="tagged")
    # the headers' shared text is forced, the rest is one alternative per tool
    assert req.prefix == '<tool_call>{"name": "get_' and req.arguments_schema is None and req.suffix == ""
    assert req.alternatives == [('weather", "arguments": ', SCHEMAS["get_weather"], "}</tool_call>"),
                                ('time", "arguments": ', SCHEMAS["get_time"], "}</tool_call>")]
    k2 = plan_tool_choice(PLAIN, TOOLS, "required")
    assert k2.prefix == st.TOOL_CALLS_SECTION_BEGIN + st.TOOL_CALL_BEGIN + "functions.get_"
    assert k2.suffix == st.TOOL_CALLS_SECTION_END and {a[2] for a in k2.alternatives} == {st.TOOL_CALL_END}
    assert [a[0] for a in k2.alternatives] == [f"weather:1{st.TOOL_CALL_ARGUMENT_BEGIN}", f"time:1{st.TOOL_CALL_ARGUMENT_BEGIN}"]
    nested = plan_tool_choice(WEATHER_Q, [{"name": "get"}, {"name": "get_x"}], "required", syntax="tagged")
    assert nested.prefix == '<tool_call>{"name": "get' and [a[0] for a in nested.alternatives] == [
        '", "arguments": ', '_x", "arguments": ']
    one = plan_tool_choice(WEATHER_Q, [WEATHER], "required")  # one tool: the named plan
    assert one == plan_tool_choice(WEATHER_Q, [WEATHER], NAMED)
    assert one.prefix.endswith(f"functions.get_weather:0{st.TOOL_CALL_ARGUMENT_BEGIN}") and one.arguments_schema is not None
    for choice, match in [("required", "no tools"), ({"type": "function", "function": {"name": "x"}}, "not among"),
                          ("sometimes", "must be")]:
        with pytest.raises(ValueError, match=match):
            plan_tool_choice(WEATHER_Q, TOOLS if match != "no tools" else None, choice, syntax="tagged")


def test_prepare_chat_constrains_the_call_for_both_formats(smol):
    ids, params, plan = smol.prepare_chat(WEATHER_Q, [WEATHER], NAMED, SamplingParams(max_tokens=16))
    assert smol.decode(ids).endswith('<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": ')
    assert params.json_schema == SCHEMAS["get_weather"] and params.max_tokens == 16
    r = smol.finish_chat('{"city": "Rome"}', plan, [WEATHER])
    assert r.ok and [c.to_openai()["function"] for c in r.tool_calls] == [{"name": "get_weather", "arguments": '{"city": "Rome"}'}]
    _, none_params, _ = smol.prepare_chat(WEATHER_Q, [WEATHER], "none", SamplingParams(stop=("END",)))
    assert none_params.stop == ("END", "<tool_call>") and none_params.json_schema is None
    # K2: one tool -> the whole header forced, the arguments constrained, the section closed by finish_chat
    k2 = k2_model()
    assert k2.tool_call_marker == st.TOOL_CALLS_SECTION_BEGIN
    ids, params, plan = k2.prepare_chat(WEATHER_Q, [WEATHER], "required", SamplingParams())
    assert k2.decode(ids).endswith(f"{st.TOOL_CALLS_SECTION_BEGIN}{st.TOOL_CALL_BEGIN}functions.get_weather:0"
                                   f"{st.TOOL_CALL_ARGUMENT_BEGIN}")
    assert params.json_schema == SCHEMAS["get_weather"]
    r = k2.finish_chat('{"city": "Rome"}', plan, [WEATHER])
    assert r.ok and [c.id for c in r.tool_calls] == ["functions.get_weather:0"]


def _choice_grammar():
    from openk2.serve import constrained

    if not hasattr(constrained, "ChoiceGrammar"):
        pytest.skip("openk2.serve.constrained.ChoiceGrammar has not landed")
    return constrained.ChoiceGrammar


def test_prepare_chat_compiles_one_alternative_per_tool_into_a_choice_grammar(smol):
    grammar_cls = _choice_grammar()
    from openk2.serve.constrained import TokenConstraint

    _, params, plan = smol.prepare_chat(WEATHER_Q, TOOLS, "required", SamplingParams(json_schema={"type": "object"}))
    g = params.grammar
    assert isinstance(g, grammar_cls) and params.json_schema is None
    assert plan.prefix == '<tool_call>{"name": "get_' and len(plan.alternatives) == 2
    assert g.matches('time", "arguments": {"timezone": "CET"}}</tool_call>')
    assert g.matches('weather", "arguments": {"city": "Oslo", "unit": "f"}}</tool_call>')
    for bad in ['stock", "arguments": {}}</tool_call>',           # not a declared tool
                'weather", "arguments": {"unit": "c"}}</tool_call>',  # city is required
                'time", "arguments": {"city": "Oslo"}}</tool_call>',  # the other tool's arguments
                'time", "arguments": {"timezone": "CET"}}']:          # not closed
        assert not g.matches(bad), bad
    # K2: the alternatives hold special tokens, which only the special tokens themselves produce
    k2 = k2_model()
    _, params, plan = k2.prepare_chat(WEATHER_Q, TOOLS, "required", SamplingParams())
    assert params.grammar.matches(f'time:0{st.TOOL_CALL_ARGUMENT_BEGIN}{{"timezone": "CET"}}{st.TOOL_CALL_END}')
    assert not params.grammar.matches(f'time:0{st.TOOL_CALL_ARGUMENT_BEGIN}{{"city": "Oslo"}}{st.TOOL_CALL_END}')
    TokenConstraint(params.grammar, k2.token_vocab())  # the vocabulary has every special token the grammar needs
    r = k2.finish_chat(f'time:0{st.TOOL_CALL_ARGUMENT_BEGIN}{{"timezone": "CET"}}{st.TOOL_CALL_END}', plan, TOOLS)
    assert r.ok and [(c.id, c.arguments) for c in r.tool_calls] == [("functions.get_time:0", {"timezone": "CET"})]


# --------------------------------------------------------------------------- real decoding


def _run(cm, messages, tools, tool_choice, max_tokens):
    ids, params, plan = cm.prepare_chat(messages, tools, tool_choice, SamplingParams(max_tokens=max_tokens))
    req = GenRequest(ids, params)
    generate_batch(cm, [req])
    assert req.error is None, req.error
    return req, cm.finish_chat(req.text, plan, tools, complete=req.finish_reason == "stop")


def test_smollm2_required_makes_a_valid_weather_call(smol):
    req, r = _run(smol, WEATHER_Q, [WEATHER], "required", 32)
    assert req.finish_reason == "stop" and r.errors == [] and len(r.tool_calls) == 1
    (call,) = [c.to_openai() for c in r.tool_calls]
    assert call["id"] == "functions.get_weather:0" and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["get_weather"])


def test_smollm2_auto_call_is_parsed_and_none_stops_where_the_call_would_start(smol):
    # asked to echo a call, SmolLM2 writes one: auto parses it, none cuts the completion at <tool_call>
    echo = [{"role": "user", "content": 'Repeat exactly, nothing else: '
             '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'}]
    req, r = _run(smol, echo, [WEATHER], "auto", 32)
    assert TOOL_CALL_OPEN in req.text and r.errors == []
    assert [(c.id, c.name, c.arguments) for c in r.tool_calls] == [("functions.get_weather:0", "get_weather", {"city": "Paris"})]
    req, r = _run(smol, echo, [WEATHER], "none", 32)
    assert req.finish_reason == "stop" and TOOL_CALL_OPEN not in req.text and r.tool_calls == [] and r.errors == []


def test_smollm2_required_with_two_tools_picks_a_declared_one_with_valid_arguments(smol):
    _choice_grammar()  # and an engine that decodes under SamplingParams.grammar
    req, r = _run(smol, WEATHER_Q, TOOLS, "required", 48)
    assert req.finish_reason == "stop" and r.errors == [] and len(r.tool_calls) == 1, (req.text, r.errors)
    call = r.tool_calls[0]
    assert call.name in SCHEMAS
    jsonschema.validate(call.arguments, SCHEMAS[call.name])
    assert req.text.endswith("}</tool_call>")


def test_tool_prompt_text_is_documented():
    text = tool_system_prompt([WEATHER])
    assert text.count("\n{") == 1 and "<tool_call>" in text and "</tool_response>" in text
    assert ToolChoicePlan().syntax == "k2"
