"""Tokenizers: K2 special ids, round trips, K2 pre-tokenizer, the tiktoken loader."""

from __future__ import annotations

import base64
import json
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Regex, pre_tokenizers

from openk2.data.special_tokens import K2_SPECIAL_TOKENS
from openk2.data.tokenizer import (
    K2_PAT_STR,
    bytes_to_unicode,
    load_tiktoken,
    load_tokenizer,
    read_tiktoken_ranks,
    train_bpe,
)
from openk2.errors import DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SAMPLE_FILES = ["argparse.py", "json/decoder.py", "textwrap.py", "heapq.py"]
EXTRA = (
    "To be, or not to be, that is the question:\n"
    "In the beginning God created the heaven and the earth. 12345 + 678 = 13023\n"
    "中文English混合 北京市 Pascal naïve café Ωmega ünïcödé 🙂\r\n\tTabs\n"
)


def _texts() -> list[str]:
    return [(STDLIB / f).read_text(encoding="utf-8") for f in SAMPLE_FILES] + [EXTRA] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(_texts(), vocab_size=600)


ROUND_TRIP = [
    "",
    "hello world",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n",
    "  leading and trailing spaces   ",
    "中文English混合 and 🙂 emoji, naïve café",
    "\x00\x01 control bytes \x7f",
    "\n\n\r\n\t\t",
    EXTRA * 3,
]


def test_special_tokens_take_ids_0_to_n(bpe):
    assert [bpe.token_to_id(t) for t in K2_SPECIAL_TOKENS] == list(range(len(K2_SPECIAL_TOKENS)))
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert bpe.vocab_size == 600
    assert bpe.special_tokens["<|tool_call_end|>"] == 13


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_encode_decode_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bos_and_special_markers(bpe):
    ids = bpe.encode("hi", add_special_tokens=True)
    assert ids[0] == bpe.bos_id and ids[1:] == bpe.encode("hi")
    # a chat marker written in text is one id; skip_special_tokens drops it
    ids = bpe.encode("a<|im_end|>b")
    assert bpe.token_to_id("<|im_end|>") in ids
    assert bpe.decode(ids, skip_special_tokens=True) == "ab"
    assert bpe.token_to_id("definitely not a token") is None


def test_bpe_compresses_and_is_deterministic(bpe):
    text = (STDLIB / "argparse.py").read_text(encoding="utf-8")[:20000]
    ids = bpe.encode(text)
    assert len(text.encode()) / len(ids) > 2.0  # merges learnt; bytes alone would be 1.0
    again = train_bpe(_texts(), vocab_size=600)
    assert again.fingerprint == bpe.fingerprint


def test_save_load(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "[EOS]" and cfg["added_tokens_decoder"]["1"]["content"] == "[EOS]"
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        tok = load_tokenizer(path)
        assert tok.fingerprint == bpe.fingerprint
        assert tok.encode(EXTRA) == bpe.encode(EXTRA)
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 600)


def test_k2_pre_tokenizer_splits():
    split = pre_tokenizers.Split(Regex(K2_PAT_STR), behavior="isolated")

    def pieces(s):
        return [p for p, _ in split.pre_tokenize_str(s)]

    assert pieces("中文English混合") == ["中文", "English", "混合"]
    assert pieces("北京市 Pascal") == ["北京市", " Pascal"]
    assert pieces("Hello, world! It's 12345 CamelCase") == ["Hello", ",", " world", "!", " It's", " ", "123", "45", " Camel", "Case"]
    assert pieces("x\n\n  y") == ["x", "\n\n", " ", " y"]


def test_bytes_to_unicode_is_a_bijection():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120"  # GPT-2's 'Ġ'


# ---------------------------------------------------------------------------
# the released K2 tokenizer format, on a synthetic ranks file


def _pieces(text: str) -> list[bytes]:
    split = pre_tokenizers.Split(Regex(K2_PAT_STR), behavior="isolated")
    return [p.encode("utf-8") for p, _ in split.pre_tokenize_str(text)]


def _learn_ranks(text: str, n_merges: int) -> dict[bytes, int]:
    """A tiny rank-based BPE trainer (tiktoken's model): bytes first, then merges."""
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(tuple(bytes([b]) for b in piece) for piece in _pieces(text))
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        merged: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return ranks


def _reference_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's rule: a piece that is a token is taken whole; else merge the lowest-rank pair."""
    out = []
    for piece in _pieces(text):
        if piece in ranks:
            out.append(ranks[piece])
            continue
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            best = min(
                ((ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks),
                default=None,
            )
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out += [ranks[p] for p in parts]
    return out


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])))


@pytest.fixture(scope="module")
def k2_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("k2tok")
    train_text = (STDLIB / "textwrap.py").read_text(encoding="utf-8") + EXTRA * 10
    ranks = _learn_ranks(train_text, 200)
    _write_ranks(d / "tiktoken.model", ranks)
    n = len(ranks)
    config = {
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "added_tokens_decoder": {
            str(n): {"content": "[BOS]", "special": True},
            str(n + 1): {"content": "[EOS]", "special": True},
            str(n + 2): {"content": "<|im_end|>", "special": True},
            str(n + 5): {"content": "<|im_middle|>", "special": True},
            str(n + 255): {"content": "[PAD]", "special": True},
        },
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d, ranks


def test_tiktoken_loader_matches_reference_bpe(k2_files):
    d, ranks = k2_files
    tok = load_tokenizer(d)
    assert tok.kind == "tiktoken"
    texts = [
        (STDLIB / "heapq.py").read_text(encoding="utf-8")[:6000],  # not in the ranks' training text
        EXTRA,
        "the theme of the thesis: 'ing' things, thinking 1000000",
        "中文English混合 🙂 naïve",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids == _reference_encode(text, ranks)
        assert tok.decode(ids) == text
    assert len(tok.encode(texts[0])) < 0.7 * len(texts[0].encode())  # merges are used


def test_tiktoken_special_ids_follow_config(k2_files):
    d, ranks = k2_files
    n = len(ranks)
    tok = load_tokenizer(d)
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 255)
    assert tok.token_to_id("<|im_middle|>") == n + 5
    assert tok.token_to_id(f"<|reserved_token_{n + 3}|>") == n + 3
    ids = tok.encode("hi<|im_end|>")
    assert ids[-1] == n + 2
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_tiktoken_saved_as_hf_json_reloads_identically(k2_files, tmp_path):
    d, _ = k2_files
    tok = load_tokenizer(d)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(EXTRA) == tok.encode(EXTRA)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)


def test_tiktoken_agrees_with_tiktoken_package(k2_files):
    tiktoken = pytest.importorskip("tiktoken")
    d, ranks = k2_files
    enc = tiktoken.Encoding("synthetic", pat_str=K2_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    tok = load_tiktoken(d / "tiktoken.model")
    text = (STDLIB / "heapq.py").read_text(encoding="utf-8") + EXTRA
    assert tok.encode(text) == enc.encode_ordinary(text)


def test_tiktoken_without_config_uses_k2_special_order(k2_files):
    d, ranks = k2_files
    tok = load_tiktoken(d / "tiktoken.model")
    n = len(ranks)
    assert [tok.token_to_id(t) for t in K2_SPECIAL_TOKENS] == list(range(n, n + len(K2_SPECIAL_TOKENS)))


@pytest.mark.parametrize(
    "content, match",
    [
        ("aGVsbG8= 0\nd29ybGQ=\n", r"tiktoken.model:2: expected"),
        ("aGVsbG8= 0\n!!!! 1\n", r"tiktoken.model:2: bad base64"),
        ("aGVsbG8= 0\n", r"single bytes have no rank"),
        ("", r"empty tiktoken ranks file"),
    ],
)
def test_bad_ranks_file_is_a_data_error(tmp_path, content, match):
    path = tmp_path / "tiktoken.model"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_tiktoken_ranks(path)


def test_bad_tokenizer_inputs_are_data_errors(tmp_path, k2_files):
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer.json or tiktoken.model"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(bad.parent)
    d, ranks = k2_files
    colliding = tmp_path / "coll"
    colliding.mkdir()
    (colliding / "tiktoken.model").write_bytes((d / "tiktoken.model").read_bytes())
    (colliding / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"5": {"content": "[BOS]"}}}))
    with pytest.raises(DataError, match="collides with ranked token ids"):
        load_tokenizer(colliding)
    with pytest.raises(DataError, match="vocab_size 100 is below"):
        train_bpe(["abc"], vocab_size=100)
