"""Grammar-guided decoding (openk2.serve.constrained): numeric bounds, patterns, caps and the
token budget, ChoiceGrammar for tool calls (special tokens), the grammar cache and eager errors.

The decoding tests drive TokenConstraint the way the engine does (choose, accept, complete,
``remaining`` = tokens left) with adversarial logits instead of a model, then check the text
with jsonschema."""

import json
import re
from pathlib import Path

import pytest
import torch

import openk2.serve.constrained as C
from openk2.chat.schema import schema_errors
from openk2.data import special_tokens as st

FIXTURE_TOKENIZER = Path(__file__).parent / "fixtures" / "serve" / "tokenizer.json"

# a small vocabulary: every printable ASCII character, some multi-character tokens, EOS last
MULTI = ['{"', '":', '": ', '", "', '","', "true", "false", "null", "12", "345", "0.", "-1", "99", "Paris",
         "abc", 'a"', '"}', "}}", "]}", "\\n", "é", "AB-", "e5", "1e"]
TEXTS = [chr(c) for c in range(32, 127)] + MULTI
EOS = len(TEXTS)
VOCAB = C.TokenVocab(TEXTS + [None], [EOS])
IDS = {t: i for i, t in enumerate(TEXTS)}


def decode(grammar, logits_fn, max_tokens, *, temperature=1.0, seed=0, budget=True, vocab=VOCAB):
    """The engine's loop for one row: (text, token ids, finish reason)."""
    c = C.TokenConstraint(grammar, vocab)
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for step in range(max_tokens):
        logits = logits_fn(step, gen)
        remaining = max_tokens - step
        tok = c.choose(logits, temperature, 1.0, gen, remaining=remaining) if budget else \
            c.choose(logits, temperature, 1.0, gen)
        if tok in vocab.eos_ids:
            return c.text, ids, "stop"
        c.accept(tok)
        ids.append(tok)
        if c.complete:
            return c.text, ids, "stop"
    return c.text, ids, "length"


def random_logits(size=VOCAB.size):
    return lambda step, gen: torch.randn(size, generator=gen) * 3


def runaway(*token_texts, size=VOCAB.size):
    """A model stuck on a token (repetition): the first text dominates every step, the next ones
    come second, third..."""
    def fn(step, gen):
        logits = torch.randn(size, generator=gen)
        for k, t in enumerate(token_texts):
            logits[IDS[t]] += 30.0 - 10 * k
        return logits
    return fn


# --------------------------------------------------------------------------- 1. numeric bounds, pattern

NUMBERS = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 10, "maximum": 20},
        "x": {"type": "number", "exclusiveMinimum": 0, "maximum": 1.5},
        "m": {"type": "integer", "multipleOf": 7, "minimum": -30, "exclusiveMaximum": 28},
        "p": {"type": "number", "minimum": -2.25, "maximum": -2.125},
    },
    "required": ["n", "x", "m", "p"],
}


def test_numeric_bounds_hold_while_sampling():
    for seed in range(40):
        text, _, _ = decode(C.SchemaGrammar(NUMBERS), random_logits(), 120, seed=seed, budget=False)
        value = json.loads(text)
        assert schema_errors(value, NUMBERS) == [], (seed, text)


def test_integer_prefixes_that_cannot_reach_the_range_are_rejected():
    g = C.SchemaGrammar({"type": "integer", "minimum": 10, "maximum": 20})
    s = g.initial()
    assert g.advance(s, "1") and g.advance(s, "2")  # 1x and 20 are reachable
    for dead in ("3", "0", "-", "21", "9"):
        assert not g.advance(s, dead), dead
    assert g.matches("10") and g.matches("20") and not g.matches("1") and not g.matches("2")
    assert g.closing_cost(g.advance(s, "2")) == 1 and g.closing_cost(g.advance(s, "15")) == 0
    big = C.SchemaGrammar({"type": "integer", "minimum": 1000000})
    assert big.closing_cost(big.advance(big.initial(), "1")) == 6  # "1000000"
    mult = C.SchemaGrammar({"type": "integer", "multipleOf": 5, "exclusiveMinimum": 0, "maximum": 20})
    assert [n for n in range(-5, 30) if mult.matches(str(n))] == [5, 10, 15, 20]
    assert not mult.advance(mult.initial(), "3") and mult.advance(mult.initial(), "2")  # 30+ too big, 20 fits
    neg = C.SchemaGrammar({"type": "integer", "minimum": -5, "maximum": -3})
    assert [n for n in range(-8, 3) if neg.matches(str(n))] == [-5, -4, -3]
    assert not neg.advance(neg.initial(), "4") and not neg.advance(neg.initial(), "-6")


def test_number_bounds_close_only_in_range_and_use_no_exponent():
    g = C.SchemaGrammar({"type": "number", "minimum": 0.5, "exclusiveMaximum": 1.5})
    for ok in ("0.5", "1", "1.49", "0.75"):
        assert g.matches(ok), ok
    for bad in ("0.49", "1.5", "2", "1.5e0", "5e-1", "-1"):
        assert not g.matches(bad), bad
    assert not g.advance(g.initial(), "0.4")  # [0.4, 0.5) misses the range
    assert g.closing_cost(g.advance(g.initial(), "0")) == 2  # "0.5"
    free = C.SchemaGrammar({"type": "number"})
    assert free.matches("5e-1") and free.matches("-12.5E+3")  # unbounded numbers keep the exponent


def test_pattern_is_enforced_while_decoding():
    schema = {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}
    g = C.SchemaGrammar(schema)
    assert g.matches('"AB-123"') and not g.matches('"AB-12"') and not g.matches('"ab-123"')
    assert not g.advance(g.initial(), '"a') and g.advance(g.initial(), '"A')
    assert g.closing_cost(g.advance(g.initial(), '"AB')) == 5  # -123 and the quote
    for seed in range(15):
        text, _, _ = decode(g, random_logits(), 40, seed=seed)
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", json.loads(text)), text
    # unanchored: a search, as JSON Schema says; a match anywhere closes the string
    anywhere = C.SchemaGrammar({"type": "string", "pattern": "cat", "maxLength": 6})
    assert anywhere.matches('"a cat"') and not anywhere.matches('"a dog"')
    text, _, _ = decode(anywhere, runaway("a"), 30)
    assert "cat" in json.loads(text) and len(json.loads(text)) <= 6


# --------------------------------------------------------------------------- 2. caps and the token budget

VERDICT = {"type": "object", "properties": {"reasoning": {"type": "string"}, "verdict": {"enum": ["A", "B", "tie"]}},
           "required": ["reasoning", "verdict"]}


def test_unbounded_strings_and_arrays_are_capped():
    s = C.SchemaGrammar({"type": "string"})
    assert s.matches('"' + "a" * C.DEFAULT_MAX_STRING + '"') and not s.matches('"' + "a" * (C.DEFAULT_MAX_STRING + 1) + '"')
    a = C.SchemaGrammar({"type": "array", "items": {"type": "integer"}})
    assert a.matches("[" + ",".join(["1"] * C.DEFAULT_MAX_ITEMS) + "]")
    assert not a.matches("[" + ",".join(["1"] * (C.DEFAULT_MAX_ITEMS + 1)) + "]")
    small = C.SchemaGrammar({"type": "array", "items": {"type": "string"}}, max_string=3, max_items=2)
    assert small.matches('["abc","d"]') and not small.matches('["abcd"]') and not small.matches('["a","b","c"]')
    assert C.SchemaGrammar({"type": "string", "maxLength": 2000}).matches('"' + "a" * 2000 + '"')  # explicit wins


def test_a_runaway_string_still_closes_within_max_tokens():
    g = C.SchemaGrammar(VERDICT)
    least = g.min_length()
    assert least == len('{"reasoning":"","verdict":"A"}')
    for max_tokens in (least, least + 1, least + 7, 60):
        for seed in range(3):
            text, ids, _ = decode(g, runaway("a", '"'), max_tokens, seed=seed)
            assert len(ids) <= max_tokens and schema_errors(json.loads(text), VERDICT) == [], (max_tokens, text)
    # without a budget the same model runs out of tokens inside the string
    text, _, reason = decode(g, runaway("a", '"'), 60, budget=False)
    assert reason == "length" and not g.matches(text) and text.endswith("a" * 40)


def test_a_budget_below_the_minimal_length_takes_the_shortest_way():
    g = C.SchemaGrammar(VERDICT)
    for seed in range(3):
        text, ids, reason = decode(g, runaway("a", '"'), 12, seed=seed)  # 30 characters are needed
        assert reason == "length" and len(ids) == 12
        assert '{"reasoning":"","verdict":"'.startswith(text)  # nothing but the shortest way to close
        text, ids, reason = decode(g, random_logits(), 40, seed=seed, budget=False)
        assert g.matches(text) or reason == "length"


def test_budget_with_nested_values_and_random_logits():
    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "score": {"type": "integer", "minimum": 100, "maximum": 200},
        "ok": {"type": "boolean"}}, "required": ["items", "score", "ok"]}
    g = C.SchemaGrammar(schema)
    least = g.min_length()
    assert least == len('{"items":["",""],"score":100,"ok":true}')
    for seed in range(20):
        max_tokens = least + seed % 5
        text, ids, _ = decode(g, random_logits(), max_tokens, seed=seed)
        assert len(ids) <= max_tokens and schema_errors(json.loads(text), schema) == [], (seed, text)


def test_remaining_one_allows_only_tokens_that_finish():
    g = C.SchemaGrammar({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
    c = C.TokenConstraint(g, VOCAB)
    for t in '{"a":"xy':
        c.accept(IDS[t])
    assert c.closing_cost == 2
    m2, m1 = c.mask(remaining=3), c.mask(remaining=2)
    assert m2[IDS["z"]] and not m1[IDS["z"]]  # a letter still fits with 3 left, not with 2
    assert m1[IDS['"}']] and m1[IDS['"']]  # closing fits
    assert not c.mask(remaining=1)[IDS['"']] and c.mask(remaining=1)[IDS['"}']]


# --------------------------------------------------------------------------- choose / mask consistency


def test_mask_agrees_with_allows_and_greedy_is_exact():
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                               "n": {"type": "integer", "minimum": 10, "maximum": 20}},
              "required": ["name", "n"]}
    g = C.SchemaGrammar(schema)
    long_names = C.SchemaGrammar({"type": "array", "items": {"type": "string", "minLength": 6}, "minItems": 1})
    gen = torch.Generator().manual_seed(1)
    for g, prefix in [(g, p) for p in ("", '{"', '{"name": "ab', '{"name":"abcde', '{"name":"x","n":1', '{"name":"x","n":20')] + \
            [(long_names, p) for p in ('["', '["abc', '["abcdef', '["abcdefg", "')]:
        c = C.TokenConstraint(g, VOCAB)
        c.state = g.advance(g.initial(), prefix)
        for remaining in (None, 4, 12):
            mask = c.mask(remaining)
            assert mask.tolist() == [c.allows(i, remaining) for i in range(VOCAB.size)], (prefix, remaining)
            logits = torch.randn(VOCAB.size, generator=gen)
            if remaining is not None and c.closing_cost > remaining:  # out of budget: the shortest way
                mask = c.mask(c.closing_cost)
            best = int(torch.where(mask, logits, torch.tensor(float("-inf"))).argmax())
            assert c.choose(logits, 0.0, 1.0, None, remaining) == best
    old = C.TokenConstraint(C.SchemaGrammar(schema), VOCAB)  # the signature without remaining still works
    assert TEXTS[old.choose(torch.zeros(VOCAB.size), 0.0, 1.0, None)] in ("{", '{"')
    assert TEXTS[old.choose(torch.zeros(VOCAB.size), 1.0, 1.0, torch.Generator().manual_seed(0))] in ("{", '{"')


def test_sampling_is_the_constrained_distribution():
    g = C.SchemaGrammar({"enum": ["true", "null", 12, 345]})  # allowed first tokens: '"', 'n', '1', '3', 'null', '12', '345'
    c = C.TokenConstraint(g, VOCAB)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(VOCAB.size, generator=gen)
    allowed = c.mask()
    want = torch.softmax(logits, -1) * allowed
    want /= want.sum()
    n = 3000
    counts = torch.zeros(VOCAB.size)
    for _ in range(n):
        counts[c.choose(logits, 1.0, 1.0, gen)] += 1
    assert counts[~allowed].sum() == 0
    assert float((counts / n - want).abs().max()) < 0.03


# --------------------------------------------------------------------------- 3. ChoiceGrammar


@pytest.fixture(scope="module")
def k2_vocab():
    from openk2.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(FIXTURE_TOKENIZER))
    special = [i for i in (tok.token_to_id(t) for t in st.K2_SPECIAL_TOKENS) if i is not None]
    eos = [tok.token_to_id(st.IM_END)]
    return tok, C.TokenVocab.from_tokenizer(tok, tok.vocab_size, eos, special)


TOOLS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "unit": {"enum": ["c", "f"]}}, "required": ["city"]},
    "add": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                             "b": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["a", "b"], "additionalProperties": False},
}


def tool_alternatives():
    return [(f"functions.{name}:0{st.TOOL_CALL_ARGUMENT_BEGIN}", schema, st.TOOL_CALL_END)
            for name, schema in TOOLS.items()]


def test_choice_grammar_recognises_exactly_the_alternatives():
    g = C.ChoiceGrammar(tool_alternatives() + [("no call", None, "")])
    arg, end = st.TOOL_CALL_ARGUMENT_BEGIN, st.TOOL_CALL_END
    assert g.matches(f'functions.get_weather:0{arg}{{"city":"Paris"}}{end}')
    assert g.matches(f'functions.add:0{arg}{{"a": 1, "b": 9}}{end}')
    assert g.matches("no call")
    for bad in (f'functions.get_wether:0{arg}{{"city":"Paris"}}{end}',  # no such tool
                f'functions.add:0{arg}{{"a":1,"b":10}}{end}',  # out of range
                f'functions.add:0{arg}{{"a":1}}{end}',  # missing b
                f'functions.get_weather:0{arg}{{"city":"Paris"}}',  # no suffix
                "no call!"):
        assert not g.matches(bad), bad


def test_choice_grammar_samples_real_special_tokens(k2_vocab):
    tok, vocab = k2_vocab
    arg_id, end_id = tok.token_to_id(st.TOOL_CALL_ARGUMENT_BEGIN), tok.token_to_id(st.TOOL_CALL_END)
    g = C.ChoiceGrammar(tool_alternatives())
    pat = re.compile(r"functions\.(\w+):0" + re.escape(st.TOOL_CALL_ARGUMENT_BEGIN) + "(.*)" + re.escape(st.TOOL_CALL_END), re.S)
    names = set()
    for seed in range(12):
        text, ids, reason = decode(g, random_logits(vocab.size), 80, seed=seed, vocab=vocab)
        m = pat.fullmatch(text)
        assert m and reason == "stop", text
        name, args = m.group(1), json.loads(m.group(2))
        assert schema_errors(args, TOOLS[name]) == [], text
        assert ids.count(arg_id) == 1 and ids[-1] == end_id  # the special tokens themselves, not their spelling
        assert tok.decode(ids) == text
        names.add(name)
    assert names == set(TOOLS)
    # at the special token's place its spelling in ordinary tokens is not allowed
    c = C.TokenConstraint(g, vocab)
    for i in tok.encode("functions.add:0"):
        c.accept(i)
    assert c.allows(arg_id) and not c.allows(tok.token_to_id("<")) and not c.allows(end_id)


def test_choice_grammar_needs_the_special_tokens_in_the_vocabulary():
    g = C.ChoiceGrammar(tool_alternatives())
    with pytest.raises(ValueError, match="tool_call_argument_begin"):
        C.TokenConstraint(g, VOCAB)  # the ASCII vocabulary has no special tokens


# --------------------------------------------------------------------------- 4. grammar cache, eager errors


def test_grammar_for_caches_by_canonical_schema():
    a = C.grammar_for({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
    b = C.grammar_for({"required": ["x"], "properties": {"x": {"type": "integer"}}, "type": "object"})
    assert a is b and a.matches('{"x":3}')
    assert C.grammar_for({"type": "string", "maxLength": 3}) is not a


@pytest.mark.parametrize("schema, message", [
    ({"$ref": "#/$defs/missing"}, "does not resolve"),
    ({"$ref": "https://example.com/s.json"}, "only local"),
    ({"type": "date"}, "unsupported JSON schema type 'date'"),
    ({"type": "object", "properties": {"d": {"type": "array", "items": {"type": "datetime"}}}}, "'datetime'"),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "no integer satisfies >= 5, <= 3"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "no integer"),
    ({"type": "string", "pattern": "(ab"}, "does not compile"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 > maxLength 2"),
    ({"enum": []}, "admits no JSON value"),
    ({"type": "object", "required": ["x"], "additionalProperties": False}, "required property 'x'"),
])
def test_schema_problems_raise_at_compile_time(schema, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        C.SchemaGrammar(schema)
    with pytest.raises(ValueError):
        C.grammar_for(schema)


def test_required_but_undeclared_properties_are_produced():
    g = C.SchemaGrammar({"type": "object", "required": ["id"], "additionalProperties": {"type": "integer"}})
    assert g.matches('{"id":4}') and not g.matches("{}") and not g.matches('{"id":"4"}')
    text, _, _ = decode(g, random_logits(), 30, seed=3)
    assert isinstance(json.loads(text)["id"], int)


def test_unenforced_keywords_are_reported():
    g = C.SchemaGrammar({"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                                          "tags": {"type": "array", "uniqueItems": True}}})
    assert g.unenforced == {"format", "uniqueItems"}
    assert C.SchemaGrammar({"type": "integer", "minimum": 0}).unenforced == set()
