"""Corpus: real sources, provenance, deterministic held-out split, math rendering."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from openk2.data import math_problems
from openk2.data.corpus import (
    CorpusConfig,
    Document,
    _hash01,
    chunk_text,
    collect,
    get_preset,
    sample_for_tokenizer,
    split_of,
    stdlib_files,
)
from openk2.errors import DataError

TINY = get_preset("tiny")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_groups():
    return collect(TINY)


def test_tiny_corpus_covers_the_three_domains_with_provenance(tiny_groups):
    docs = [d for group in tiny_groups.values() for d in group]
    sources = {(d.domain, d.source) for d in docs}
    assert {"shakespeare", "kjv-bible"} <= {s for dom, s in sources if dom == "text"}
    assert any(s.endswith("-stdlib") for dom, s in sources if dom == "code")
    assert {"reasoning_gym/gsm_symbolic", "reasoning_gym/gcd", "reasoning_gym/prime_factorization"} == {
        s for dom, s in sources if dom == "math"
    }
    assert len({d.key for d in docs}) == len(docs)  # provenance is unique
    by_source = {}
    for d in docs:
        by_source[d.source] = by_source.get(d.source, 0) + 1
    assert by_source["reasoning_gym/gsm_symbolic"] == 150 and by_source["reasoning_gym/gcd"] == 60
    assert by_source["python-stdlib"] == 23  # the tiny preset names 17 patterns, json/ and html/ hold 8 files
    genesis1 = next(d for d in docs if d.source == "kjv-bible" and d.id == "Genesis 1")
    assert genesis1.text.startswith("Genesis 1\n\n1 In the beginning God created the heaven and the earth.")
    assert genesis1.text.count("\n") == 2 + 30  # heading, blank line, 31 verses
    assert all(len(d.text) <= TINY.max_doc_chars for d in docs if d.source == "shakespeare")


def test_split_is_a_pure_function_of_provenance(tiny_groups):
    # hard-coded numbers: the split must not move between versions or machines
    assert _hash01("split:text/kjv-bible/Genesis 1") == pytest.approx(0.37180420517710605, abs=1e-15)
    doc = Document("text", "kjv-bible", "Genesis 1", "ignored")
    assert split_of(doc, 0.05) == "train" and split_of(doc, 0.7) == "val"
    again = collect(TINY)
    assert {k: [d.key for d in v] for k, v in again.items()} == {k: [d.key for d in v] for k, v in tiny_groups.items()}
    val = {d.key for (split, _), v in tiny_groups.items() if split == "val" for d in v}
    n = sum(len(v) for v in tiny_groups.values())
    assert 0.05 * n < len(val) < 0.16 * n  # val_fraction 0.1 of ~410 documents
    # a larger fraction keeps every old val document (threshold on a fixed hash)
    wider = {d.key for (split, _), v in collect(TINY.replace(val_fraction=0.3)).items() if split == "val" for d in v}
    assert val < wider


def test_split_and_order_do_not_depend_on_python_hash_seed():
    cfg = TINY.replace(math_problems={"gcd": 30})

    def listing(groups):
        return {"/".join(k): [d.key for d in v] for k, v in sorted(groups.items())}

    code = (
        "import json; from openk2.data.corpus import collect, get_preset;"
        "g = collect(get_preset('tiny').replace(math_problems={'gcd': 30}));"
        "print(json.dumps({'/'.join(k): [d.key for d in v] for k, v in sorted(g.items())}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert json.loads(out) == listing(collect(cfg))
    assert len(json.loads(out)["val/math"]) >= 1


def test_stdlib_files_are_sorted_and_skip_tests_and_huge_files():
    files = stdlib_files(CorpusConfig())
    assert files == stdlib_files(CorpusConfig())
    rel = [str(p) for p in files]
    by_dir: dict[str, list[str]] = {}
    for p in files:
        by_dir.setdefault(str(p.parent), []).append(p.name)
    assert all(names == sorted(names) for names in by_dir.values())
    assert len(files) > 300
    assert not any("/test/" in s or "/tests/" in s or s.rsplit("/", 1)[-1].startswith("test_") for s in rel)
    assert all(p.stat().st_size <= 200_000 for p in files)
    assert any(s.endswith("/json/decoder.py") for s in rel)


def test_chunk_text_cuts_at_blank_lines():
    text = "\n\n".join(f"para {i} " + "x" * 50 for i in range(20))
    chunks = chunk_text(text, 200)
    assert all(len(c) <= 200 for c in chunks)
    assert "\n\n".join(chunks) == text
    assert [c.count("para") for c in chunks] == [3, 3, 3, 3, 3, 3, 2]  # 3 x 57 chars + 2 separators fit in 200


def test_tokenizer_sample_follows_weights(tiny_groups):
    docs = sample_for_tokenizer(tiny_groups, 200_000, {"text": 0.5, "code": 0.3, "math": 0.2})
    per = {}
    for d in docs:
        per[d.domain] = per.get(d.domain, 0) + len(d.text.encode())
    assert all(d.domain in ("text", "code", "math") for d in docs)
    assert not any(split_of(d, TINY.val_fraction) == "val" for d in docs)
    assert 100_000 <= per["text"] < 100_000 + TINY.max_doc_chars
    assert 40_000 <= per["math"] < 41_000  # small documents: lands just past the 0.2 budget
    assert 60_000 <= per["code"] < 60_000 + 200_000


def test_math_rendering_worked_steps():
    assert math_problems.arithmetic_steps("-9 + 5 - -1 * -4 + -2 * 2") == [
        "-9 + 5 = -4",
        "-1 * -4 = 4",
        "-4 - 4 = -8",
        "-2 * 2 = -4",
        "-8 + -4 = -12",
    ]
    g, steps = math_problems.euclid_steps(782, 804)
    assert g == 2 and steps[0] == "804 = 1 × 782 + 22" and steps[-1] == "10 = 5 × 2 + 0"
    factors, _ = math_problems.factor_steps(966)
    assert factors == [2, 3, 7, 23]
    docs = list(math_problems.generate("gcd", 5, seed=0))
    assert [i for i, _ in docs] == [0, 1, 2, 3, 4]
    for _, text in docs:
        assert text.startswith("Problem: Find the Greatest Common Divisor")
        answer = int(text.rsplit("Answer: ", 1)[1])
        assert f"= {answer}\n" in text  # the worked steps reach the answer
    assert docs == list(math_problems.generate("gcd", 5, seed=0))
    assert docs != list(math_problems.generate("gcd", 5, seed=1))


@pytest.mark.parametrize("name", sorted(math_problems.RENDERERS))
def test_every_math_renderer_reaches_the_generator_answer(name):
    for _, text in math_problems.generate(name, 20, seed=3):
        solution, answer = text.split("\n\nSolution:\n")[1].rsplit("\n\nAnswer: ", 1)
        assert solution.strip() and answer.strip()
        if name in ("basic_arithmetic", "chain_sum", "products", "gcd", "lcm", "simple_equations"):
            assert answer in solution


def test_bad_corpus_inputs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="missing.txt: cannot read corpus file"):
        collect(CorpusConfig(shakespeare=False, bible=False, stdlib=False, math_problems={}, local_files={"text": [str(tmp_path / "missing.txt")]}))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not UTF-8"):
        collect(CorpusConfig(shakespeare=False, bible=False, stdlib=False, math_problems={}, local_files={"text": [str(latin)]}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        collect(CorpusConfig(shakespeare=False, bible=False, stdlib=False, math_problems={}, local_files={"math": [str(bad)]}))
    with pytest.raises(DataError, match="'poetry' is not one of"):
        collect(CorpusConfig(shakespeare=False, bible=False, stdlib=False, math_problems={}, local_files={"poetry": [str(bad)]}))
    with pytest.raises(DataError, match="no renderer"):
        collect(CorpusConfig(shakespeare=False, bible=False, stdlib=False, math_problems={"sudoku": 3}))
    with pytest.raises(DataError, match="unknown corpus preset"):
        get_preset("huge")
    with pytest.raises(DataError, match="unknown field"):
        CorpusConfig.from_dict({"name": "x", "wikipedia": True})


def test_local_files_join_their_domain(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("alpha\n\nbeta")
    jl = tmp_path / "wiki.jsonl"
    jl.write_text(json.dumps({"id": "Paris", "text": "Paris is the capital of France."}) + "\n")
    cfg = CorpusConfig(shakespeare=False, bible=False, stdlib=False, math_problems={}, local_files={"text": [str(txt), str(jl)]}, val_fraction=0.0)
    groups = collect(cfg)
    keys = sorted(d.key for d in groups[("train", "text")])
    assert keys == ["text/local:notes.txt/#0", "text/local:wiki.jsonl/Paris"]


def test_evals_excerpts_are_used_only_when_installed(tmp_path, monkeypatch):
    from openk2.data.corpus import uses_evals

    bare = CorpusConfig(shakespeare=False, bible=False, stdlib=False, math_problems={}, val_fraction=0.0)
    if not uses_evals(bare):  # not installed: auto mode skips it, True asks for it
        assert collect(bare) == {}
        with pytest.raises(DataError, match="pip install evals"):
            collect(bare.replace(evals_excerpts=True))
    data = tmp_path / "site" / "evals" / "registry" / "data" / "schelling_point"
    data.mkdir(parents=True)
    (tmp_path / "site" / "evals" / "__init__.py").write_text("")
    (data / "wikipedia_5.jsonl").write_text(json.dumps({"0": "Paris is a city.", "1": "city. Paris is a"}) + "\n")
    (data / "owt_5.jsonl").write_text(json.dumps({"0": "Some web text."}) + "\n" + json.dumps({"0": "More."}) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import importlib

    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "evals", raising=False)
    assert uses_evals(bare) and not uses_evals(bare.replace(evals_excerpts=False))
    docs = collect(bare)[("train", "text")]
    assert sorted((d.source, d.id, d.text) for d in docs) == [
        ("openwebtext", "1", "Some web text."),
        ("openwebtext", "2", "More."),
        ("wikipedia", "1", "Paris is a city."),
    ]
