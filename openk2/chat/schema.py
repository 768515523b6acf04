"""JSON schemas in a chat: tool parameters, OpenAI ``response_format``, and checking a reply against them.

One place for what the server (request validation, constrained decoding), the
LLM clients (validate-and-retry) and the tool-call parser all need.
``jsonschema`` (a core dependency) is imported only when a check runs, so
importing the chat format stays cheap.
"""

from __future__ import annotations

import json
from typing import Any


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Violations of a JSON schema, as short ``path: message`` strings (empty when valid)."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    msgs = []
    for err in sorted(validator.iter_errors(instance), key=lambda e: list(e.path)):
        where = "/".join(str(p) for p in err.path) or "<root>"
        msgs.append(f"{where}: {err.message}")
    return msgs


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` is not a valid JSON schema, or None (also None when jsonschema is not installed)."""
    try:
        import jsonschema
    except ImportError:
        return None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return e.message
    return None


def response_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema an OpenAI ``response_format`` demands: None for ``text`` (or no
    response_format), ``{"type": "object"}`` for ``json_object``, the schema of ``json_schema``.

    Raises ValueError for a malformed response_format or an invalid schema.
    """
    rf = response_format
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise ValueError("response_format.type must be text, json_object or json_schema")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return {"type": "object"}
    schema = (rf.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        raise ValueError("response_format.json_schema.schema must be an object")
    problem = schema_problem(schema)
    if problem is not None:
        raise ValueError(f"response_format.json_schema.schema is not a valid JSON schema: {problem}")
    return schema


def strip_code_fence(text: str) -> str:
    """``` ```json\\n{...}\\n``` ``` -> ``{...}`` (models often fence JSON)."""
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        if t.rstrip().endswith("```"):
            t = t.rstrip()[:-3]
    return t.strip()


def check_json(text: str | None, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """(value, None) when ``text`` (code fences stripped) is JSON matching ``schema``, else (None, why)."""
    if not text:
        return None, "the reply was empty"
    try:
        value = json.loads(strip_code_fence(text))
    except json.JSONDecodeError as e:
        return None, f"the reply is not valid JSON ({e.msg} at char {e.pos})"
    problems = schema_errors(value, schema)
    if problems:
        return None, "the JSON does not match the schema: " + "; ".join(problems)
    return value, None
