"""openk2 rephrase: styles, chunking, fidelity checks, language detection, math answers, and the pipeline
against an OpenAI-compatible fake over real loopback HTTP (resume, rerun cost, bad input, kill and resume)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "fixtures" / "serve"))
sys.path.insert(0, str(HERE / "fixtures" / "rephrase"))

from fake_llm import make_app  # noqa: E402
from serve_helpers import TOKENIZER_JSON, LoopbackServer  # noqa: E402

from openk2.errors import DataError  # noqa: E402
from openk2.llm import OpenAICompatClient  # noqa: E402
from openk2.rephrase import (  # noqa: E402
    KNOWLEDGE_STYLES,
    CheckConfig,
    Rephraser,
    RephraseConfig,
    SourceDoc,
    check_rewrite,
    corpus_config,
    detect_language,
    read_inputs,
    read_output,
    split_document,
    token_counter,
)
from openk2.rephrase.checks import named_entities, numbers  # noqa: E402
from openk2.rephrase.chunking import tail_tokens  # noqa: E402
from openk2.rephrase.mathcheck import answers_match, final_answer  # noqa: E402
from openk2.rephrase.styles import choose_styles, get_styles  # noqa: E402

COUNT = token_counter(str(TOKENIZER_JSON))  # a real BPE tokenizer (the serve tests' fixture)

BIO = ("Zorvan Keltiq was born in 1843 in Port Amsel. He worked as a glassblower for the Meridian Company "
       "and retired on March 3, 1901. His workshop made 1,200 lamps a year.")
LONG = "\n\n".join(
    f"Section {i}. The river Olmanda floods its valley every {i + 3} years, and the town of Vessary keeps a "
    f"record of each flood since {1700 + 10 * i}. The records of Vessary list {20 + i} bridges that the water "
    f"destroyed. Engineers from Caldor rebuilt them with stone from the Brenna quarry." for i in range(8))
MATH_EN = "Tom has 12 apples and buys 30 more. How many apples does he have?\n12 + 30 = 42\n#### 42"
MATH_FR = ("Un train roule à 60 km/h pendant 3 heures. Quelle est la distance parcourue par le train ?\n"
           "Solution : la distance est 60 × 3 = 180 km.\nRéponse : 180")
MATH_DE = ("Eine Klasse hat 24 Schüler und die Hälfte davon sind Mädchen. Wie viele Jungen sind in der Klasse?\n"
           "Lösung: 24 / 2 = 12, also sind es 12 Jungen.\nAntwort: 12")
MATH_ES = ("Una tienda vende 15 cajas con 8 lápices cada una. ¿Cuántos lápices vende la tienda en total?\n"
           "Solución: 15 × 8 = 120.\nRespuesta: 120")


# ------------------------------------------------------------------------------------------------ units
def test_the_style_library_has_eight_plus_styles_and_rewrites_of_a_document_differ():
    styles = get_styles(None, "knowledge")
    assert len(styles) >= 8 and len(KNOWLEDGE_STYLES) >= 8
    chosen = choose_styles("doc-1", 8, styles)
    assert len({s.name for s in chosen}) == 8  # 8 rewrites of one document: 8 different styles
    assert [s.name for s in choose_styles("doc-1", 3, styles)] == [s.name for s in chosen[:3]]  # deterministic
    firsts = {choose_styles(f"doc-{i}", 1, styles)[0].name for i in range(40)}
    assert len(firsts) >= 5  # documents do not all start with the same style


def test_chunks_stay_under_the_token_budget_and_cover_the_document():
    chunks = split_document(LONG, 100, COUNT)
    assert len(chunks) >= 4
    assert all(c.tokens <= 100 for c in chunks)
    assert " ".join(c.text for c in chunks).split() == LONG.split()  # nothing lost, nothing repeated
    assert all(c.text.rstrip().endswith(".") for c in chunks)  # cut at sentence ends
    one_sentence = " ".join(["word"] * 300)  # no sentence boundary at all: cut between words
    parts = split_document(one_sentence, 40, COUNT)
    assert all(p.tokens <= 40 for p in parts) and sum(len(p.text.split()) for p in parts) == 300
    assert split_document("   \n\n ", 40, COUNT) == []
    tail = tail_tokens(LONG, 20, COUNT)
    assert 0 < COUNT(tail) <= 20 and LONG.endswith(tail)


def test_model_free_checks_catch_lost_numbers_names_copies_and_bad_lengths():
    cfg = CheckConfig()
    good = ("Born in Port Amsel in 1843, Zorvan Keltiq blew glass for the Meridian Company; he left the trade on "
            "3 March 1901, when his shop turned out 1200 lamps every year.")
    assert check_rewrite(BIO, good, cfg).ok
    assert numbers(BIO) >= {"1843", "1901", "3", "1200"}
    assert {"Port Amsel", "Meridian Company", "Keltiq"} <= named_entities(BIO)
    r = check_rewrite(BIO, good.replace("1843", "1834"), cfg)
    assert not r.ok and r.reasons == ["missing_numbers"] and r.details["missing_numbers"] == ["1843"]
    r = check_rewrite(BIO, good.replace("March", "May"), cfg)
    assert "missing_numbers" in r.reasons and "March" in r.details["missing_numbers"]  # dates: month names too
    r = check_rewrite(BIO, good.replace("Port Amsel", "the harbour").replace("Meridian Company", "a firm"), cfg)
    assert "missing_entities" in r.reasons and r.details["entity_recall"] < 0.8
    r = check_rewrite(BIO, BIO, cfg)
    assert r.reasons == ["near_copy"] and r.details["copy_fraction"] == 1.0
    r = check_rewrite(BIO, "Keltiq, 1843, 1901, 3 March, 1200, Port Amsel, Meridian Company.", cfg)
    assert r.reasons == ["length_ratio"]
    assert check_rewrite(BIO, "  ", cfg).reasons == ["empty_rewrite"]
    # a translation keeps the numbers; names and month words may change
    assert check_rewrite(MATH_FR, "A train runs at 60 km/h for 3 hours: 60 x 3 = 180 km. Answer: 180", cfg,
                         translated=True).ok


@pytest.mark.parametrize("text,lang", [
    (MATH_FR, "fr"), (MATH_DE, "de"), (MATH_ES, "es"), (MATH_EN, "en"), (BIO, "en"),
    ("Поезд едет со скоростью 60 км/ч в течение 3 часов. Какое расстояние он проедет? Ответ: 180", "ru"),
    ("一列火车以每小时60公里的速度行驶3小时。它行驶了多远？答案：180", "zh"),
    ("電車は時速60キロで3時間走ります。どれくらいの距離を走りますか。答え：180", "ja"),
    ("Ένα τρένο κινείται με 60 χιλιόμετρα την ώρα για 3 ώρες.", "el"),
    ("12 + 30 = 42", "und"),
])
def test_language_detection(text, lang):
    assert detect_language(text)[0] == lang


def test_final_answers_and_math_verify():
    assert final_answer(MATH_EN) == "42"
    assert final_answer(MATH_FR) == "180"
    assert final_answer(MATH_DE) == "12"
    assert final_answer("so the total is \\boxed{\\frac{3}{4}} of the cake") == "\\frac{3}{4}"
    assert final_answer("Answer: 1,200 apples") == "1,200"
    assert final_answer("no numbers here") is None
    ok, how = answers_match("\\frac{3}{4}", "0.75")
    assert ok and how == "math-verify"  # equal values, different forms
    assert answers_match("1,200", "1200")[0]
    assert not answers_match("42", "43")[0]


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture()
def fake():
    app = make_app()
    with LoopbackServer(app) as srv:
        yield app, srv


def client_for(srv, **kw):
    return OpenAICompatClient(srv.url, model="fake-llm", max_retries=kw.pop("max_retries", 0), **kw)


def run(srv, out, docs, failures=(), **cfg):
    client = client_for(srv, max_concurrency=8)
    cfg.setdefault("chunk_tokens", 100)
    pipe = Rephraser(client, RephraseConfig(**cfg), out, count_tokens=COUNT, domain="text-rephrased", progress=False)
    return pipe.run(docs, failures), client


def test_rewrites_chunk_by_chunk_with_provenance_and_a_rerun_costs_nothing(fake, tmp_path):
    app, srv = fake
    docs = [SourceDoc("bio", BIO, "text", "test"), SourceDoc("long", LONG, "text", "test")]
    s, _ = run(srv, tmp_path / "out", docs, rephrasings=3)
    n_long = len(split_document(LONG, 100, COUNT))
    assert n_long >= 5
    assert s.documents == 2 and s.rewrites == 6 and s.chunks == 3 * (1 + n_long)
    assert s.kept == 6 and s.dropped == {} and s.attempt_failures == {}
    assert s.requests == len(app.state.requests) == 2 * s.chunks  # one rewrite + one judge call per chunk
    assert s.tokens_in > 0 and s.tokens_out > 0
    recs = read_output(tmp_path / "out")
    assert len(recs) == 6
    by_doc = {}
    for r in recs:
        by_doc.setdefault(r["source_id"], []).append(r)
        assert r["domain"] == "text-rephrased" and r["source_domain"] == "text" and r["model"] == "fake-llm"
        assert r["fidelity"]["judge"] == "faithful" and r["fidelity"]["checks"] == "passed"
    for rs in by_doc.values():
        assert sorted(r["rephrasing_index"] for r in rs) == [0, 1, 2]
        assert len({r["style"] for r in rs}) == 3  # repeats of one document differ in style
    long0 = next(r for r in by_doc["long"] if r["rephrasing_index"] == 0)
    assert long0["chunks"] == n_long
    for i in range(8):  # every section of the long document made it into its rewrite
        assert f"Section {i}." in long0["text"] and str(1700 + 10 * i) in long0["text"]
    # chunk i > 0 was asked with the tail of the rewrite so far
    rewrites = [b for b in app.state.requests if not b.get("response_format")]
    cont = [b for b in rewrites if "Your rewrite so far ends with" in b["messages"][-1]["content"]]
    assert len(cont) == 3 * (n_long - 1)
    assert all("indeed" in b["messages"][-1]["content"].split("Continue it")[0] for b in cont)
    # the rerun: every unit is in the journal, so no request at all
    before = len(app.state.requests)
    s2, _ = run(srv, tmp_path / "out", docs, rephrasings=3)
    assert len(app.state.requests) == before and s2.requests == 0
    assert s2.chunks_done_before == s.chunks and s2.kept == 6
    assert read_output(tmp_path / "out") == recs
    # an edited prompt library makes the finished units stale: the rerun redoes every chunk
    import openk2.rephrase.pipeline as pipeline_mod

    real = pipeline_mod._prompt_library_digest
    pipeline_mod._prompt_library_digest = lambda: real() + "-edited"
    try:
        s3, _ = run(srv, tmp_path / "out", docs, rephrasings=3)
    finally:
        pipeline_mod._prompt_library_digest = real
    assert s3.requests == 2 * s.chunks and s3.chunks_done_before == 0

    # the output is a corpus domain the mixture can weight
    from openk2.data.corpus import collect

    cfg = corpus_config({"text-rephrased": tmp_path / "out"}, base="tiny").replace(
        shakespeare=False, bible=False, stdlib=False, math_problems={}, val_fraction=0.0)
    groups = collect(cfg)
    assert len(groups[("train", "text-rephrased")]) == 6


def test_failed_checks_are_retried_then_dropped_with_reasons(fake, tmp_path):
    app, srv = fake
    docs = [SourceDoc("ok", BIO), SourceDoc("num", "DROPNUM " + BIO), SourceDoc("judge", "UNFAITHFUL " + BIO),
            SourceDoc("long-bad", LONG + "\n\nThe last part is wrong. DROPNUM 1999.")]
    s, _ = run(srv, tmp_path / "out", docs, rephrasings=1, retries=2)
    assert s.kept == 1
    assert s.dropped == {"missing_numbers": 2, "judge_unfaithful": 1}
    assert s.attempt_failures["missing_numbers"] == 6 and s.attempt_failures["judge_unfaithful"] == 3
    dropped = {d["source_id"]: d for d in map(json.loads, (tmp_path / "out" / "dropped.jsonl").read_text().splitlines())}
    assert dropped["num"]["failed_tries"] == ["missing_numbers"] * 3
    bad = dropped["long-bad"]
    assert bad["chunk"] == bad["chunks"] - 1  # the last chunk failed: the whole rewrite is dropped, not cut short
    assert read_output(tmp_path / "out")[0]["source_id"] == "ok"
    # tries use fresh sampling seeds
    seeds = [b["seed"] for b in app.state.requests
             if "DROPNUM Zorvan" in b["messages"][-1]["content"] and not b.get("response_format")]
    assert len(seeds) == 3 and len(set(seeds)) == 3
    # judge="record" keeps the unfaithful one and says so
    s2, _ = run(srv, tmp_path / "rec", [SourceDoc("judge", "UNFAITHFUL " + BIO)], rephrasings=1, judge="record")
    assert s2.kept == 1 and s2.judge == {"unfaithful": 1, "faithful": 1}  # chunk 0 unfaithful, chunk 1 faithful
    assert read_output(tmp_path / "rec")[0]["fidelity"]["judge"] == "mixed"


def test_bad_input_and_a_failing_endpoint_are_recorded(fake, tmp_path):
    app, srv = fake
    good = tmp_path / "in" / "good.jsonl"
    good.parent.mkdir()
    good.write_text("\n".join([json.dumps({"id": "a", "text": BIO}), "{not json", json.dumps({"id": "b"}),
                               json.dumps({"id": "empty", "text": "   "}), json.dumps({"id": "c", "text": 7}),
                               json.dumps({"id": "err", "text": "HTTP500 " + BIO}),
                               json.dumps({"id": "garbage", "text": "GARBAGE " + BIO}),
                               json.dumps({"id": "badjudge", "text": "BADJUDGE " + BIO})]) + "\n")
    (tmp_path / "in" / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        read_inputs([tmp_path / "missing.jsonl"])
    docs, failures = read_inputs([tmp_path / "in"])
    assert [d.id for d in docs] == ["a", "empty", "err", "garbage", "badjudge"]
    assert sorted(f["reason"] for f in failures) == ["bad_input", "bad_input", "bad_input", "unreadable_file"]
    s, client = run(srv, tmp_path / "out", docs, failures, rephrasings=1, retries=1)
    assert s.documents == 9 and s.documents_failed == 5 and s.kept == 1
    assert s.dropped == {"bad_input": 3, "unreadable_file": 1, "empty_document": 1, "llm_error": 2, "judge_error": 1}
    dropped = [json.loads(x) for x in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    err = next(d for d in dropped if d["source_id"] == "err")
    assert "HTTP 500" in err["details"]["error"] and err["failed_tries"] == ["llm_error", "llm_error"]
    garbage = next(d for d in dropped if d["source_id"] == "garbage")
    assert "not JSON" in garbage["details"]["error"]
    assert client.totals.failures == 4  # 2 tries x 2 documents, each counted
    assert read_output(tmp_path / "out")[0]["source_id"] == "a"


def test_math_becomes_learning_notes_in_english_with_the_same_answer(fake, tmp_path):
    app, srv = fake
    docs = [SourceDoc("en", MATH_EN, "math"), SourceDoc("fr", MATH_FR, "math"), SourceDoc("de", MATH_DE, "math"),
            SourceDoc("es", MATH_ES, "math"), SourceDoc("wrong", MATH_EN + "\nWRONGANSWER", "math")]
    s, _ = run(srv, tmp_path / "out", docs, rephrasings=1, retries=1, chunk_tokens=256)
    assert s.kept == 4 and s.dropped == {"answer_mismatch": 1} and s.translated == 3
    recs = {r["source_id"]: r for r in read_output(tmp_path / "out")}
    assert recs["fr"]["translated_from"] == "fr" and recs["de"]["translated_from"] == "de" and recs["en"]["translated_from"] is None
    for sid, ans in (("en", "42"), ("fr", "180"), ("de", "12"), ("es", "120")):
        r = recs[sid]
        assert r["kind"] == "math" and r["style"].startswith("learning-notes")
        assert r["fidelity"]["answer"]["match"] and r["fidelity"]["answer"]["source"] == ans
        assert "Problem:" in r["text"] and "Answer:" in r["text"] and detect_language(r["text"])[0] == "en"
    sys_prompts = [b["messages"][0]["content"] for b in app.state.requests if not b.get("response_format")]
    assert sum("written in French: write the notes in English" in p for p in sys_prompts) == 1
    assert sum("written in German" in p for p in sys_prompts) == 1


def test_a_killed_run_resumes_without_redoing_finished_chunks(tmp_path):
    """The CLI in a subprocess against a slow fake; killed mid-run; the rerun asks only for the chunks left."""
    app = make_app(delay=0.1)
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"id": f"d{i}", "text": LONG.replace("Vessary", f"Vessary{i}")}) + "\n"
                           for i in range(2)))
    out = tmp_path / "out"
    with LoopbackServer(app) as srv:
        cmd = [sys.executable, "-m", "openk2.cli", "rephrase", str(inp), "--out", str(out), "--llm", srv.url,
               "--tokenizer", str(TOKENIZER_JSON), "--chunk-tokens", "100", "--rephrasings", "1", "--concurrency", "2",
               "--no-cache", "--no-progress"]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        journal = out / "journal.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if journal.exists() and len(journal.read_text().splitlines()) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = len(journal.read_text().splitlines())
        total_chunks = 2 * len(split_document(LONG, 100, COUNT))
        assert 4 <= done < total_chunks
        first_run = len(app.state.requests)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        second_run = len(app.state.requests) - first_run
        # two requests (rewrite + judge) per chunk not in the journal; at most one wave's rewrite calls of the
        # killed run were answered but not journaled, and those are asked again (they are not finished work)
        assert second_run == 2 * (total_chunks - done)
        assert "kept 2, dropped 0" in res.stdout and f"({done} already done)" in res.stdout
        assert len(read_output(out)) == 2


def test_cli_errors_are_one_line(tmp_path):
    from openk2.cli import main

    assert main(["rephrase", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert main(["rephrase", "x.jsonl", "--rephrasings", "0"]) == 2
    assert main(["rephrase", "--list-styles"]) == 0
