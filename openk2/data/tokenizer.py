"""Tokenizers: a byte-level BPE trained on the corpus, and the released K2 one.

K2 uses a tiktoken-style byte-level BPE (163,840 ids: 163,584 ranked tokens,
then 256 special slots). Both tokenizers here share K2's pre-tokenizer regex
(Han runs split off, case-aware word pieces, numbers in groups of 1-3) and one
object API (`Tokenizer`), backed by HF `tokenizers` (Rust, fast batch encode).

- `train_bpe(texts, vocab_size)`: a small BPE with K2's special tokens at ids
  0..N-1 (`special_tokens.K2_SPECIAL_TOKENS` order).
- `load_tiktoken(path)`: the released `tiktoken.model` (base64 token + rank per
  line) and `tokenizer_config.json`, converted to an equivalent HF BPE.
- `load_tokenizer(path)`: either of the above, from a directory or a file.
- `train_tokenizer(corpus)`: `train_bpe` on a mixture-weighted sample of the
  corpus' train split (val documents never reach the tokenizer).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from openk2.data.corpus import DEFAULT_MIXTURE, collect, resolve_config, sample_for_tokenizer
from openk2.data.special_tokens import BOS, EOS, K2_SPECIAL_TOKENS, PAD, UNK
from openk2.errors import DataError
from openk2.utils.files import atomic_write

# The split pattern of K2's tokenization_kimi.py (`pat_str`). Oniguruma, the
# regex engine of HF tokenizers, supports its class intersections (`&&`).
K2_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# K2 reserves 256 ids after the ranked tokens for special tokens.
K2_NUM_RESERVED_SPECIAL = 256
DEFAULT_VOCAB_SIZE = 8192

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
TIKTOKEN_MODEL = "tiktoken.model"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
# The chat template a tokenizer saves when it carries none of its own: openk2's default,
# openk2.chat.DEFAULT_TEMPLATE (the data layer reads the template file, it does not import
# the chat package; tests/test_chat_template.py checks the two names agree).
DEFAULT_CHAT_TEMPLATE = "k2-instruct-0905"
CHAT_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "chat" / "templates"


def default_chat_template() -> str:
    """The Jinja text of openk2's default chat template (what every saved tokenizer ships)."""
    return (CHAT_TEMPLATE_DIR / f"{DEFAULT_CHAT_TEMPLATE}.jinja").read_text(encoding="utf-8")


def read_chat_template(directory: str | os.PathLike, config: dict | None = None) -> str | None:
    """A tokenizer directory's chat template: chat_template.jinja, else tokenizer_config's chat_template."""
    d = Path(directory)
    if (d / CHAT_TEMPLATE_JINJA).is_file():
        return (d / CHAT_TEMPLATE_JINJA).read_text(encoding="utf-8")
    tpl = (config or {}).get("chat_template")
    if isinstance(tpl, list):  # transformers' named-templates form
        tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
    return tpl if isinstance(tpl, str) else None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls,
    space, soft hyphen...) map to code points 256.. in byte order.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def k2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Split on K2's regex first, then map bytes to the byte-level alphabet
    # (use_regex=False: the GPT-2 regex must not split a second time).
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(K2_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


class Tokenizer:
    """One API over a trained BPE and the released K2 tokenizer.

    Special tokens written literally in the text (e.g. "<|im_end|>") encode to
    their single id, as in HF tokenizers; chat rendering relies on it.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str = BOS,
        eos_token: str = EOS,
        pad_token: str | None = PAD,
        unk_token: str | None = UNK,
        kind: str = "bpe",
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.kind = kind
        # the Jinja chat template this tokenizer's model speaks; None: openk2's default
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token if pad_token is not None and backend.token_to_id(pad_token) is not None else eos_token
        self.unk_token = unk_token if unk_token is not None and backend.token_to_id(unk_token) is not None else None
        for name, tok in (("bos", bos_token), ("eos", eos_token)):
            if backend.token_to_id(tok) is None:
                raise DataError(f"tokenizer has no {name} token {tok!r}")

    # -- identity -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.backend.token_to_id(self.pad_token)

    @property
    def unk_id(self) -> int | None:
        return None if self.unk_token is None else self.backend.token_to_id(self.unk_token)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.backend.get_added_tokens_decoder().items()) if t.special}

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: datasets record it to detect a swap."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    # -- text <-> ids ---------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens, [BOS] is prepended."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if add_special_tokens:
            out = [[self.bos_id, *ids] for ids in out]
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"

    # -- files ----------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json (HF format), tokenizer_config.json and chat_template.jinja into `directory`.

        The chat template (its own, else openk2's default) goes both into chat_template.jinja and
        into tokenizer_config.json's chat_template, so transformers' apply_chat_template renders
        what openk2 renders.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / TOKENIZER_JSON, self.backend.to_str(pretty=False))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "openk2_kind": self.kind,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": 1 << 20,
            "added_tokens_decoder": {
                str(i): {"content": t.content, "special": t.special}
                for i, t in sorted(self.backend.get_added_tokens_decoder().items())
            },
        }
        template = self.chat_template if self.chat_template is not None else default_chat_template()
        config["chat_template"] = template
        atomic_write(d / TOKENIZER_CONFIG_JSON, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write(d / CHAT_TEMPLATE_JINJA, template)
        return d


# ---------------------------------------------------------------------------
# training


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = K2_SPECIAL_TOKENS,
    show_progress: bool = False,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE with K2's pre-tokenizer; specials take ids 0..N-1."""
    n_base = len(special_tokens) + 256
    if vocab_size < n_base:
        raise DataError(f"vocab_size {vocab_size} is below {n_base} (special tokens + 256 bytes)")
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = k2_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    for i, tok in enumerate(special_tokens):
        if backend.token_to_id(tok) != i:  # the trainer's contract; check it, ids are load-bearing
            raise RuntimeError(f"special token {tok!r} got id {backend.token_to_id(tok)}, expected {i}")
    return Tokenizer(backend, kind="bpe")


# ---------------------------------------------------------------------------
# the released K2 tokenizer (tiktoken format)


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token) rank` pair per line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read tiktoken ranks file ({e.strerror or e})") from e
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected 'base64_token rank', got {line[:60]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: bad base64 token or rank ({e})") from e
        if token in ranks or rank in seen_ranks:
            raise DataError(f"{path}:{lineno}: duplicate token or rank {rank}")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise DataError(f"{path}: empty tiktoken ranks file")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"{path}: {len(missing)} single bytes have no rank (e.g. {missing[0]:#04x}); not a byte-level BPE")
    if sorted(seen_ranks) != list(range(len(ranks))):
        raise DataError(f"{path}: ranks are not contiguous 0..{len(ranks) - 1}")
    return ranks


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merges that make HF's BPE pick what tiktoken picks.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank;
    HF merges the pair with the lowest merge index. Listing every split (a, b)
    of every token t with both halves in the vocabulary, ordered by rank(t),
    makes the two rules agree.
    """
    out: list[tuple[int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                out.append((rank, lr, left, right))
    out.sort(key=lambda m: (m[0], m[1]))
    return [(a, b) for _, _, a, b in out]


def _special_name(spec) -> str | None:
    if spec is None:
        return None
    if isinstance(spec, dict):
        return spec.get("content")
    return str(spec)


def load_tiktoken(
    model_file: str | os.PathLike,
    config_file: str | os.PathLike | None = None,
    *,
    num_reserved_special_tokens: int = K2_NUM_RESERVED_SPECIAL,
) -> Tokenizer:
    """Load K2's `tiktoken.model` (+ `tokenizer_config.json`) as a `Tokenizer`.

    Special ids follow the released layout: ranked tokens take 0..n-1, the
    specials named in `added_tokens_decoder` keep their ids in n..n+255, and
    the rest of that block is `<|reserved_token_{id}|>`. Without a config the
    K2_SPECIAL_TOKENS take n, n+1, ... in order.
    """
    model_file = Path(model_file)
    ranks = read_tiktoken_ranks(model_file)
    n = len(ranks)
    b2u = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in _merges_from_ranks(ranks)]
    # ignore_merges: like tiktoken, a piece that is itself a token is taken whole.
    backend = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = k2_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()

    config: dict = {}
    if config_file is not None:
        config_file = Path(config_file)
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except OSError as e:
            raise DataError(f"{config_file}: cannot read tokenizer config ({e.strerror or e})") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{config_file}: malformed JSON ({e})") from e
        if not isinstance(config, dict):
            raise DataError(f"{config_file}: expected a JSON object")

    named: dict[int, str] = {}
    if config.get("added_tokens_decoder"):
        for key, spec in config["added_tokens_decoder"].items():
            try:
                tid = int(key)
            except ValueError as e:
                raise DataError(f"{config_file}: added_tokens_decoder key {key!r} is not an id") from e
            content = _special_name(spec)
            if not content:
                raise DataError(f"{config_file}: added_tokens_decoder[{key}] has no content")
            if tid < n:
                raise DataError(f"{config_file}: special token {content!r} id {tid} collides with ranked token ids 0..{n - 1}")
            named[tid] = content
        n_special = max(num_reserved_special_tokens, max(named) - n + 1)
    else:
        named = {n + i: tok for i, tok in enumerate(K2_SPECIAL_TOKENS)}
        n_special = len(K2_SPECIAL_TOKENS)
    block = [named.get(n + i, f"<|reserved_token_{n + i}|>") for i in range(n_special)]
    backend.add_special_tokens(block)
    for tid, content in named.items():
        if backend.token_to_id(content) != tid:
            raise DataError(f"{config_file or model_file}: special token {content!r} did not land on id {tid} (duplicate?)")

    bos = _special_name(config.get("bos_token")) or BOS
    eos = _special_name(config.get("eos_token")) or EOS
    pad = _special_name(config.get("pad_token")) or PAD
    unk = _special_name(config.get("unk_token")) or UNK
    template = read_chat_template(config_file.parent, config) if config_file is not None else None
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, kind="tiktoken",
                     chat_template=template)


# ---------------------------------------------------------------------------
# one entry point


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory or file.

    A directory may hold `tokenizer.json` (trained here or any HF byte-level
    BPE) or the released K2 files `tiktoken.model` + `tokenizer_config.json`.
    """
    p = Path(path)
    if p.is_dir():
        if (p / TOKENIZER_JSON).is_file():
            return _load_hf_json(p / TOKENIZER_JSON, p / TOKENIZER_CONFIG_JSON)
        if (p / TIKTOKEN_MODEL).is_file():
            cfg = p / TOKENIZER_CONFIG_JSON
            return load_tiktoken(p / TIKTOKEN_MODEL, cfg if cfg.is_file() else None)
        raise DataError(f"{p}: no {TOKENIZER_JSON} or {TIKTOKEN_MODEL} in this directory")
    if p.is_file():
        if p.suffix == ".json":
            return _load_hf_json(p, p.with_name(TOKENIZER_CONFIG_JSON))
        cfg = p.with_name(TOKENIZER_CONFIG_JSON)
        return load_tiktoken(p, cfg if cfg.is_file() else None)
    raise DataError(f"{p}: tokenizer not found (train one with `openk2 tokenizer train --out {p}`)")


def _load_hf_json(path: Path, config_path: Path) -> Tokenizer:
    try:
        backend = _HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise DataError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from e
    names = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    kind = "bpe"
    cfg: dict = {}
    if config_path.is_file():
        try:
            cfg = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{config_path}: malformed JSON ({e})") from e
        for key in names:
            names[key] = _special_name(cfg.get(key)) or names[key]
        kind = cfg.get("openk2_kind", kind)
    return Tokenizer(
        backend,
        bos_token=names["bos_token"],
        eos_token=names["eos_token"],
        pad_token=names["pad_token"],
        unk_token=names["unk_token"],
        kind=kind,
        chat_template=read_chat_template(path.parent, cfg if isinstance(cfg, dict) else {}),
    )


def train_tokenizer(
    corpus_config=None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    sample_bytes: int = 8_000_000,
    weights: dict[str, float] | None = None,
    show_progress: bool = False,
) -> tuple[Tokenizer, dict]:
    """Train the BPE on a mixture-weighted sample of the corpus' train split.

    Returns (tokenizer, stats) with stats: sample bytes per domain, seconds.
    """
    import time

    cfg = resolve_config(corpus_config)
    groups = collect(cfg)
    docs = sample_for_tokenizer(groups, sample_bytes, weights or DEFAULT_MIXTURE)
    if not docs:
        raise DataError("tokenizer training sample is empty (no train documents in the corpus)")
    per_domain: dict[str, int] = {}
    for d in docs:
        per_domain[d.domain] = per_domain.get(d.domain, 0) + len(d.text.encode("utf-8"))
    t0 = time.perf_counter()
    tok = train_bpe((d.text for d in docs), vocab_size, show_progress=show_progress, length=len(docs))
    return tok, {"sample_bytes": per_domain, "seconds": time.perf_counter() - t0, "documents": len(docs)}
