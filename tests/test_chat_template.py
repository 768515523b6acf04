"""K2's chat templates: the Jinja text and the Python renderer render the same string, byte for byte.

For each named template (k2-instruct, k2-instruct-0905) and each conversation below, with
add_generation_prompt on and off: openk2.chat.render == the template rendered by transformers'
apply_chat_template == openk2.chat.render_jinja, and encode_conversation's ids == tokenising that
rendering. Also: golden strings written from the format's facts, tool-call id rewriting, and the
template every saved tokenizer / exported checkpoint carries (a transformers round trip).
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))

from serve_helpers import tiny_tokenizer  # noqa: E402

from openk2.chat import (  # noqa: E402
    DEFAULT_TEMPLATE,
    TEMPLATE_NAMES,
    checkpoint_template,
    encode_conversation,
    normalize_messages,
    render,
    render_jinja,
    resolve_template,
    template_name,
    template_text,
)

transformers = pytest.importorskip("transformers")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Heure locale — 時刻", "parameters": {}}}


def _call(i, name, args):
    return {"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": args}}


CASES = {
    "no_system": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], None),
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
    "tools": ([{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "Let me check.",
                "tool_calls": [_call(0, "get_weather", '{"city": "Paris"}')]},
               {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": '{"temp_c": 21}'},
               {"role": "assistant", "content": "21 C."}], [WEATHER]),
    "several_calls": ([{"role": "system", "content": "You call tools."},
                       {"role": "user", "content": "Oslo and Rome, and the time?"},
                       {"role": "assistant", "content": None,
                        "tool_calls": [_call(0, "get_weather", {"city": "Oslo"}), _call(1, "get_weather", {"city": "Rome"}),
                                       _call(2, "get_time", {})]}], [WEATHER, CLOCK]),
    "tool_results_name": ([{"role": "user", "content": "Oslo and Rome?"},
                           {"role": "assistant", "content": "",
                            "tool_calls": [_call(0, "get_weather", {"city": "Oslo"}),
                                           _call(1, "get_weather", {"city": "Rome"})]},
                           {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
                            "content": "3"},
                           {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "12"}], [WEATHER]),
    "several_turns": ([{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."},
                       {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6."},
                       {"role": "user", "content": "Thanks."}], None),
    "non_ascii_json": ([{"role": "system", "content": "Réponds en français. 用中文也可以。"},
                        {"role": "user", "content": '{"question": "naïve?", "emoji": "🙂"}\n  indented\tline'},
                        {"role": "assistant", "content": "{\"answer\": \"oui\"}",
                         "tool_calls": [_call(0, "get_time", {"zone": "Europe/Zürich", "fmt": "<%H:%M>"})]},
                        {"role": "tool", "tool_call_id": "functions.get_time:0", "content": '{"t": "12:00 — 正午"}'}],
                       [CLOCK]),
    "content_parts": ([{"role": "system", "content": [{"type": "text", "text": "Part one. "},
                                                      {"type": "text", "text": "Part two."}]},
                       {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                       {"role": "assistant", "content": "ab"}], None),
}
GRID = [(t, c, g) for t in TEMPLATE_NAMES for c in CASES for g in (False, True)]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """openk2's tiny tokenizer, and for each template the transformers tokenizer of a directory saved with it."""
    tok = tiny_tokenizer()
    hf = {}
    for name in TEMPLATE_NAMES:
        d = tmp_path_factory.mktemp(name)
        tok.chat_template = template_text(name)
        tok.save(d)
        hf[name] = transformers.AutoTokenizer.from_pretrained(str(d))
    tok.chat_template = None
    return tok, hf


@pytest.mark.parametrize("template,case,gen", GRID, ids=[f"{t}-{c}-{'gen' if g else 'nogen'}" for t, c, g in GRID])
def test_python_renderer_equals_jinja_template(toks, template, case, gen):
    tok, hf = toks
    messages, tools = CASES[case]
    python = render(messages, tools, gen, template=template)
    via_hf = hf[template].apply_chat_template(normalize_messages(messages), tools=tools, tokenize=False,
                                              add_generation_prompt=gen)
    assert python == via_hf
    assert render_jinja(template_text(template), messages, tools, gen) == via_hf
    ids, mask = encode_conversation(tok, messages, tools, gen, template=template)
    assert ids == tok.encode(via_hf, add_special_tokens=False)
    assert ids == hf[template].encode(via_hf, add_special_tokens=False)
    assert len(mask) == len(ids) and any(mask) == any(m["role"] == "assistant" for m in messages)


KIMI = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
TOOLS_JSON = ('[{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", '
              '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]')


def test_golden_k2_instruct():
    messages, tools = CASES["tool_results_name"]
    assert render(messages, tools, True, template="k2-instruct") == (
        f"<|im_system|>tool_declare<|im_middle|>{TOOLS_JSON}<|im_end|>" + KIMI
        + "<|im_user|>user<|im_middle|>Oslo and Rome?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
        '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n    3<|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:1\n    12<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )


def test_golden_k2_instruct_0905():
    messages, tools = CASES["tool_results_name"]
    assert render(messages, tools, False, template="k2-instruct-0905") == (
        f"<|im_system|>tool_declare<|im_middle|>\n  # Tools\n  {TOOLS_JSON}<|im_end|>" + KIMI
        + "<|im_user|>user<|im_middle|>Oslo and Rome?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
        '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n    3<|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:1\n    12<|im_end|>"
    )
    # 0905 names every turn by its `name` when it has one
    assert render([{"role": "user", "name": "ann", "content": "x"}]) == KIMI + "<|im_user|>ann<|im_middle|>x<|im_end|>"
    assert render([{"role": "user", "name": "ann", "content": "x"}], template="k2-instruct") == (
        KIMI + "<|im_user|>user<|im_middle|>x<|im_end|>")


def test_empty_conversation_has_no_default_system_turn():
    for name in TEMPLATE_NAMES:
        assert render([], add_generation_prompt=True, template=name) == "<|im_assistant|>assistant<|im_middle|>"
        assert render_jinja(template_text(name), [], None, True) == "<|im_assistant|>assistant<|im_middle|>"


def test_foreign_ids_are_rewritten_before_either_renderer():
    messages = [{"role": "user", "content": "Oslo?"},
                {"role": "assistant", "tool_calls": [{"id": "call_abc", "function": {"name": "get_weather",
                                                                                    "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "3"}]
    norm = normalize_messages(messages)
    assert norm[1]["tool_calls"][0]["id"] == "functions.get_weather:0" and norm[2]["tool_call_id"] == norm[1]["tool_calls"][0]["id"]
    assert messages[1]["tool_calls"][0]["id"] == "call_abc"  # the caller's messages are left alone
    for name in TEMPLATE_NAMES:
        text = render(messages, template=name)
        assert "call_abc" not in text and "## Return of functions.get_weather:0\n    3" in text
        assert render_jinja(template_text(name), messages) == text


def test_bad_input_fails_in_both_renderers():
    for name in TEMPLATE_NAMES:
        for bad in ([{"role": "robot", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
            with pytest.raises(ValueError):
                render(bad, template=name)
            with pytest.raises(Exception):
                render_jinja(template_text(name), bad)
    with pytest.raises(ValueError, match="unknown chat template"):
        render([{"role": "user", "content": "x"}], template="chatml")


def test_template_names_and_resolution(tmp_path):
    from openk2.data import tokenizer as data_tokenizer

    assert data_tokenizer.DEFAULT_CHAT_TEMPLATE == DEFAULT_TEMPLATE
    assert data_tokenizer.default_chat_template() == template_text(DEFAULT_TEMPLATE)
    assert [template_name(template_text(n)) for n in TEMPLATE_NAMES] == list(TEMPLATE_NAMES)
    assert template_name(template_text("k2-instruct") + "\n") is None
    (tmp_path / "mine.jinja").write_text("{{ messages[0]['content'] }}")
    label, text = resolve_template(tmp_path / "mine.jinja")
    assert label.endswith("(custom)") and render_jinja(text, [{"role": "user", "content": "hi"}]) == "hi"
    assert resolve_template("k2-instruct") == ("k2-instruct", template_text("k2-instruct"))
    tiny_tokenizer().save(tmp_path / "tok")  # a directory that ships a template: it names the template inside
    assert resolve_template(tmp_path / "tok") == (DEFAULT_TEMPLATE, template_text(DEFAULT_TEMPLATE))
    with pytest.raises(ValueError, match="no chat_template.jinja"):
        resolve_template(tmp_path)
    with pytest.raises(ValueError):
        resolve_template(tmp_path / "missing.jinja")


def test_saved_tokenizer_carries_and_keeps_its_template(tmp_path):
    from openk2.data.tokenizer import load_tokenizer

    tok = tiny_tokenizer()
    tok.save(tmp_path / "a")  # no template of its own: openk2's default
    cfg = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == (tmp_path / "a" / "chat_template.jinja").read_text() == template_text(DEFAULT_TEMPLATE)
    loaded = load_tokenizer(tmp_path / "a")
    loaded.chat_template = template_text("k2-instruct")
    loaded.save(tmp_path / "b")
    assert load_tokenizer(tmp_path / "b").chat_template == template_text("k2-instruct")
    assert checkpoint_template(tmp_path / "b") == template_text("k2-instruct")
    # tokenizer_config.json alone (no chat_template.jinja) is read too
    (tmp_path / "b" / "chat_template.jinja").unlink()
    assert load_tokenizer(tmp_path / "b").chat_template == template_text("k2-instruct")
    assert checkpoint_template(tmp_path / "b") == template_text("k2-instruct")


def test_exported_checkpoint_round_trips_through_transformers(tmp_path):
    """What _finish and `openk2 export` write (save_pretrained + tokenizer.save): transformers renders what openk2 trains on."""
    import dataclasses

    import openk2
    from openk2.model.config import get_preset

    tok = tiny_tokenizer()
    model = openk2.K2ForCausalLM(dataclasses.replace(get_preset("k2-nano"), vocab_size=1024))
    out = model.save_pretrained(tmp_path / "hf")
    tok.save(out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for messages, tools in CASES.values():
        for gen in (False, True):
            text = hf.apply_chat_template(normalize_messages(messages), tools=tools, tokenize=False,
                                          add_generation_prompt=gen)
            assert text == render(messages, tools, gen)
            assert encode_conversation(tok, messages, tools, gen)[0] == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
@pytest.mark.parametrize("train_on", ["all", "last", "none"])
def test_loss_mask_cut_from_the_jinja_rendering_equals_the_python_one(toks, template, train_on):
    """The path for templates that are not a named one: the mask cut from the rendered turns."""
    from openk2.chat import encode_conversation_jinja

    tok, _ = toks
    for messages, tools in CASES.values():
        for gen in (False, True):
            assert encode_conversation_jinja(tok, template_text(template), messages, tools, gen, train_on) == \
                encode_conversation(tok, messages, tools, gen, train_on, template)


def test_loss_mask_of_a_template_that_is_not_prefix_stable_is_refused():
    from openk2.chat import jinja_segments

    # shows only the last message: earlier turns vanish, no prefix to cut at
    last_only = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="not a prefix"):
        jinja_segments(last_only, msgs)
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    segs = jinja_segments(plain, msgs)
    assert [(s.text, s.train) for s in segs] == [("user: a\nassistant: ", False), ("b\n", True)]  # header untrained
