"""Shards, packing, mixture, resume, rank slicing, unigram baseline, CLIs, bad inputs."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from openk2.cli import main as cli_main
from openk2.data.corpus import collect, get_preset
from openk2.data.dataset import build_dataset, load_index, unigram_baseline, unigram_baseline_by_domain
from openk2.data.packing import PackedDataset
from openk2.data.tokenizer import train_tokenizer
from openk2.errors import DataError

TINY = get_preset("tiny")
SEQ = 32


@pytest.fixture(scope="module")
def tok():
    tokenizer, _ = train_tokenizer(TINY, vocab_size=512, sample_bytes=300_000)
    return tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("data")
    build_dataset(out, tok, TINY, progress=False)
    return out


def _copy(data_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(data_dir, dst)
    return dst


# -- shards -----------------------------------------------------------------------


def test_shards_hold_every_document_with_provenance_and_eos(data_dir, tok):
    index = load_index(data_dir)
    groups = collect(TINY)
    assert {(s.split, s.domain) for s in index.shards} == set(groups)
    assert index.meta["dtype"] == "uint16" and index.eos_id == tok.eos_id == 1
    for shard in index.shards:
        docs = groups[(shard.split, shard.domain)]
        stream = np.asarray(shard.tokens())
        assert shard.num_docs == len(docs)
        assert shard.num_tokens == int(shard.doc_length.sum()) + shard.num_docs
        # documents are laid out back to back, each followed by exactly one [EOS]
        assert np.array_equal(shard.doc_offset[1:], (shard.doc_offset + shard.doc_length + 1)[:-1])
        assert np.all(stream[shard.doc_offset + shard.doc_length] == tok.eos_id)
        assert int((stream == tok.eos_id).sum()) == shard.num_docs
        for i in (0, shard.num_docs // 2, shard.num_docs - 1):
            prov = shard.provenance(i)
            doc = docs[i]
            assert (prov["domain"], prov["source"], prov["id"], prov["split"]) == (doc.domain, doc.source, doc.id, shard.split)
            assert tok.decode(shard.document_tokens(i)) == doc.text
        assert shard.num_bytes == sum(len(d.text.encode()) for d in docs)


def test_build_is_idempotent_and_rebuilds_on_change(data_dir, tok, tmp_path):
    d = _copy(data_dir, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.is_file()}
    index = build_dataset(d, tok, TINY, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.is_file()} == before
    changed = build_dataset(d, tok, TINY.replace(seed=1), progress=False)
    assert changed.fingerprint != index.fingerprint
    assert json.loads((d / "index.json").read_text())["corpus_config"]["seed"] == 1
    assert not list(d.glob("*.tmp"))


# -- packing ------------------------------------------------------------------------


def test_windows_are_stream_slices_with_eos_between_documents(data_dir):
    ds = PackedDataset(data_dir, "train", seq_len=SEQ, seed=0)
    index = ds.index
    seen = 0
    for batch, domains in islice(ds.batches(16, with_domains=True), 10):
        assert batch.shape == (16, SEQ + 1) and batch.dtype == torch.long
        for row, domain in zip(batch, domains):
            stream = np.asarray(index.shard("train", domain).tokens())
            windows = np.lib.stride_tricks.sliding_window_view(stream, SEQ + 1)[::SEQ]
            assert (windows == row.numpy()).all(axis=1).any(), "every window is a stride-seq_len slice of its domain stream"
            seen += int((row == index.eos_id).sum())
    assert seen > 0  # documents are short next to 160 windows: separators show up


def test_one_epoch_visits_every_window_once(data_dir):
    ds = PackedDataset(data_dir, "val", seq_len=SEQ, mixture={"math": 1.0}, seed=3)
    n = ds.num_windows["math"]
    starts = [ds._next()[1] for _ in range(2 * n)]
    assert sorted(starts[:n]) == [k * SEQ for k in range(n)]
    assert sorted(starts[n:]) == sorted(starts[:n]) and starts[n:] != starts[:n]  # epoch 2: a new order


def test_mixture_proportions_follow_the_weights(data_dir):
    for mixture in ({"text": 0.5, "code": 0.3, "math": 0.2}, {"text": 0.1, "code": 0.0, "math": 0.9}):
        ds = PackedDataset(data_dir, "train", seq_len=SEQ, mixture=mixture, seed=7)
        counts = Counter()
        for _, domains in islice(ds.batches(100, with_domains=True), 40):
            counts.update(domains)
        total = sum(counts.values())
        for d, w in mixture.items():
            assert abs(counts[d] / total - w) < 0.025, (mixture, counts)


def test_same_seed_same_stream_other_seed_other_stream(data_dir):
    a = torch.cat(list(islice(PackedDataset(data_dir, seq_len=SEQ, seed=1).batches(8), 3)))
    b = torch.cat(list(islice(PackedDataset(data_dir, seq_len=SEQ, seed=1).batches(8), 3)))
    c = torch.cat(list(islice(PackedDataset(data_dir, seq_len=SEQ, seed=2).batches(8), 3)))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resume_gives_identical_batches(data_dir, tmp_path):
    ds = PackedDataset(data_dir, "val", seq_len=SEQ, seed=5)  # small: runs through epochs
    it = ds.batches(24)
    for _ in range(7):
        next(it)
    path = tmp_path / "state.pt"
    torch.save(ds.state_dict(), path)
    expected = list(islice(it, 60))
    resumed = PackedDataset(data_dir, "val", seq_len=SEQ, seed=5)
    resumed.load_state_dict(torch.load(path))
    got = list(islice(resumed.batches(24), 60))
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert resumed.draws == ds.draws and resumed.sample_index == (7 + 60) * 24
    assert min(ds.draws[d] // ds.num_windows[d] for d in ("code", "math")) >= 1, ds.num_windows  # crossed epochs
    # json round trip works too
    again = PackedDataset(data_dir, "val", seq_len=SEQ, seed=5)
    again.load_state_dict(json.loads(json.dumps(ds.state_dict())))
    assert again.state_dict() == ds.state_dict()


def test_resume_rejects_another_config(data_dir):
    state = PackedDataset(data_dir, seq_len=SEQ, seed=5).state_dict()
    with pytest.raises(DataError, match="seq_len"):
        PackedDataset(data_dir, seq_len=SEQ * 2, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="mixture"):
        PackedDataset(data_dir, seq_len=SEQ, seed=5, mixture={"text": 1.0}).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_global_batch(data_dir, world_size):
    single = list(islice(PackedDataset(data_dir, seq_len=SEQ, seed=9).batches(8), 5))
    ranks = [PackedDataset(data_dir, seq_len=SEQ, seed=9, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = [list(islice(ds.batches(8), 5)) for ds in ranks]
    for b in range(5):
        parts = [per_rank[r][b] for r in range(world_size)]
        assert all(p.shape == (8 // world_size, SEQ + 1) for p in parts)
        assert torch.equal(torch.cat(parts), single[b])
    assert all(ds.state_dict() == ranks[0].state_dict() for ds in ranks)
    # a 2-rank checkpoint resumes on 1 rank with the same global stream
    one = PackedDataset(data_dir, seq_len=SEQ, seed=9)
    one.load_state_dict(ranks[0].state_dict())
    reference = PackedDataset(data_dir, seq_len=SEQ, seed=9)
    assert torch.equal(next(one.batches(8)), list(islice(reference.batches(8), 6))[-1])


def test_iter_interleaves_ranks(data_dir):
    single = list(islice(iter(PackedDataset(data_dir, seq_len=SEQ, seed=4)), 10))
    r0 = list(islice(iter(PackedDataset(data_dir, seq_len=SEQ, seed=4, rank=0, world_size=2)), 5))
    r1 = list(islice(iter(PackedDataset(data_dir, seq_len=SEQ, seed=4, rank=1, world_size=2)), 5))
    assert all(torch.equal(x, y) for x, y in zip(single[0::2], r0))
    assert all(torch.equal(x, y) for x, y in zip(single[1::2], r1))


# -- unigram baseline ---------------------------------------------------------------


def test_unigram_baseline_matches_a_direct_computation(data_dir):
    index = load_index(data_dir)
    counts = Counter()
    for s in index.split_shards("train"):
        counts.update(np.asarray(s.tokens()).tolist())
    total, V = sum(counts.values()), index.vocab_size
    nll, n = 0.0, 0
    per = {}
    for s in index.split_shards("val"):
        toks = np.asarray(s.tokens()).tolist()
        dn = sum(-math.log((counts[t] + 1) / (total + V)) for t in toks)
        per[s.domain] = dn / len(toks)
        nll, n = nll + dn, n + len(toks)
    assert unigram_baseline(data_dir) == pytest.approx(nll / n, rel=1e-9)
    assert unigram_baseline_by_domain(data_dir) == pytest.approx(per, rel=1e-9)
    mixed = unigram_baseline(data_dir, mixture={"text": 0.5, "code": 0.3, "math": 0.2})
    assert mixed == pytest.approx(0.5 * per["text"] + 0.3 * per["code"] + 0.2 * per["math"], rel=1e-9)
    assert 2.0 < nll / n < math.log(V)  # better than uniform over the vocabulary


# -- bad inputs -----------------------------------------------------------------------


def test_missing_malformed_and_truncated_data_are_data_errors(data_dir, tmp_path):
    with pytest.raises(DataError, match=r"index.json: no corpus index"):
        load_index(tmp_path / "nothing")
    d = _copy(data_dir, tmp_path)
    index_text = (d / "index.json").read_text()

    (d / "index.json").write_text(index_text[:100])
    with pytest.raises(DataError, match=r"index.json: malformed JSON"):
        PackedDataset(d, seq_len=SEQ)

    meta = json.loads(index_text)
    del meta["shards"][0]["docs"]["offset"]
    (d / "index.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"index.json: missing or bad field shards\[0\].docs.offset"):
        load_index(d)

    meta = json.loads(index_text)
    meta["format"] = "something-else/9"
    (d / "index.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="is not 'openk2-packed-corpus/1'"):
        load_index(d)

    (d / "index.json").write_text(index_text)
    shard = d / "train-text.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-6])
    with pytest.raises(DataError, match=r"train-text.bin: shard truncated"):
        PackedDataset(d, seq_len=SEQ)
    shard.unlink()
    with pytest.raises(DataError, match=r"train-text.bin: shard file missing"):
        load_index(d)


def test_bad_dataset_arguments_are_data_errors(data_dir):
    with pytest.raises(DataError, match=r"lacks"):
        PackedDataset(data_dir, seq_len=SEQ, mixture={"text": 0.5, "web": 0.5})
    with pytest.raises(DataError, match="no domain with weight > 0"):
        PackedDataset(data_dir, seq_len=SEQ, mixture={"text": 0.0})
    with pytest.raises(DataError, match="finite number"):
        PackedDataset(data_dir, seq_len=SEQ, mixture={"text": -1.0})
    with pytest.raises(DataError, match="fewer than one window"):
        PackedDataset(data_dir, "val", seq_len=1_000_000)
    with pytest.raises(DataError, match="not a positive multiple of world_size"):
        next(PackedDataset(data_dir, seq_len=SEQ, rank=0, world_size=3).batches(8))
    with pytest.raises(DataError, match="split"):
        PackedDataset(data_dir, "test", seq_len=SEQ)


# -- CLIs -----------------------------------------------------------------------------------


def test_corpus_info_and_sample_cli(data_dir, capsys):
    assert cli_main(["corpus", "info", "--out", str(data_dir)]) == 0
    out = capsys.readouterr().out
    index = load_index(data_dir)
    total_tokens = sum(s.num_tokens for s in index.shards)
    assert f"{total_tokens:,}" in out
    assert "text   train" in out and "math   val" in out
    assert "unigram baseline (val, nats/token)" in out and "default mixture: text 0.50  code 0.30  math 0.20" in out
    assert cli_main(["corpus", "sample", "--out", str(data_dir), "--n", "2", "--seq-len", "16"]) == 0
    assert capsys.readouterr().out.count("--- train window, domain ") == 2


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert cli_main(["corpus", "info", "--out", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openk2 corpus: error: ") and "index.json" in err and "\n" not in err
    assert cli_main(["tokenizer", "info", str(tmp_path / "nope")]) == 2
    assert "tokenizer not found" in capsys.readouterr().err


def test_tokenizer_and_corpus_build_cli(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    assert cli_main(["tokenizer", "train", "--preset", "tiny", "--vocab-size", "400", "--sample-mb", "0.2", "--out", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    assert "trained byte-level BPE: vocab 400 (14 special tokens at ids 0..13)" in out
    assert cli_main(["tokenizer", "encode", str(tok_dir), "To be, or not to be"]) == 0
    assert "round trip: ok" in capsys.readouterr().out
    out_dir = tmp_path / "data"
    args = ["corpus", "build", "--out", str(out_dir), "--preset", "tiny", "--tokenizer", str(tok_dir), "--no-progress"]
    assert cli_main(args) == 0
    assert "built corpus" in capsys.readouterr().out
    assert cli_main(args) == 0
    assert "is up to date" in capsys.readouterr().out
    assert load_index(out_dir).vocab_size == 400
    assert os.path.isfile(out_dir / "tokenizer" / "tokenizer.json")
