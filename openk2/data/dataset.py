"""Tokenise the corpus once into memory-mapped shards, with a JSON index.

Layout of a data directory (see docs/data.md):

    DATA_DIR/index.json              format, fingerprint, tokenizer, per-shard document table
    DATA_DIR/{split}-{domain}.bin    raw token ids (uint16 if vocab <= 65536, else uint32),
                                     each document followed by one [EOS]
    DATA_DIR/tokenizer/              the tokenizer the shards were made with

Every file is written to a temporary name and renamed into place; index.json
is written last, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openk2.data.corpus import CorpusConfig, Document, collect, resolve_config, uses_evals
from openk2.data.tokenizer import Tokenizer, load_tokenizer
from openk2.errors import DataError
from openk2.utils.files import atomic_open, atomic_write
from openk2.utils.progress import progress_bar

FORMAT = "openk2-packed-corpus/1"
DEFAULT_DATA_DIR = "runs/data"
INDEX_JSON = "index.json"
TOKENIZER_DIR = "tokenizer"
_ENCODE_BATCH = 256


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def corpus_fingerprint(cfg: CorpusConfig, tokenizer: Tokenizer) -> str:
    payload = {
        "format": FORMAT,
        "corpus": cfg.to_dict(),
        "tokenizer": tokenizer.fingerprint,
        # the code domain is this interpreter's standard library
        "python": f"{sys.version_info.major}.{sys.version_info.minor}" if cfg.stdlib else None,
        # optional source: whether it was found changes the corpus
        "evals": uses_evals(cfg),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# reading


@dataclass
class Shard:
    """One (split, domain) token stream and its document table."""

    path: Path
    split: str
    domain: str
    dtype: np.dtype
    num_tokens: int
    num_bytes: int  # UTF-8 bytes of the source text
    sources: list[str]
    doc_source: np.ndarray  # index into `sources`
    doc_id: list[str]
    doc_offset: np.ndarray
    doc_length: np.ndarray  # tokens of the document, the [EOS] after it excluded

    @property
    def num_docs(self) -> int:
        return len(self.doc_id)

    def tokens(self) -> np.ndarray:
        """The whole stream, memory-mapped read-only."""
        if self.num_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def provenance(self, i: int) -> dict:
        return {"domain": self.domain, "source": self.sources[int(self.doc_source[i])], "id": self.doc_id[i], "split": self.split}

    def document_tokens(self, i: int) -> np.ndarray:
        o, n = int(self.doc_offset[i]), int(self.doc_length[i])
        return np.asarray(self.tokens()[o : o + n])


@dataclass
class CorpusIndex:
    data_dir: Path
    meta: dict
    shards: list[Shard]

    @property
    def eos_id(self) -> int:
        return int(self.meta["tokenizer"]["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def shard(self, split: str, domain: str) -> Shard | None:
        return next((s for s in self.shards if s.split == split and s.domain == domain), None)

    def split_shards(self, split: str) -> list[Shard]:
        return [s for s in self.shards if s.split == split]

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.data_dir / self.meta["tokenizer"]["dir"])


def load_index(data_dir: str | os.PathLike, *, check_files: bool = True) -> CorpusIndex:
    """Read and validate DATA_DIR/index.json (and, by default, the shard sizes)."""
    data_dir = Path(data_dir)
    path = data_dir / INDEX_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no corpus index (build one with `openk2 corpus build --out {data_dir}`)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read corpus index ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON ({e})") from e

    def need(obj, key, kind, where="index"):
        if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], kind):
            raise DataError(f"{path}: missing or bad field {where}.{key}")
        return obj[key]

    if need(meta, "format", str) != FORMAT:
        raise DataError(f"{path}: format {meta['format']!r} is not {FORMAT!r} (rebuild the corpus)")
    need(meta, "fingerprint", str)
    tok = need(meta, "tokenizer", dict)
    for key in ("vocab_size", "eos_id"):
        need(tok, key, int, "tokenizer")
    need(tok, "dir", str, "tokenizer")
    try:
        dtype = np.dtype(need(meta, "dtype", str))
    except TypeError as e:
        raise DataError(f"{path}: bad dtype {meta['dtype']!r}") from e
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise DataError(f"{path}: dtype {dtype} is not uint16/uint32")

    shards = []
    for k, s in enumerate(need(meta, "shards", list)):
        where = f"shards[{k}]"
        docs = need(s, "docs", dict, where)
        shard = Shard(
            path=data_dir / need(s, "file", str, where),
            split=need(s, "split", str, where),
            domain=need(s, "domain", str, where),
            dtype=dtype,
            num_tokens=need(s, "tokens", int, where),
            num_bytes=need(s, "bytes", int, where),
            sources=need(s, "sources", list, where),
            doc_source=np.asarray(need(docs, "source", list, where + ".docs"), dtype=np.int64),
            doc_id=need(docs, "id", list, where + ".docs"),
            doc_offset=np.asarray(need(docs, "offset", list, where + ".docs"), dtype=np.int64),
            doc_length=np.asarray(need(docs, "length", list, where + ".docs"), dtype=np.int64),
        )
        n = len(shard.doc_id)
        if not (len(shard.doc_source) == len(shard.doc_offset) == len(shard.doc_length) == n):
            raise DataError(f"{path}: {where}.docs columns have different lengths")
        if n and (
            shard.doc_offset.min() < 0
            or (shard.doc_offset + shard.doc_length).max() >= max(shard.num_tokens, 1)
            or shard.doc_source.min() < 0
            or shard.doc_source.max() >= len(shard.sources)
        ):
            raise DataError(f"{path}: {where}.docs offsets/sources point outside the shard")
        if check_files:
            expected = shard.num_tokens * dtype.itemsize
            try:
                size = shard.path.stat().st_size
            except OSError:
                raise DataError(f"{shard.path}: shard file missing (rebuild with `openk2 corpus build`)") from None
            if size != expected:
                what = "truncated" if size < expected else "longer than its index says"
                raise DataError(f"{shard.path}: shard {what}: {size} bytes, index expects {expected}")
        shards.append(shard)
    return CorpusIndex(data_dir, meta, shards)


# ---------------------------------------------------------------------------
# building


def _write_shard(path: Path, docs: list[Document], tokenizer: Tokenizer, dtype: np.dtype, advance) -> dict:
    eos = np.asarray([tokenizer.eos_id], dtype=dtype)
    sources: list[str] = []
    source_ix: dict[str, int] = {}
    cols: dict[str, list] = {"source": [], "id": [], "offset": [], "length": []}
    offset = 0
    nbytes = 0
    with atomic_open(path, "wb") as fh:
        for start in range(0, len(docs), _ENCODE_BATCH):
            batch = docs[start : start + _ENCODE_BATCH]
            encoded = tokenizer.encode_batch([d.text for d in batch])
            for doc, ids in zip(batch, encoded):
                arr = np.asarray(ids, dtype=dtype)
                fh.write(arr.tobytes())
                fh.write(eos.tobytes())
                if doc.source not in source_ix:
                    source_ix[doc.source] = len(sources)
                    sources.append(doc.source)
                cols["source"].append(source_ix[doc.source])
                cols["id"].append(doc.id)
                cols["offset"].append(offset)
                cols["length"].append(len(ids))
                offset += len(ids) + 1
                nbytes += len(doc.text.encode("utf-8"))
            advance(sum(len(d.text) for d in batch))
    return {"tokens": offset, "bytes": nbytes, "sources": sources, "docs": cols}


def build_dataset(
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    corpus_config: CorpusConfig | dict | str | None = None,
    progress: bool = True,
    force: bool = False,
) -> CorpusIndex:
    """Tokenise the corpus into OUT_DIR; a no-op when OUT_DIR is already up to date.

    Up to date means: index.json has the fingerprint of (corpus config,
    tokenizer, format, Python version) and every shard has its indexed size.
    """
    cfg = resolve_config(corpus_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = corpus_fingerprint(cfg, tokenizer)
    if not force and (out / INDEX_JSON).exists():
        try:
            index = load_index(out)
            if index.fingerprint == fingerprint:
                return index
        except DataError:
            pass  # stale or broken: rebuild below
    t0 = time.perf_counter()
    if tokenizer.vocab_size > 1 << 32:
        raise DataError(f"vocab_size {tokenizer.vocab_size} does not fit uint32")
    dtype = _dtype_for(tokenizer.vocab_size)

    groups = collect(cfg)
    tokenizer.save(out / TOKENIZER_DIR)
    total_chars = sum(len(d.text) for docs in groups.values() for d in docs)
    shards_meta = []
    with progress_bar("tokenising corpus", total_chars, enabled=progress, unit="chars") as advance:
        for (split, domain), docs in sorted(groups.items()):
            fname = f"{split}-{domain}.bin"
            meta = _write_shard(out / fname, docs, tokenizer, dtype, advance)
            shards_meta.append({"split": split, "domain": domain, "file": fname, **meta})
    index = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "corpus_config": cfg.to_dict(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "tokenizer": {
            "dir": TOKENIZER_DIR,
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
        },
        "dtype": dtype.name,
        "build_seconds": round(time.perf_counter() - t0, 2),
        "shards": shards_meta,
    }
    atomic_write(out / INDEX_JSON, json.dumps(index, ensure_ascii=False, separators=(",", ":")) + "\n")  # last: marks the build done
    return load_index(out)


# ---------------------------------------------------------------------------
# the unigram baseline the main job prints beside the model's val loss


def _unigram_logprobs(index: CorpusIndex) -> np.ndarray:
    counts = np.zeros(index.vocab_size, dtype=np.int64)
    for shard in index.split_shards("train"):
        if shard.num_tokens:
            counts += np.bincount(shard.tokens(), minlength=index.vocab_size)[: index.vocab_size]
    if counts.sum() == 0:
        raise DataError(f"{index.data_dir}: no train tokens to fit a unigram model")
    # add-one smoothing: a token unseen in train still has finite loss
    return np.log(counts + 1.0) - math.log(counts.sum() + index.vocab_size)


def unigram_baseline_by_domain(data_dir: str | os.PathLike, split: str = "val") -> dict[str, float]:
    """Per-domain cross-entropy (nats/token) on `split` of a unigram model fit on train."""
    index = load_index(data_dir)
    logp = _unigram_logprobs(index)
    out = {}
    for shard in index.split_shards(split):
        if shard.num_tokens:
            toks = shard.tokens()
            out[shard.domain] = float(-logp[toks].mean())
    if not out:
        raise DataError(f"{index.data_dir}: split {split!r} has no tokens")
    return out


def unigram_baseline(data_dir: str | os.PathLike, split: str = "val", mixture: dict[str, float] | None = None) -> float:
    """Cross-entropy (nats/token) on `split` of a unigram model fit on train.

    Without `mixture`, averaged over all tokens of the split; with it, the
    per-domain values weighted like the batches of `PackedDataset(mixture=...)`.
    A model that has learnt nothing beyond token frequencies scores this.
    """
    per_domain = unigram_baseline_by_domain(data_dir, split)
    if mixture is None:
        index = load_index(data_dir)
        weights = {s.domain: s.num_tokens for s in index.split_shards(split) if s.domain in per_domain}
    else:
        weights = {d: w for d, w in mixture.items() if w > 0}
        missing = [d for d in weights if d not in per_domain]
        if missing:
            raise DataError(f"{data_dir}: split {split!r} has no tokens for domain(s) {missing}")
    total = sum(weights.values())
    return float(sum(per_domain[d] * w for d, w in weights.items()) / total)
