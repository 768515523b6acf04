"""Where the documents come from: JSONL / text files, or a domain of openk2's corpus; and where the output goes.

* ``*.jsonl``: one JSON object per line with a ``text`` field (``id`` optional: else FILE:LINE);
* ``*.txt`` / ``*.md`` (or any other file): one document per file;
* a directory: every such file inside it, in sorted order;
* ``corpus:PRESET/DOMAIN`` (e.g. ``corpus:tiny/math``): the train documents of a corpus domain.

A path that does not exist is an error (nothing runs). A file that exists but
cannot be read, or a JSONL line that is not an object with a string ``text``,
becomes a per-document failure that the run records in dropped.jsonl.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from openk2.errors import DataError
from openk2.rephrase.pipeline import OUTPUT, SourceDoc


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".txt", ".md"))
    return [path]


def _corpus_docs(spec: str, limit: int | None) -> list[SourceDoc]:
    from openk2.data.corpus import get_preset, iter_documents, split_of

    preset, _, domain = spec.removeprefix("corpus:").partition("/")
    cfg = get_preset(preset)
    out = []
    for d in iter_documents(cfg):
        if (not domain or d.domain == domain) and split_of(d, cfg.val_fraction) == "train":
            out.append(SourceDoc(d.key, d.text, d.domain, d.source))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{spec}: no train documents (domains: text, code, math)")
    return out


def read_inputs(paths: list[str | os.PathLike], limit: int | None = None,
                domain: str = "") -> tuple[list[SourceDoc], list[dict]]:
    """(documents, per-document input failures) from files, directories and ``corpus:PRESET/DOMAIN`` specs."""
    docs: list[SourceDoc] = []
    failures: list[dict] = []
    for raw in paths:
        if str(raw).startswith("corpus:"):
            docs += _corpus_docs(str(raw), None if limit is None else max(0, limit - len(docs)))
            continue
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        for f in _files(path):
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                failures.append({"source_id": str(f), "reason": "unreadable_file", "error": f"{type(e).__name__}: {e}"})
                continue
            if f.suffix == ".jsonl":
                for lineno, line in enumerate(text.splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        body = rec["text"]
                        if not isinstance(body, str):
                            raise TypeError("field 'text' is not a string")
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        failures.append({"source_id": f"{f}:{lineno}", "reason": "bad_input",
                                         "error": f"{type(e).__name__}: {e}"})
                        continue
                    docs.append(SourceDoc(str(rec.get("id", f"{f.name}:{lineno}")), body,
                                          str(rec.get("domain", domain)), f"local:{f.name}"))
            else:
                docs.append(SourceDoc(f.name, text, domain, f"local:{f.name}"))
        if limit is not None and len(docs) >= limit:
            break
    return (docs[:limit] if limit is not None else docs), failures


def corpus_config(out_dirs: dict[str, str | os.PathLike], base="default"):
    """`base` (a preset name or CorpusConfig) plus the rephrasing outputs as domains: {"text-rephrased": OUT_DIR}.

    Use it with `build_dataset` and a mixture such as {"text": 0.4, "text-rephrased": 0.1, "code": 0.3, "math": 0.2}.
    """
    from openk2.data.corpus import is_domain_name, resolve_config

    cfg = resolve_config(base)
    files = {k: list(v) for k, v in cfg.local_files.items()}
    for domain, out in out_dirs.items():
        if not is_domain_name(domain):
            raise DataError(f"{domain!r}: a rephrased domain is named BASE-NAME with BASE one of text, code, math")
        path = Path(out) / OUTPUT
        if not path.exists():
            raise DataError(f"{path}: no rephrasing output (run `openk2 rephrase` first)")
        files.setdefault(domain, []).append(str(path))
    return cfg.replace(local_files=files)
