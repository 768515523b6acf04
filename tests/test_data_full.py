"""The full default corpus: sizes per domain and build time (slow: ~30 s)."""

from __future__ import annotations

import time
from itertools import islice

import pytest

from openk2.data.dataset import build_dataset, unigram_baseline
from openk2.data.packing import PackedDataset
from openk2.data.tokenizer import train_tokenizer


@pytest.mark.slow
def test_default_corpus_builds_fast_with_expected_sizes(tmp_path):
    t0 = time.perf_counter()
    tok, stats = train_tokenizer("default", 8192)
    assert tok.vocab_size == 8192 and stats["seconds"] < 20
    assert 7.9e6 < sum(stats["sample_bytes"].values()) < 8.3e6
    index = build_dataset(tmp_path, tok, "default", progress=False)
    assert time.perf_counter() - t0 < 120
    mb = {}
    tokens = {}
    for s in index.shards:
        mb[s.domain] = mb.get(s.domain, 0) + s.num_bytes / 1e6
        tokens[s.domain] = tokens.get(s.domain, 0) + s.num_tokens
    assert 20 < sum(mb.values()) < 30
    assert mb["text"] > 8 and mb["code"] > 8 and mb["math"] > 4
    assert all(3.0 < mb[d] * 1e6 / tokens[d] < 4.0 for d in mb)  # bytes per token of an 8k BPE
    val_docs = sum(s.num_docs for s in index.split_shards("val"))
    all_docs = sum(s.num_docs for s in index.shards)
    assert 0.04 < val_docs / all_docs < 0.06
    baseline = unigram_baseline(tmp_path, mixture={"text": 0.5, "code": 0.3, "math": 0.2})
    assert 6.5 < baseline < 7.8
    batch = next(islice(PackedDataset(tmp_path, seq_len=512).batches(16), 3, None))
    assert batch.shape == (16, 513)
