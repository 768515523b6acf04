"""JSON-schema-guided decoding for local backends: only tokens that keep the output
a valid prefix of a schema-conforming JSON value may be sampled.

A small pushdown recognizer works on characters. Its state is a set of stacks
(the grammar is a little nondeterministic: optional properties, ``anyOf``,
the end of a number), each stack a tuple of items with the top last::

    ("L", text)                 expect this literal next
    ("S", min, max, n)          inside a string body, n characters so far
    ("E", min, max, n)          after a backslash in a string
    ("U", min, max, n, k)       k hex digits of a \\uXXXX escape still to come
    ("N", is_int, phase, ndig)  inside a number
    ("V", sid, depth)           a value of schema number sid (expanded lazily)
    ("O", sid, idx, first, d)   an object with declared properties, next candidate idx
    ("F", sid, first, d)        an object with free keys, values of schema sid
    ("A", sid, count, first, d, min, max)  an array of items of schema sid
    ("W",)                      an optional single space

Output is compact JSON (one optional space after ``:`` and ``,``), declared
properties come in schema order (optional ones may be skipped, undeclared ones
are not produced), numbers have at most 15 digits per part. Supported schema
keywords: type (incl. lists), properties, required, additionalProperties,
items, minItems, maxItems, minLength, maxLength, enum, const, anyOf, oneOf,
allOf (merged), $ref to #/$defs or #/definitions. Others (pattern, minimum,
format...) are not enforced while decoding; the client validates the result.

Per step, :meth:`TokenConstraint.allows` checks single candidate tokens (the
engine tries the most likely ones first, which is exact for greedy decoding
and, by rejection, for sampling); :meth:`TokenConstraint.mask` walks a trie of
the vocabulary for the full mask when few candidates pass.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Sequence

import torch

from openk2.model.sampling import sampling_probs

INF = 1 << 30
MAX_DIGITS = 15
MAX_EXP_DIGITS = 3
HEX = set("0123456789abcdefABCDEF")
ESCAPES = set('"\\/bfnrt')

Stack = tuple
State = frozenset  # of stacks


def _merge_all_of(schema: dict[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    for sub in schema["allOf"]:
        for k, v in sub.items():
            if k == "properties":
                merged["properties"] = {**merged.get("properties", {}), **v}
            elif k == "required":
                merged["required"] = list(dict.fromkeys(merged.get("required", []) + list(v)))
            else:
                merged.setdefault(k, v)
    return merged


class SchemaGrammar:
    """Character-level recognizer of JSON values matching a JSON schema."""

    def __init__(self, schema: dict[str, Any] | bool, max_depth: int = 6) -> None:
        self.root = schema if isinstance(schema, dict) else {}
        self.max_depth = max_depth
        self._schemas: list[dict[str, Any]] = []
        self._ids: dict[str, int] = {}
        self.root_sid = self._sid(self.root)
        self.expand = lru_cache(maxsize=100_000)(self._expand)

    # -- schema table (items hold small ints, so stacks stay hashable and cheap)
    def _sid(self, schema: Any) -> int:
        if schema is True or schema is None:
            schema = {}
        if schema is False:
            schema = {"not": {}}
        key = json.dumps(schema, sort_keys=True)
        if key not in self._ids:
            self._ids[key] = len(self._schemas)
            self._schemas.append(schema)
        return self._ids[key]

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        seen = 0
        while "$ref" in schema and seen < 32:
            ref = schema["$ref"]
            if not ref.startswith("#/"):
                raise ValueError(f"only local $ref is supported, got {ref!r}")
            node: Any = self.root
            for part in ref[2:].split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
            schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
            seen += 1
        if "allOf" in schema:
            schema = _merge_all_of(schema)
        return schema

    # -- expansion: stacks whose top consumes a character (or the empty, accepting stack)
    def initial(self) -> State:
        return frozenset({(("V", self.root_sid, 0),)})

    def _expand(self, stack: Stack) -> tuple[Stack, ...]:
        if not stack:
            return ((),)
        top, rest = stack[-1], stack[:-1]
        kind = top[0]
        if kind in "LSEU":
            return (stack,)
        if kind == "N":
            out = [stack]
            if top[2] in ("zero", "int", "frac", "exp"):
                out.extend(self.expand(rest))
            return tuple(out)
        if kind == "W":
            return self.expand(rest) + (rest + (("L", " "),),)
        if kind == "V":
            return tuple(s for alt in self._value_alternatives(top[1], top[2]) for s in self.expand(rest + alt))
        if kind == "O":
            _, sid, idx, first, d = top
            schema = self._schemas[sid]
            props = list(schema.get("properties", {}).items())
            required = set(schema.get("required", []))
            out: list[Stack] = []
            if not any(name in required for name, _ in props[idx:]):
                out.append(rest + (("L", "}"),))
            for j in range(idx, len(props)):
                name, sub = props[j]
                seq = (("O", sid, j + 1, False, d), ("V", self._sid(sub), d + 1), ("W",), ("L", ":"),
                       ("L", json.dumps(name, ensure_ascii=False)))
                if not first:
                    seq += (("W",), ("L", ","))
                out.append(rest + seq)
                if name in required:
                    break  # a required property cannot be skipped
            return tuple(out)
        if kind == "F":
            _, vsid, first, d = top
            out = [rest + (("L", "}"),)]
            # a key string (opening quote, then a body that pops itself on the closing quote), ':' and a value
            seq = (("F", vsid, False, d), ("V", vsid, d + 1), ("W",), ("L", ":"), ("S", 0, INF, 0), ("L", '"'))
            if not first:
                seq += (("W",), ("L", ","))
            out.append(rest + seq)
            return tuple(out)
        if kind == "A":
            _, isid, count, first, d, lo, hi = top
            out = []
            if count >= lo:
                out.append(rest + (("L", "]"),))
            if count < hi:
                seq = (("A", isid, count + 1, False, d, lo, hi), ("V", isid, d + 1))
                if not first:
                    seq += (("W",), ("L", ","))
                out.extend(self.expand(rest + seq))
            return tuple(out)
        raise AssertionError(kind)

    def _value_alternatives(self, sid: int, depth: int) -> list[tuple]:
        """Each alternative is a tuple of items to push (top last)."""
        schema = self._resolve(self._schemas[sid])
        if "not" in schema and not schema["not"]:
            return []
        if "const" in schema:
            return [(("L", json.dumps(schema["const"], ensure_ascii=False, separators=(",", ":"))),)]
        if "enum" in schema:
            return [(("L", json.dumps(v, ensure_ascii=False, separators=(",", ":"))),) for v in schema["enum"]]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                base = {k: v for k, v in schema.items() if k != key}
                return [(("V", self._sid({**base, **sub}), depth),) for sub in schema[key]]
        t = schema.get("type")
        if isinstance(t, list):
            return [(("V", self._sid({**schema, "type": one}), depth),) for one in t]
        if t is None:
            if "properties" in schema:
                t = "object"
            elif "items" in schema:
                t = "array"
            else:
                return self._any(depth)
        if t == "string":
            return [(("S", schema.get("minLength", 0), schema.get("maxLength", INF), 0), ("L", '"'))]
        if t in ("integer", "number"):
            return [(("N", t == "integer", "start", 0),)]
        if t == "boolean":
            return [(("L", "true"),), (("L", "false"),)]
        if t == "null":
            return [(("L", "null"),)]
        if t == "object":
            if schema.get("properties"):
                return [(("O", self._sid(schema), 0, True, depth), ("L", "{"))]
            if depth >= self.max_depth:
                return [(("L", "{}"),)]
            extra = schema.get("additionalProperties", {})
            return [(("F", self._sid(extra if isinstance(extra, dict) else {}), True, depth), ("L", "{"))]
        if t == "array":
            if depth >= self.max_depth:
                return [(("L", "[]"),)]
            items = schema.get("items", {})
            return [(("A", self._sid(items if isinstance(items, dict) else {}), 0, True, depth,
                      schema.get("minItems", 0), schema.get("maxItems", INF)), ("L", "["))]
        raise ValueError(f"unsupported JSON schema type {t!r}")

    def _any(self, depth: int) -> list[tuple]:
        types = ["string", "number", "boolean", "null"]
        if depth < self.max_depth:
            types += ["object", "array"]
        return [(("V", self._sid({"type": t}), depth),) for t in types]

    # -- consuming characters
    @staticmethod
    def _consume(stack: Stack, ch: str) -> Stack | None:
        top, rest = stack[-1], stack[:-1]
        kind = top[0]
        if kind == "L":
            text = top[1]
            if text[0] != ch:
                return None
            return rest + (("L", text[1:]),) if len(text) > 1 else rest
        if kind == "S":
            _, lo, hi, n = top
            if ch == '"':
                return rest if n >= lo else None
            if n >= hi:
                return None
            if ch == "\\":
                return rest + (("E", lo, hi, n),)
            if ch < " ":
                return None  # control characters must be escaped
            return rest + (("S", lo, hi, n + 1),)
        if kind == "E":
            _, lo, hi, n = top
            if ch in ESCAPES:
                return rest + (("S", lo, hi, n + 1),)
            if ch == "u":
                return rest + (("U", lo, hi, n, 4),)
            return None
        if kind == "U":
            _, lo, hi, n, k = top
            if ch not in HEX:
                return None
            return rest + ((("U", lo, hi, n, k - 1),) if k > 1 else (("S", lo, hi, n + 1),))
        if kind == "N":
            _, is_int, phase, nd = top
            nxt = _number_step(is_int, phase, nd, ch)
            return None if nxt is None else rest + (("N", is_int, nxt[0], nxt[1]),)
        raise AssertionError(kind)

    def step(self, state: State, ch: str) -> State:
        out = set()
        for stack in state:
            for s in self.expand(stack):
                if s:
                    nxt = self._consume(s, ch)
                    if nxt is not None:
                        out.add(nxt)
        return frozenset(out)

    def advance(self, state: State, text: str) -> State:
        for ch in text:
            state = self.step(state, ch)
            if not state:
                break
        return state

    def accepting(self, state: State) -> bool:
        return any(not s for stack in state for s in self.expand(stack))

    def can_continue(self, state: State) -> bool:
        return any(s for stack in state for s in self.expand(stack))

    def matches(self, text: str) -> bool:
        return self.accepting(self.advance(self.initial(), text))


def _number_step(is_int: bool, phase: str, nd: int, ch: str) -> tuple[str, int] | None:
    digit = "0" <= ch <= "9"
    if phase == "start":
        if ch == "-":
            return ("sign", 0)
        phase = "sign"
    if phase == "sign":
        if ch == "0":
            return ("zero", 1)
        if digit:
            return ("int", 1)
        return None
    if phase in ("zero", "int"):
        if digit and phase == "int" and nd < MAX_DIGITS:
            return ("int", nd + 1)
        if not is_int and ch == ".":
            return ("dot", 0)
        if not is_int and ch in "eE":
            return ("e", 0)
        return None
    if phase in ("dot", "frac"):
        if digit and nd < MAX_DIGITS:
            return ("frac", nd + 1)
        if phase == "frac" and ch in "eE":
            return ("e", 0)
        return None
    if phase == "e":
        if ch in "+-":
            return ("esign", 0)
        phase = "esign"
    if phase in ("esign", "exp"):
        if digit and nd < MAX_EXP_DIGITS:
            return ("exp", nd + 1)
        return None
    return None


# --------------------------------------------------------------------------- tokens


class TokenVocab:
    """The text of every token, for constraint checks. Tokens that decode to a
    partial UTF-8 character (U+FFFD) or are special are never allowed inside
    JSON; EOS ids are allowed once the value is complete."""

    def __init__(self, texts: Sequence[str | None], eos_ids: Sequence[int]) -> None:
        self.texts = list(texts)
        self.eos_ids = list(eos_ids)
        self.size = len(self.texts)
        self._trie: dict | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], special_ids: Sequence[int] = ()) -> "TokenVocab":
        special = set(special_ids) | set(eos_ids)
        texts: list[str | None] = []
        for i in range(vocab_size):
            if i in special:
                texts.append(None)
                continue
            try:
                t = tokenizer.decode([i])
            except Exception:  # ids past the tokenizer's vocabulary (padded embedding rows)
                t = None
            texts.append(t if t and "\ufffd" not in t else None)
        return cls(texts, eos_ids)

    def trie(self) -> dict:
        if self._trie is None:
            root: dict = {}
            for i, t in enumerate(self.texts):
                if t is None:
                    continue
                node = root
                for ch in t:
                    node = node.setdefault(ch, {})
                node.setdefault(None, []).append(i)
            self._trie = root
        return self._trie


class TokenConstraint:
    """The constraint for one sequence being decoded."""

    def __init__(self, grammar: SchemaGrammar, vocab: TokenVocab) -> None:
        self.grammar = grammar
        self.vocab = vocab
        self.state = grammar.initial()
        self.text = ""

    @property
    def complete(self) -> bool:
        """The value is finished and nothing may follow: only EOS remains."""
        return self.grammar.accepting(self.state) and not self.grammar.can_continue(self.state)

    def allows(self, token_id: int) -> bool:
        if token_id in self.vocab.eos_ids:
            return self.grammar.accepting(self.state)
        t = self.vocab.texts[token_id] if token_id < self.vocab.size else None
        return t is not None and bool(self.grammar.advance(self.state, t))

    def accept(self, token_id: int) -> None:
        if token_id in self.vocab.eos_ids:
            return
        t = self.vocab.texts[token_id]
        self.state = self.grammar.advance(self.state, t)
        self.text += t

    def mask(self) -> torch.Tensor:
        """Bool [vocab] of every allowed token (a trie walk over the vocabulary)."""
        allowed = torch.zeros(self.vocab.size, dtype=torch.bool)
        ids: list[int] = []
        g = self.grammar
        todo = [(self.vocab.trie(), self.state)]
        while todo:
            node, state = todo.pop()
            for ch, child in node.items():
                if ch is None:
                    ids.extend(child)
                    continue
                nxt = g.step(state, ch)
                if nxt:
                    todo.append((child, nxt))
        if ids:
            allowed[torch.tensor(ids)] = True
        if g.accepting(self.state):
            allowed[torch.tensor(self.vocab.eos_ids, dtype=torch.long)] = True
        return allowed

    def choose(self, logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
               tries: int = 16) -> int:
        """Pick the next token from [vocab] logits under the constraint.

        Greedy: the best allowed token among the top candidates. Sampling:
        rejection sampling (exact for the constrained distribution); both fall
        back to the full mask when the cheap path finds nothing.
        """
        logits = logits.float()
        if temperature <= 0:
            top = torch.topk(logits, min(tries, logits.numel())).indices.tolist()
            for tok in top:
                if self.allows(tok):
                    return tok
            return int(torch.where(self.mask(), logits, torch.tensor(float("-inf"))).argmax())
        probs = sampling_probs(logits, temperature, top_p)
        for _ in range(tries):
            tok = int(torch.multinomial(probs, 1, generator=generator))
            if self.allows(tok):
                return tok
            probs[tok] = 0.0
            if float(probs.sum()) <= 0:
                break
        allowed = self.mask()
        probs = sampling_probs(logits, temperature) * allowed  # the full mask: no nucleus cut
        if float(probs.sum()) <= 0:  # the model puts no mass on any allowed token
            probs = allowed.float()
        return int(torch.multinomial(probs, 1, generator=generator))
