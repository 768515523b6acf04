"""BFCL single-turn (PyPI `bfcl-eval`): simple, multiple, parallel, parallel_multiple, irrelevance.

The questions and possible answers are the package's own files (read with :func:`openk2.data.bfcl.read_category`);
the functions are offered as OpenAI tools (BFCL's Python type names mapped to JSON Schema by
:func:`openk2.data.bfcl.bfcl_schema`; a dotted name such as ``math.factorial`` is sent as ``math_factorial``,
since OpenAI-style endpoints allow only ``[a-zA-Z0-9_-]``, and mapped back). The reply's tool calls are
judged by bfcl-eval's own AST checker (``bfcl_eval.eval_checker.ast_eval.ast_checker``) against the possible
answers. Irrelevance items pass when the model calls no function, as in BFCL.
"""

from __future__ import annotations

import json
import sys
import types
from typing import Any

from openk2.errors import DataError
from openk2.eval.core import EvalError, Item, Suite

CATEGORIES = {"simple": "simple_python", "multiple": "multiple", "parallel": "parallel",
              "parallel_multiple": "parallel_multiple", "irrelevance": "irrelevance"}


def _checker():
    """bfcl-eval's ast_checker. The package (installed --no-deps) imports every hosted model's SDK through
    ``bfcl_eval.constants.model_config``; the checker reads only ``underscore_to_dot`` from it, so when that
    import fails it is given a table where no model renames dots (names are mapped back before checking)."""
    try:
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
        from bfcl_eval.constants.enums import Language
        return ast_checker, Language
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("bfcl_eval"):
            raise EvalError("the bfcl suite needs bfcl-eval: pip install --no-deps bfcl-eval==2026.3.23") from None
    name = "bfcl_eval.constants.model_config"
    for mod in [m for m in sys.modules if m.startswith("bfcl_eval.eval_checker.ast_eval.ast_checker")]:
        del sys.modules[mod]
    cfg = types.ModuleType(name)

    class _NoRename(dict):
        def __missing__(self, key):
            return types.SimpleNamespace(underscore_to_dot=False)

    cfg.MODEL_CONFIG_MAPPING = _NoRename()
    saved = sys.modules.get(name)
    sys.modules[name] = cfg
    try:
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
        from bfcl_eval.constants.enums import Language
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved
    return ast_checker, Language


def wire_name(name: str) -> str:
    return name.replace(".", "_")


def model_output(reply: dict[str, Any], names: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
    """The reply's tool calls as BFCL's decoded form ``[{name: {arg: value}}]`` (names mapped back), and
    why not ("" when they decode)."""
    out = []
    for c in reply.get("tool_calls") or []:
        fn = c.get("function") or {}
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                return [], f"arguments of {fn.get('name')!r} are not JSON ({e.msg})"
        if not isinstance(args, dict):
            return [], f"arguments of {fn.get('name')!r} are not an object"
        out.append({names.get(fn.get("name", ""), fn.get("name", "")): args})
    return out, ""


class BFCL(Suite):
    name = "bfcl"
    max_tokens = 384
    description = ("BFCL single-turn (simple, multiple, parallel, parallel_multiple, irrelevance), "
                   "bfcl-eval's AST checker")

    def __init__(self, categories: tuple[str, ...] = tuple(CATEGORIES)) -> None:
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown:
            raise EvalError(f"unknown BFCL categories {unknown}; known: {', '.join(CATEGORIES)}")
        self.categories = categories

    def load(self) -> list[Item]:
        from openk2.data.bfcl import function_tool, read_category

        out = []
        for cat in self.categories:
            f = CATEGORIES[cat]
            try:
                rows = list(read_category(f, answers=cat != "irrelevance"))
            except DataError as e:
                raise EvalError(str(e)) from e
            for q, truth in rows:
                tools = [function_tool(fn, wire_name(fn["name"])) for fn in q["function"]]
                gold = {"functions": q["function"], "possible_answer": truth}
                out.append(Item(q["id"], [dict(m) for m in q["question"][0]], gold=gold, tools=tools, category=cat))
        return out

    async def score(self, item: Item, reply: dict[str, Any]) -> dict[str, Any]:
        names = {wire_name(f["name"]): f["name"] for f in item.gold["functions"]}
        calls, why = model_output(reply, names)
        if item.category == "irrelevance":
            return {"passed": not calls, "calls": len(calls), **({"error": why} if why else {})}
        if why or not calls:
            return {"passed": False, "error": why or "no function call", "error_type": "decode"}
        ast_checker, Language = _checker()
        res = ast_checker(item.gold["functions"], calls, item.gold["possible_answer"], Language.PYTHON,
                          CATEGORIES[item.category], "openk2")
        v = {"passed": bool(res.get("valid")), "calls": len(calls)}
        if not v["passed"]:
            v["error"] = "; ".join(map(str, res.get("error", [])))[:500]
            v["error_type"] = res.get("error_type", "")
        return v


def gold_reply(item: Item) -> dict[str, Any]:
    """A reply holding the first possible answer of every call (irrelevance: no call)."""
    from openk2.data.bfcl import gold_arguments

    calls = []
    for call in item.gold["possible_answer"] or []:
        (name, params), = call.items()
        calls.append({"type": "function", "function": {"name": wire_name(name),
                                                       "arguments": json.dumps(gold_arguments(params))}})
    return {"content": "" if calls else "None of the functions fit.", "tool_calls": calls}
