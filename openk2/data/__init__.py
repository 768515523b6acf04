"""Pre-training data: corpus, tokenizer, tokenised shards, packed batches.

    from openk2.data.tokenizer import load_tokenizer, train_tokenizer, train_bpe, load_tiktoken
    from openk2.data.corpus import CorpusConfig, CORPUS_PRESETS, DEFAULT_MIXTURE, collect
    from openk2.data.dataset import build_dataset, load_index, unigram_baseline
    from openk2.data.packing import PackedDataset

Submodules are imported on first use (`openk2.data.PackedDataset` works too),
so `import openk2.data` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "load_tiktoken": "tokenizer",
    "train_bpe": "tokenizer",
    "train_tokenizer": "tokenizer",
    "CorpusConfig": "corpus",
    "CORPUS_PRESETS": "corpus",
    "Document": "corpus",
    "collect": "corpus",
    "build_dataset": "dataset",
    "load_index": "dataset",
    "unigram_baseline": "dataset",
    "unigram_baseline_by_domain": "dataset",
    "DEFAULT_DATA_DIR": "dataset",
    "PackedDataset": "packing",
    "DEFAULT_MIXTURE": "corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"openk2.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'openk2.data' has no attribute {name!r}")
