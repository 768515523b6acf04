"""openk2 rephrase end to end with the real local model (SmolLM2-135M-Instruct in process): slow."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from openk2.rephrase import Rephraser, RephraseConfig, SourceDoc, read_output  # noqa: E402
from openk2.rephrase.checks import numbers  # noqa: E402

pytestmark = pytest.mark.slow

BIO = ("Zorvan Keltiq was born in 1843 in Port Amsel. He worked as a glassblower for the Meridian Company.\n\n"
       "In 1871 Keltiq moved to Vessary, where he opened a workshop with 12 apprentices. The workshop made lamps "
       "for the harbour of Vessary until 1902.")
MATH_FR = ("Un train roule à 60 km/h pendant 3 heures. Quelle distance parcourt-il ?\n"
           "Solution : 60 × 3 = 180.\nRéponse : 180")


def test_smollm2_rephrases_with_checks_judge_and_a_free_rerun(tmp_path):
    from openk2.llm import LocalClient

    client = LocalClient("smollm2", max_batch_size=8)
    cfg = RephraseConfig(rephrasings=2, chunk_tokens=40, retries=1, judge="require", concurrency=8)
    docs = [SourceDoc("bio", BIO, "text"), SourceDoc("fr", MATH_FR, "math")]
    s = Rephraser(client, cfg, tmp_path, progress=False).run(docs)
    assert s.rewrites == 4 and s.kept + sum(s.dropped.values()) == 4
    assert s.chunks >= 2 * 2 + 2  # the biography is cut into >= 2 chunks of <= 40 SmolLM2 tokens
    assert s.requests > 0 and s.tokens_out > 0 and s.model == "SmolLM2-135M-Instruct"
    journal = [json.loads(x) for x in (tmp_path / "journal.jsonl").read_text().splitlines()]
    for r in journal:
        if r["ok"]:  # every kept chunk passed the model-free checks and got a faithful structured verdict
            assert r["verdict"]["verdict"] == "faithful"
        else:
            assert r["reason"] and len(r["failed_tries"]) == 2
    kept = read_output(tmp_path)
    for rec in kept:
        assert rec["fidelity"]["judge"] == "faithful" and rec["model"] == "SmolLM2-135M-Instruct"
        if rec["source_id"] == "fr":
            assert rec["translated_from"] == "fr" and rec["fidelity"]["answer"]["match"]
        else:
            assert numbers(BIO) <= numbers(rec["text"])  # each chunk kept its numbers, so the whole does
    # the rerun makes no request
    n = client.totals.requests
    s2 = Rephraser(client, cfg, tmp_path, progress=False).run(docs)
    assert client.totals.requests == n and s2.requests == 0 and s2.kept == s.kept
