"""BFCL's data as shipped by PyPI ``bfcl-eval`` (installed ``--no-deps``): the one reader of its question and
possible-answer files and of its type names, shared by SFT (gold single calls as training targets), evaluation
(the AST-checked suite) and synthesis (the executable multi-turn APIs' tool docs).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from openk2.errors import DataError

INSTALL = "pip install --no-deps bfcl-eval==2026.3.23"

# BFCL writes Python type names; "any" (no type) is left unconstrained
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "list": "array", "int": "integer",
          "bool": "boolean", "str": "string", "String": "string", "any": None, "Any": None}


def bfcl_dir() -> Path:
    """The package's data directory (``bfcl_eval/data``); a DataError naming the install command if absent."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"BFCL data needs the bfcl-eval package: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def bfcl_schema(schema: Any) -> Any:
    """A BFCL parameter schema as JSON Schema: Python type names mapped (dict -> object, float -> number, tuple
    -> array, any -> no type), BFCL's ``optional`` flags and documentation-only ``default`` values dropped, an
    array without ``items`` given ``items: {}``."""
    if isinstance(schema, list):
        return [bfcl_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k == "type" and isinstance(v, str):
            t = _TYPES.get(v, v)
            if t is not None:
                out[k] = t
        elif k == "properties" and isinstance(v, dict):
            out[k] = {name: bfcl_schema(s) for name, s in v.items()}
        elif k in ("items", "additionalProperties"):
            out[k] = bfcl_schema(v)
        elif k in ("optional", "default"):  # defaults are documentation, often not of the declared type
            continue
        else:
            out[k] = v
    if out.get("type") == "array" and "items" not in out:
        out["items"] = {}
    return out


def _resolve(value: Any) -> Any:
    """A possible value with nested possibilities resolved: a dict whose fields are lists of possible values
    takes the first of each ("" first marks a field that may be left out)."""
    if isinstance(value, dict):
        if all(isinstance(v, list) for v in value.values()):
            return {k: _resolve(v[0]) for k, v in value.items() if v and v[0] != ""}
        return value
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    return value


def gold_arguments(params: dict[str, list]) -> dict[str, Any]:
    """One call's arguments from BFCL's possible answers: the first possible value of every parameter; one
    whose first possibility is "" (may be omitted) is left out."""
    return {name: _resolve(values[0]) for name, values in params.items() if values and values[0] != ""}


def read_category(category: str, answers: bool = True) -> Iterator[tuple[dict[str, Any], list | None]]:
    """(question record, ground truth or None) for every item of ``BFCL_v4_<category>.json``; the ground truth
    is the list of possible calls ``[{name: {param: [possible values]}}]`` (``answers=False``: always None, for
    categories without an answer file such as irrelevance)."""
    d = bfcl_dir()
    qpath, apath = d / f"BFCL_v4_{category}.json", d / "possible_answer" / f"BFCL_v4_{category}.json"
    if not qpath.is_file() or (answers and not apath.is_file()):
        raise DataError(f"bfcl-eval has no category {category!r} ({qpath} or {apath} is missing)")
    truth: dict[str, Any] = {}
    if answers:
        for line in apath.read_text(encoding="utf-8").splitlines():
            if line.strip():
                a = json.loads(line)
                truth[a["id"]] = a["ground_truth"]
    for line in qpath.read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = json.loads(line)
            yield q, truth.get(q["id"])


def function_tool(fn: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """A BFCL function doc as an OpenAI function tool (``name`` overrides the doc's, e.g. a wire-safe name)."""
    return {"type": "function", "function": {"name": name or fn["name"], "description": fn.get("description", ""),
                                             "parameters": bfcl_schema(fn.get("parameters") or
                                                                       {"type": "dict", "properties": {}})}}
