"""Synthetic tools by hierarchical domain evolution (K2 report section 3.1.1): categories -> application
domains -> tools with clear names, descriptions, JSON-schema parameters and stated semantics (what state a
tool reads and what it changes). Every generated tool is schema-validated; names and near-duplicate
descriptions (embedding cosine) are deduplicated against the real tools and each other."""

from __future__ import annotations

from typing import Any, Sequence

from openk2.llm.base import LLMClient
from openk2.synth.common import Stats, ask_json, slug, stable_id
from openk2.synth.repo import JSON_TYPES, describe, embed, near_duplicates, params_schema, tool_problems

CATEGORIES = (
    "financial trading", "software applications", "robot control", "e-commerce and retail", "travel booking",
    "healthcare administration", "smart home and IoT", "logistics and supply chain", "education", "customer support",
    "data analytics", "human resources", "media and entertainment", "telecommunications", "scientific computing",
)

DOMAINS_SCHEMA = {
    "type": "object",
    "properties": {"domains": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 3, "maxLength": 60},
                       "description": {"type": "string", "minLength": 10, "maxLength": 300}},
        "required": ["name", "description"], "additionalProperties": False}}},
    "required": ["domains"], "additionalProperties": False,
}

PARAM_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,39}$"},
                   "type": {"type": "string", "enum": list(JSON_TYPES)},
                   "description": {"type": "string", "minLength": 3, "maxLength": 200},
                   "required": {"type": "boolean"}},
    "required": ["name", "type", "description", "required"], "additionalProperties": False,
}

TOOLS_SCHEMA = {
    "type": "object",
    "properties": {"tools": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,47}$"},
            "description": {"type": "string", "minLength": 10, "maxLength": 400},
            "parameters": {"type": "array", "maxItems": 6, "items": PARAM_SCHEMA},
            "reads": {"type": "string", "maxLength": 200},
            "changes": {"type": "string", "maxLength": 200},
            "read_only": {"type": "boolean"},
        },
        "required": ["name", "description", "parameters", "reads", "changes", "read_only"],
        "additionalProperties": False}}},
    "required": ["tools"], "additionalProperties": False,
}

SYSTEM = "You design realistic software tools (APIs) for AI agents. Reply with JSON only."


def domains_prompt(category: str, n: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Category: {category}.\nList {n} distinct application domains within {category} "
                                        f"where an assistant would operate software tools. Each domain is a specific kind of "
                                        f"{category} application; give a short name and a one-sentence description."}]


def tools_prompt(category: str, domain: dict[str, str], n: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": (
                f"Category: {category}\nApplication domain: {domain['name']}: {domain['description']}\n"
                f"Design {n} tools an application in this domain exposes. Each tool has a snake_case name, a clear "
                "description of what it does and returns, its parameters (name, JSON type, description, whether required), "
                "what state it reads, what state it changes ('nothing' for a pure lookup) and whether it is read-only. "
                "Tools of one domain share one state (records, accounts, devices...), so they work together.")}]


def tool_entry(category: str, domain: dict[str, str], spec: dict[str, Any]) -> dict[str, Any]:
    """A repository entry from one generated tool (validated by the caller)."""
    tool = {"type": "function", "function": {"name": spec["name"], "description": spec["description"].strip(),
                                             "parameters": params_schema(spec.get("parameters") or [])}}
    read_only = bool(spec.get("read_only"))
    return {
        "id": f"syn/{slug(category)}/{slug(domain['name'])}/{spec['name']}",
        "source": "synthetic",
        "category": category,
        "domain": domain["name"],
        "domain_description": domain.get("description", ""),
        "executable": False,
        "tool": tool,
        "annotations": {"readOnlyHint": read_only, "destructiveHint": (not read_only) and "delet" in spec["description"].lower()},
        "semantics": {"reads": spec.get("reads", ""), "changes": spec.get("changes", "")},
    }


async def evolve_domains(client: LLMClient, category: str, n: int, stats: Stats, seed: int = 0) -> list[dict[str, str]]:
    out = await ask_json(client, domains_prompt(category, n), DOMAINS_SCHEMA, stats, "tool_generator", max_tokens=600,
                         seed=seed)
    if out is None:
        stats.add("evolve.domain_batches_failed")
        return []
    seen, domains = set(), []
    for d in out["domains"][:n]:
        key = slug(d["name"])
        if key in seen:
            stats.add("evolve.duplicate_domain")
            continue
        seen.add(key)
        domains.append({"name": d["name"].strip(), "description": d["description"].strip()})
    return domains


async def evolve_tools(client: LLMClient, category: str, domain: dict[str, str], n: int, stats: Stats,
                       seed: int = 0) -> list[dict[str, Any]]:
    out = await ask_json(client, tools_prompt(category, domain, n), TOOLS_SCHEMA, stats, "tool_generator",
                         max_tokens=1024, seed=seed)
    if out is None:
        stats.add("evolve.tool_batches_failed")
        return []
    entries = []
    for spec in out["tools"][:n]:
        stats.add("evolve.tools_generated")
        e = tool_entry(category, domain, spec)
        problems = tool_problems(e["tool"])
        if problems:
            stats.add("evolve.rejected:invalid_schema")
            continue
        entries.append(e)
    return entries


def dedup(real: Sequence[dict[str, Any]], synthetic: Sequence[dict[str, Any]], threshold: float,
          stats: Stats | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept synthetic tools, dropped ones with the reason): exact names first (against real and kept synthetic
    names), then description embeddings with cosine >= `threshold` to any real or earlier kept tool."""
    names = {e["tool"]["function"]["name"].lower() for e in real}
    ids: set[str] = set()
    by_name, dropped = [], []
    for e in synthetic:
        n = e["tool"]["function"]["name"].lower()
        if n in names or e["id"] in ids:
            dropped.append({**e, "dropped": "duplicate_name"})
            continue
        names.add(n)
        ids.add(e["id"])
        by_name.append(e)
    if not by_name:
        return [], dropped
    vecs = embed([describe(e) for e in list(real) + by_name])
    dup = near_duplicates(vecs, threshold, keep_first=len(real))
    allx = list(real) + by_name
    kept = []
    for i, e in enumerate(by_name, start=len(real)):
        if dup[i] is None:
            kept.append(e)
        else:
            dropped.append({**e, "dropped": "near_duplicate", "of": allx[dup[i]]["id"]})
    if stats is not None:
        for d in dropped:
            stats.add(f"evolve.dedup:{d['dropped']}")
    return kept, dropped


def evolve_items(categories: Sequence[str], seed: int) -> list[dict[str, Any]]:
    return [{"id": stable_id("domains", c, seed), "category": c} for c in categories]
