"""Split a long document into chunks under a token budget, at paragraph, then sentence, then word boundaries.

The pieces cover the document exactly: ``"".join(c.text + c.sep for c in chunks)`` is the
original text (whitespace between chunks kept in ``sep``), so no chunk can go
missing between splitting and concatenating the rewrite.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from openk2.errors import ConfigError

_PARA = re.compile(r"\n\s*\n")
_SENT = re.compile(r"(?<=[.!?。！？])[\"')\]]*\s+")


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    tokens: int


def _pieces(text: str, pattern: re.Pattern) -> list[str]:
    """`text` cut after each match of `pattern` (the separator stays with the piece before it)."""
    out, last = [], 0
    for m in pattern.finditer(text):
        out.append(text[last:m.end()])
        last = m.end()
    out.append(text[last:])
    return [p for p in out if p]


def _words(text: str, budget: int, count: Callable[[str], int]) -> list[str]:
    """A sentence longer than the budget, cut between words (or characters, for text without spaces)."""
    units = re.findall(r"\S+\s*", text) or [text]
    if len(units) == 1:
        units = list(text)
    out, cur = [], ""
    for u in units:
        if cur and count(cur + u) > budget:
            out.append(cur)
            cur = ""
        cur += u
    if cur:
        out.append(cur)
    return out


def split_document(text: str, max_tokens: int, count: Callable[[str], int]) -> list[Chunk]:
    """Chunks of at most ~`max_tokens` tokens (a single word longer than the budget stays whole)."""
    if max_tokens < 8:
        raise ConfigError(f"chunk token budget must be >= 8, got {max_tokens}")
    if count(text) <= max_tokens:
        return [Chunk(0, text.strip(), count(text.strip()))] if text.strip() else []
    units: list[str] = []
    for para in _pieces(text, _PARA):
        if count(para) <= max_tokens:
            units.append(para)
            continue
        for sent in _pieces(para, _SENT):
            units.extend([sent] if count(sent) <= max_tokens else _words(sent, max_tokens, count))
    chunks: list[str] = []
    cur = ""
    for u in units:
        if cur and count(cur + u) > max_tokens:
            chunks.append(cur)
            cur = ""
        cur += u
    if cur:
        chunks.append(cur)
    assert "".join(chunks) == text, "chunking lost text"
    out = [c.strip() for c in chunks]
    return [Chunk(i, c, count(c)) for i, c in enumerate(x for x in out if x)]


def join_rewrites(parts: list[str]) -> str:
    """The rewritten chunks as one document (paragraph breaks between them)."""
    return "\n\n".join(p.strip() for p in parts if p.strip())


def tail_tokens(text: str, n: int, count: Callable[[str], int]) -> str:
    """The last ~`n` tokens of `text`, starting at a word boundary."""
    if n <= 0 or not text:
        return ""
    if count(text) <= n:
        return text
    words = re.findall(r"\S+\s*", text)
    out = ""
    for w in reversed(words):
        if count(w + out) > n:
            break
        out = w + out
    return out.strip() or text[-4 * n:]
