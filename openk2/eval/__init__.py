"""`openk2 eval`: the same measurements for any model (K2 report section 4), offline from packaged data.

    openk2 eval --suite humaneval --model smollm2 --limit 20
    openk2 eval --suite bfcl,math --model http://127.0.0.1:8000 --concurrency 8 --out runs/eval

| module | what it does |
|---|---|
| ``core``      | :class:`Item`, :class:`Suite`, :func:`run_suite` (JSONL, resume, concurrency, summaries, plot) |
| ``stats``     | the unbiased pass@k estimator |
| ``humaneval`` | HumanEval in the sandbox (pass@1, pass@k) |
| ``math``      | reasoning-gym gsm_symbolic + basic_arithmetic, checked with math-verify |
| ``bfcl``      | BFCL single-turn with bfcl-eval's AST checker |
| ``ifeval``    | IFEval-style instruction following, each constraint checked by code |

See docs/eval.md.
"""

from __future__ import annotations

import importlib

from openk2.eval.core import EvalError, Item, Suite, SuiteResult, run_suite

# suite name -> (module, class)
SUITES: dict[str, tuple[str, str]] = {
    "humaneval": ("openk2.eval.humaneval", "HumanEval"),
    "math": ("openk2.eval.math", "Math"),
    "bfcl": ("openk2.eval.bfcl", "BFCL"),
    "ifeval": ("openk2.eval.ifeval", "IFEval"),
}
DEFAULT_SUITES = ("humaneval", "math", "bfcl", "ifeval")


def get_suite(name: str, **kwargs) -> Suite:
    if name not in SUITES:
        raise EvalError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    mod, cls = SUITES[name]
    return getattr(importlib.import_module(mod), cls)(**kwargs)


__all__ = ["DEFAULT_SUITES", "SUITES", "EvalError", "Item", "Suite", "SuiteResult", "get_suite", "run_suite"]
