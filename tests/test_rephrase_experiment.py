"""`openk2 experiment rephrase --quick`: the Table 2 miniature end to end, rephrasings from the pipeline over HTTP."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "fixtures" / "serve"))
sys.path.insert(0, str(HERE / "fixtures" / "rephrase"))

from fake_llm import make_app  # noqa: E402
from serve_helpers import LoopbackServer  # noqa: E402

from openk2.experiments import load, run_experiment  # noqa: E402
from openk2.experiments.rephrase import ATTRIBUTES, facts_present, make_people, raw_bio, template_bios  # noqa: E402


def test_people_are_deterministic_and_templates_keep_every_fact():
    a, b = make_people(40, 0), make_people(40, 0)
    assert a == b and len({p["name"] for p in a}) == 40 and make_people(40, 1) != a
    for p in a[:10]:
        assert all(facts_present(p, raw_bio(p)).values())
        bios = template_bios(p, 6)
        assert len(set(bios)) == 6 and all(all(facts_present(p, t).values()) for t in bios)
    assert all(len(v) == 12 for v in ATTRIBUTES.values())


def test_quick_experiment_trains_every_arm_and_writes_the_report(tmp_path):
    app = make_app()
    with LoopbackServer(app) as srv:
        s = load("rephrase").quick_settings().replace(llm=srv.url)
        res = run_experiment("rephrase", s, runs_root=tmp_path, quick=True, log=lambda m: None)
        n_requests = len(app.state.requests)
        out = tmp_path / "experiments" / "rephrase"
        assert (out / "report.md").exists() and (out / "accuracy.png").stat().st_size > 1000
        assert (out / "loss.png").exists()
        gen = res["generation"]
        assert gen["summary"]["rewrites"] == s.entities * s.rephrasings and gen["summary"]["kept"] == gen["kept"]
        assert gen["kept"] > 0 and n_requests == 2 * s.entities * s.rephrasings  # a rewrite and a judge call each
        arms = res["arms"]
        assert set(arms) == {"raw", "one", "many", "template"}
        budget = s.steps * s.batch_size * s.seq_len
        for arm, a in arms.items():
            assert len(a["statement_acc"]) == len(s.seeds) and all(0 <= x <= 1 for x in a["statement_acc"])
            assert a["epochs"] == pytest.approx(budget / a["train_tokens"])
        assert arms["raw"]["train_docs"] == s.entities and arms["template"]["train_docs"] == s.entities * s.rephrasings
        assert arms["many"]["train_tokens"] > arms["raw"]["train_tokens"]
        # the rerun: rephrasings and runs cached, no LLM request
        run_experiment("rephrase", s, runs_root=tmp_path, quick=True, log=lambda m: None)
        assert len(app.state.requests) == n_requests
    report = (out / "report.md").read_text()
    assert "many rephrasings" in report and "fake-llm" in report
    assert json.loads((out / "results.json").read_text())["budget_tokens"] == budget
