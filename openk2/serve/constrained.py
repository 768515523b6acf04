"""Grammar-guided decoding for local backends: only tokens that keep the output a
valid prefix of a value the grammar accepts (and that can still be closed in the
tokens left) may be sampled.

Grammars
--------
:class:`SchemaGrammar` recognises JSON values matching a JSON schema;
:class:`ChoiceGrammar` recognises ``prefix + value + suffix`` for one of several
alternatives (tool calls: the name is one of the declared tools, the arguments
match that tool's schema). :func:`grammar_for` caches compiled schemas.

A small pushdown recognizer works on characters. Its state is a set of stacks
(the grammar is a little nondeterministic: optional properties, ``anyOf``,
the end of a number), each stack a tuple of items with the top last::

    ("L", text)                      expect this literal next
    ("S", min, max, n)               inside a string body, n characters so far
    ("E", min, max, n)               after a backslash in a string
    ("U", min, max, n, k)            k hex digits of a \\uXXXX escape still to come
    ("P", pid, content, esc)         inside a string with a ``pattern`` (content decoded so far)
    ("N", nid, phase, ndig, text)    inside a number (text kept only when it has bounds)
    ("V", sid, depth)                a value of schema number sid (expanded lazily)
    ("O", sid, idx, first, d)        an object with declared properties, next candidate idx
    ("F", sid, count, first, d, max) an object with free keys, values of schema sid
    ("A", sid, count, first, d, min, max)  an array of items of schema sid
    ("W",)                           an optional single space

Every item knows the fewest characters that finish it, so a stack's closing
cost is the sum over its items and a state's the least over its stacks
(:meth:`SchemaGrammar.closing_cost`); the token constraint uses it to keep the
value closable within the tokens left, counting one character per token.

Special tokens (``<|tool_call_end|>``...) in a ChoiceGrammar's prefix or suffix
become single private-use characters, so only the special token itself (not its
text spelled by ordinary tokens) produces them.

Per step, :meth:`TokenConstraint.choose` checks single candidate tokens (the
most likely first for greedy decoding, exact; independent draws for sampling,
exact rejection sampling) and walks a trie of the vocabulary for the full mask
only when no candidate passes.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from fractions import Fraction
from functools import lru_cache
from math import gcd
from typing import Any, Iterable, Sequence

import regex
import torch

from openk2.model.sampling import sampling_probs

INF = 1 << 30
MAX_DIGITS = 15  # per number part (integer digits, fraction digits)
MAX_EXP_DIGITS = 3
DEFAULT_MAX_STRING = 1024  # characters of a string without maxLength
DEFAULT_MAX_ITEMS = 64  # items of an array without maxItems, keys of a free-key object without maxProperties
HEX = set("0123456789abcdefABCDEF")
ESCAPES = set('"\\/bfnrt')
ESCAPE_VALUES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
SPECIAL_RE = regex.compile(r"<\|[^<>|\s]+\|>")  # what a special token's text looks like (K2, ChatML)
SPECIAL_BASE = 0xF0000  # special texts become chr(SPECIAL_BASE + k) (Supplementary Private Use Area-A)
# keywords accepted but not enforced while decoding (the client validates the result)
UNENFORCED = ("format", "uniqueItems", "contains", "minContains", "maxContains", "prefixItems",
              "patternProperties", "propertyNames", "minProperties", "dependentRequired", "dependentSchemas",
              "dependencies", "if", "then", "else", "not", "unevaluatedProperties", "unevaluatedItems",
              "contentEncoding", "contentMediaType")
TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")

Stack = tuple
State = frozenset  # of stacks


def _merge_all_of(schema: dict[str, Any]) -> dict[str, Any]:
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    for sub in schema["allOf"]:
        if not isinstance(sub, dict):
            raise ValueError("allOf entries must be schema objects")
        for k, v in sub.items():
            if k == "properties":
                merged["properties"] = {**merged.get("properties", {}), **v}
            elif k == "required":
                merged["required"] = list(dict.fromkeys(merged.get("required", []) + list(v)))
            else:
                merged.setdefault(k, v)
    return merged


def _fraction(x: Any, keyword: str) -> Fraction:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{keyword} must be a number, got {x!r}")
    return Fraction(x) if isinstance(x, int) else Fraction(repr(x))  # 0.1 -> 1/10, not the binary double


def _lcm(a: Fraction, b: Fraction) -> Fraction:
    return Fraction(a.numerator * b.numerator // gcd(a.numerator, b.numerator), gcd(a.denominator, b.denominator))


class SchemaGrammar:
    """Character-level recognizer of JSON values matching a JSON schema.

    The constructor compiles eagerly and raises ValueError naming the problem
    (an unresolvable ``$ref``, an unsupported type, an empty numeric range, a
    pattern that does not compile, a schema no value satisfies). Strings
    without maxLength are capped at ``max_string`` characters, arrays without
    maxItems and free-key objects without maxProperties at ``max_items``.
    """

    def __init__(self, schema: dict[str, Any] | bool, max_depth: int = 6, *, max_string: int = DEFAULT_MAX_STRING,
                 max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self._setup([("", schema, "")], max_depth, max_string, max_items, ())

    # -- compilation
    def _setup(self, alternatives: Sequence[tuple[str, Any, str]], max_depth: int, max_string: int, max_items: int,
               special_texts: Iterable[str]) -> None:
        self.max_depth = max_depth
        self.max_string = max_string
        self.max_items = max_items
        self._schemas: list[tuple[dict[str, Any], int]] = []  # (schema, index of the root document for $ref)
        self._ids: dict[tuple[int, str], int] = {}
        self._roots: list[dict[str, Any]] = []
        self._nums: list[tuple] = []
        self._num_ids: dict[tuple, int] = {}
        self._pats: list[tuple[str, Any, int, int]] = []
        self._pat_ids: dict[tuple, int] = {}
        self.unenforced: set[str] = set()  # keywords met in the schema that decoding does not enforce
        self.specials: dict[str, str] = {}  # special token text -> its one-character symbol
        for t in special_texts:
            self._special_symbol(t)
        self.expand = lru_cache(maxsize=32_768)(self._expand)
        self._item_cost = lru_cache(maxsize=32_768)(self._item_cost_uncached)
        self._stack_cost = lru_cache(maxsize=32_768)(self._stack_cost_uncached)
        self._pattern_cost = lru_cache(maxsize=8_192)(self._pattern_cost_uncached)
        self._props = lru_cache(maxsize=None)(self._object_props)
        self._min_value_memo: dict[tuple[int, int], int] = {}
        starts: list[Stack] = []
        for prefix, schema, suffix in alternatives:
            if not isinstance(prefix, str) or not isinstance(suffix, str):
                raise ValueError("prefix and suffix must be strings")
            stack: list[tuple] = []
            if schema is None:
                stack += self._literal(suffix) + self._literal(prefix)
            else:
                if not isinstance(schema, (dict, bool)):
                    raise ValueError(f"a schema must be an object or a boolean, got {type(schema).__name__}")
                root = len(self._roots)
                self._roots.append(schema if isinstance(schema, dict) else {})
                sid = self._sid(schema, root)
                stack += self._literal(suffix) + [("V", sid, 0)] + self._literal(prefix)
            starts.append(tuple(stack))
        if not starts:
            raise ValueError("a grammar needs at least one alternative")
        self._starts = frozenset(starts)
        self._validate()
        if self.closing_cost(self._starts) >= INF:
            raise ValueError("the schema admits no JSON value (e.g. an empty enum, a required property that "
                             "additionalProperties forbids, or endless required recursion)")

    def _literal(self, text: str) -> list[tuple]:
        enc = self.encode(text, register=True)
        return [("L", enc)] if enc else []

    def _special_symbol(self, text: str) -> str:
        if text not in self.specials:
            self.specials[text] = chr(SPECIAL_BASE + len(self.specials))
        return self.specials[text]

    def encode(self, text: str, register: bool = False) -> str:
        """Text with each special token text it knows replaced by that token's symbol."""
        if register:
            for m in SPECIAL_RE.finditer(text):
                self._special_symbol(m.group(0))
        for t, sym in self.specials.items():
            if t in text:
                text = text.replace(t, sym)
        return text

    def _sid(self, schema: Any, root: int) -> int:
        if schema is True or schema is None:
            schema = {}
        if schema is False:
            schema = {"enum": []}
        if not isinstance(schema, dict):
            raise ValueError(f"a subschema must be an object or a boolean, got {schema!r}")
        key = (root, json.dumps(schema, sort_keys=True))
        if key not in self._ids:
            self._ids[key] = len(self._schemas)
            self._schemas.append((schema, root))
        return self._ids[key]

    def _resolve(self, schema: dict[str, Any], root: int) -> dict[str, Any]:
        seen = 0
        while "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
                raise ValueError(f"only local $ref (#/...) is supported, got {ref!r}")
            seen += 1
            if seen > 32:
                raise ValueError(f"$ref {ref!r}: a cycle of references")
            node: Any = self._roots[root]
            for part in ref[2:].split("/") if ref != "#" else []:
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    raise ValueError(f"$ref {ref!r} does not resolve")
            if node is True:
                node = {}
            if node is False:
                node = {"enum": []}
            if not isinstance(node, dict):
                raise ValueError(f"$ref {ref!r} does not point to a schema")
            schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
        if "allOf" in schema:
            schema = _merge_all_of(schema)
        return schema

    def _validate(self) -> None:
        """Compile every reachable subschema once, so problems surface before decoding."""
        todo = [item[1] for s in self._starts for item in s if item[0] == "V"]
        seen: set[int] = set()
        while todo:
            sid = todo.pop()
            if sid in seen:
                continue
            seen.add(sid)
            schema = self._resolve(*self._schemas[sid])
            self.unenforced.update(k for k in UNENFORCED if k in schema and not (k == "not" and schema[k] == {}))
            for alt in self._value_alternatives(sid, 0):
                for item in alt:
                    if item[0] == "V":
                        todo.append(item[1])
                    elif item[0] == "O":
                        todo.extend(sub for _, sub, _ in self._props(item[1]))
                    elif item[0] in "AF":
                        todo.append(item[1])

    # -- schema -> alternatives
    def initial(self) -> State:
        return self._starts

    def _value_alternatives(self, sid: int, depth: int) -> list[tuple]:
        """Each alternative is a tuple of items to push (top last)."""
        raw, root = self._schemas[sid]
        schema = self._resolve(raw, root)
        if "const" in schema:
            return [(("L", json.dumps(schema["const"], ensure_ascii=False, separators=(",", ":"))),)]
        if "enum" in schema:
            if not isinstance(schema["enum"], list):
                raise ValueError("enum must be a list")
            return [(("L", json.dumps(v, ensure_ascii=False, separators=(",", ":"))),) for v in schema["enum"]]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                if not isinstance(schema[key], list) or not all(isinstance(s, (dict, bool)) for s in schema[key]):
                    raise ValueError(f"{key} must be a list of schemas")
                base = {k: v for k, v in schema.items() if k != key}
                return [(("V", self._sid(sub if not isinstance(sub, dict) else {**base, **sub}, root), depth),)
                        for sub in schema[key]]
        t = schema.get("type")
        if isinstance(t, list):
            if not t:
                raise ValueError("type: an empty list admits no value")
            return [(("V", self._sid({**schema, "type": one}, root), depth),) for one in t]
        if t is None:
            if "properties" in schema or "required" in schema:
                t = "object"
            elif "items" in schema:
                t = "array"
            elif any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
                t = "number"
            elif any(k in schema for k in ("pattern", "minLength", "maxLength")):
                t = "string"
            else:
                return self._any(depth, root)
        if t not in TYPES:
            raise ValueError(f"unsupported JSON schema type {t!r} (one of {', '.join(TYPES)})")
        if t == "string":
            lo = int(schema.get("minLength", 0))
            hi = int(schema["maxLength"]) if "maxLength" in schema else max(self.max_string, lo)
            if lo > hi:
                raise ValueError(f"minLength {lo} > maxLength {hi}")
            if "pattern" in schema:
                pid = self._pattern(schema["pattern"], lo, hi)
                if pid is not None:
                    return [(("P", pid, "", ""), ("L", '"'))]
            return [(("S", lo, hi, 0), ("L", '"'))]
        if t in ("integer", "number"):
            return [(("N", self._number(schema, t == "integer"), "start", 0, ""),)]
        if t == "boolean":
            return [(("L", "true"),), (("L", "false"),)]
        if t == "null":
            return [(("L", "null"),)]
        if t == "object":
            if schema.get("properties") or schema.get("required"):
                return [(("O", self._sid(schema, root), 0, True, depth), ("L", "{"))]
            if depth >= self.max_depth:
                return [(("L", "{}"),)]
            extra = schema.get("additionalProperties", {})
            if extra is False:
                return [(("L", "{}"),)]
            hi = int(schema.get("maxProperties", self.max_items))
            return [(("F", self._sid(extra if isinstance(extra, dict) else {}, root), 0, True, depth, hi), ("L", "{"))]
        # array
        lo = int(schema.get("minItems", 0))
        hi = int(schema["maxItems"]) if "maxItems" in schema else max(self.max_items, lo)
        if lo > hi:
            raise ValueError(f"minItems {lo} > maxItems {hi}")
        if depth >= self.max_depth and lo == 0:
            return [(("L", "[]"),)]
        items = schema.get("items", {})
        return [(("A", self._sid(items if isinstance(items, (dict, bool)) else {}, root), 0, True, depth, lo, hi),
                 ("L", "["))]

    def _any(self, depth: int, root: int) -> list[tuple]:
        types = ["string", "number", "boolean", "null"]
        if depth < self.max_depth:
            types += ["object", "array"]
        return [(("V", self._sid({"type": t}, root), depth),) for t in types]

    def _object_props(self, sid: int) -> tuple[tuple[str, int, bool], ...]:
        """(name, value sid, required) of an object's declared properties, in schema order; required
        names that are not declared come last, with additionalProperties' schema."""
        raw, root = self._schemas[sid]
        schema = self._resolve(raw, root)
        props = schema.get("properties", {}) or {}
        if not isinstance(props, dict):
            raise ValueError("properties must be an object")
        required = schema.get("required", []) or []
        if not isinstance(required, list):
            raise ValueError("required must be a list of names")
        out = [(name, self._sid(sub, root), name in required) for name, sub in props.items()]
        extra = schema.get("additionalProperties", {})
        for name in dict.fromkeys(required):
            if name not in props:
                if extra is False:
                    raise ValueError(f"required property {name!r} is neither declared nor allowed "
                                     "(additionalProperties is false)")
                out.append((name, self._sid(extra if isinstance(extra, dict) else {}, root), True))
        return tuple(out)

    def _number(self, schema: dict[str, Any], is_int: bool) -> int:
        lo = hi = step = None
        lo_strict = hi_strict = False
        if "minimum" in schema:
            lo = _fraction(schema["minimum"], "minimum")
        if "maximum" in schema:
            hi = _fraction(schema["maximum"], "maximum")
        em, eM = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if em is True:  # draft 4: a flag on minimum
            lo_strict = lo is not None
        elif em is not None and em is not False:
            v = _fraction(em, "exclusiveMinimum")
            if lo is None or v >= lo:
                lo, lo_strict = v, True
        if eM is True:
            hi_strict = hi is not None
        elif eM is not None and eM is not False:
            v = _fraction(eM, "exclusiveMaximum")
            if hi is None or v <= hi:
                hi, hi_strict = v, True
        if "multipleOf" in schema:
            step = _fraction(schema["multipleOf"], "multipleOf")
            if step <= 0:
                raise ValueError(f"multipleOf must be > 0, got {schema['multipleOf']!r}")
        spec = (is_int, lo, lo_strict, hi, hi_strict, step)
        if spec not in self._num_ids:
            self._num_ids[spec] = len(self._nums)
            self._nums.append(spec)
            if _bounded(spec) and _num_cost(spec, "") >= INF:
                raise ValueError(f"no {'integer' if is_int else 'number'} satisfies "
                                 f"{_describe_range(spec)} (with at most {MAX_DIGITS} digits per part)")
        return self._num_ids[spec]

    def _pattern(self, pattern: Any, lo: int, hi: int) -> int | None:
        if not isinstance(pattern, str):
            raise ValueError(f"pattern must be a string, got {pattern!r}")
        try:
            compiled = regex.compile(_ecma_pattern(pattern), regex.ASCII)
        except regex.error as e:
            raise ValueError(f"pattern {pattern!r} does not compile: {e}") from None
        key = (pattern, lo, hi)
        if key not in self._pat_ids:
            self._pat_ids[key] = len(self._pats)
            self._pats.append((pattern, compiled, lo, hi))
            if self._pattern_cost(self._pat_ids[key], "") >= INF:
                # no completion found by the bounded search: leave it to the client's validation
                self._pats[-1] = (pattern, None, lo, hi)
                self.unenforced.add("pattern")
        pid = self._pat_ids[key]
        return pid if self._pats[pid][1] is not None else None

    # -- expansion: stacks whose top consumes a character (or the empty, accepting stack)
    def _expand(self, stack: Stack) -> tuple[Stack, ...]:
        if not stack:
            return ((),)
        top, rest = stack[-1], stack[:-1]
        kind = top[0]
        if kind in "LSEUP":
            return (stack,)
        if kind == "N":
            out = [stack]
            _, nid, phase, _, text = top
            if phase in ("zero", "int", "frac", "exp"):
                spec = self._nums[nid]
                if not _bounded(spec) or _num_ok(spec, text):
                    out.extend(self.expand(rest))
            return tuple(out)
        if kind == "W":
            return self.expand(rest) + (rest + (("L", " "),),)
        if kind == "V":
            return tuple(s for alt in self._value_alternatives(top[1], top[2]) for s in self.expand(rest + alt))
        if kind == "O":
            _, sid, idx, first, d = top
            props = self._props(sid)
            out: list[Stack] = []
            if not any(req for _, _, req in props[idx:]):
                out.append(rest + (("L", "}"),))
            for j in range(idx, len(props)):
                name, sub, req = props[j]
                seq = (("O", sid, j + 1, False, d), ("V", sub, d + 1), ("W",), ("L", ":"),
                       ("L", json.dumps(name, ensure_ascii=False)))
                if not first:
                    seq += (("W",), ("L", ","))
                out.append(rest + seq)
                if req:
                    break  # a required property cannot be skipped
            return tuple(out)
        if kind == "F":
            _, vsid, count, first, d, hi = top
            out = [rest + (("L", "}"),)]
            if count < hi:
                # a key string (opening quote, then a body that pops itself on the closing quote), ':' and a value
                seq = (("F", vsid, count + 1, False, d, hi), ("V", vsid, d + 1), ("W",), ("L", ":"),
                       ("S", 0, self.max_string, 0), ("L", '"'))
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

    # -- consuming characters
    def _consume(self, stack: Stack, ch: str) -> Stack | None:
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
            if ch < " " or ord(ch) >= SPECIAL_BASE:
                return None  # control characters must be escaped; special-token symbols never sit in a string
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
        if kind == "P":
            _, pid, content, esc = top
            _, compiled, lo, hi = self._pats[pid]
            if esc:
                if ch not in ESCAPE_VALUES:
                    return None  # \\u escapes are not produced inside pattern strings
                new = content + ESCAPE_VALUES[ch]
            elif ch == '"':
                return rest if lo <= len(content) and compiled.search(content) else None
            elif ch == "\\":
                return rest + (("P", pid, content, "\\"),) if len(content) < hi else None
            elif ch < " " or ord(ch) >= SPECIAL_BASE:
                return None
            else:
                new = content + ch
            if len(new) > hi or compiled.search(new, partial=True) is None:
                return None
            return rest + (("P", pid, new, ""),)
        if kind == "N":
            _, nid, phase, nd, text = top
            spec = self._nums[nid]
            bounded = _bounded(spec)
            nxt = _number_step(spec[0], phase, nd, ch, allow_exp=not bounded)
            if nxt is None:
                return None
            if bounded:
                text += ch
                if _num_cost(spec, text) >= INF:
                    return None  # this prefix can no longer reach the range
            return rest + (("N", nid, nxt[0], nxt[1], text),)
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
        """Consume (already encoded) text; the empty state when it does not fit."""
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
        """Does the grammar accept exactly ``text`` (special token texts included)?"""
        return self.accepting(self.advance(self.initial(), self.encode(text)))

    # -- closing costs: the fewest characters that finish the value from a state
    def closing_cost(self, state: State) -> int:
        """The fewest characters that complete the value from ``state`` (INF when none can)."""
        return min((self._stack_cost(s) for s in state), default=INF)

    def min_length(self) -> int:
        """The fewest characters of any accepted text (a lower bound for max_tokens)."""
        return self.closing_cost(self._starts)

    def _stack_cost_uncached(self, stack: Stack) -> int:
        total = 0
        for item in stack:
            total += self._item_cost(item)
            if total >= INF:
                return INF
        return total

    def _item_cost_uncached(self, item: tuple) -> int:
        kind = item[0]
        if kind == "L":
            return len(item[1])
        if kind == "W":
            return 0
        if kind == "S":
            return max(0, item[1] - item[3]) + 1
        if kind == "E":
            return 1 + max(0, item[1] - item[3] - 1) + 1
        if kind == "U":
            return item[4] + max(0, item[1] - item[3] - 1) + 1
        if kind == "P":
            _, pid, content, esc = item
            if not esc:
                return _add(self._pattern_cost(pid, content), 1)
            best = min(self._pattern_cost(pid, content + v) for v in ESCAPE_VALUES.values())
            return _add(best, 2)
        if kind == "N":
            _, nid, phase, _, text = item
            spec = self._nums[nid]
            if _bounded(spec):
                return _num_cost(spec, text)
            return 0 if phase in ("zero", "int", "frac", "exp") else 1
        if kind == "V":
            return self._min_value(item[1], item[2])
        if kind == "O":
            _, sid, idx, first, d = item
            total, sep = 1, 0 if first else 1
            for name, sub, req in self._props(sid)[idx:]:
                if req:
                    total = _add(total, sep + len(json.dumps(name, ensure_ascii=False)) + 1 + self._min_value(sub, d + 1))
                    sep = 1
            return total
        if kind == "F":
            return 1
        if kind == "A":
            _, isid, count, first, d, lo, hi = item
            k = max(0, lo - count)
            if k == 0:
                return 1
            v = self._min_value(isid, d + 1)
            return INF if v >= INF else k * v + k - (1 if first else 0) + 1
        raise AssertionError(kind)

    def _min_value(self, sid: int, depth: int) -> int:
        key = (sid, min(depth, self.max_depth))
        memo = self._min_value_memo
        if key in memo:
            return memo[key]
        if depth > self.max_depth + 16:
            return INF  # required recursion deeper than this never closes in practice
        memo[key] = INF  # a cycle through itself cannot be the shortest way
        best = INF
        for alt in self._value_alternatives(sid, depth):
            best = min(best, sum(min(self._item_cost(i), INF) for i in alt))
        best = min(best, INF)
        memo[key] = best
        return best

    def _pattern_cost_uncached(self, pid: int, content: str) -> int:
        """Characters to append to ``content`` until the pattern matches (a bounded depth-first search over
        an alphabet drawn from the pattern; an upper bound on the fewest, INF when none was found)."""
        pattern, compiled, lo, hi = self._pats[pid]
        if compiled is None:
            return 0
        alphabet = _pattern_alphabet(pattern)
        budget = [600]  # regex calls

        def done(s: str) -> bool:
            return lo <= len(s) <= hi and compiled.search(s) is not None

        def search(s: str, depth: int) -> int:
            if done(s):
                return 0
            if len(s) >= hi or depth > 64:
                return INF
            scored = []
            for c in alphabet:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
                m = compiled.search(s + c, partial=True)
                if m is not None:
                    scored.append((0 if done(s + c) else 1, m.start(), c))
            for _, _, c in sorted(scored)[:3]:
                r = search(s + c, depth + 1)
                if r < INF:
                    return r + 1
                if budget[0] <= 0:
                    break
            return INF

        return search(content, 0)


def _ecma_pattern(pattern: str) -> str:
    """A JSON Schema (ECMA-262) pattern for Python's regex: a bare ``$`` is the end of the text
    (Python's would also match before a final newline). \\d and \\w are ASCII (the ASCII flag)."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[":
            in_class = True
        elif c == "]":
            in_class = False
        elif c == "$" and not in_class:
            c = r"\Z"
        out.append(c)
        i += 1
    return "".join(out)


def _add(a: int, b: int) -> int:
    return INF if a >= INF else a + b


@lru_cache(maxsize=4096)
def _pattern_alphabet(pattern: str) -> str:
    base = "a0A _-.@xz9Z"
    literal = "".join(dict.fromkeys(c for c in pattern if c.isprintable() and c not in "\\^$()[]{}|?*+"))
    return "".join(dict.fromkeys(base[:4] + literal + base[4:]))


class ChoiceGrammar(SchemaGrammar):
    """Exactly ``prefix + <JSON value matching schema> + suffix`` for one of ``alternatives``
    (schema None: ``prefix + suffix`` alone).

    Special token texts in a prefix or suffix (``<|...|>``, or those given in
    ``special_texts``) are produced only by sampling that special token, so the
    vocabulary given to :class:`TokenConstraint` must have them.
    """

    def __init__(self, alternatives: Sequence[tuple[str, dict[str, Any] | bool | None, str]], max_depth: int = 6, *,
                 max_string: int = DEFAULT_MAX_STRING, max_items: int = DEFAULT_MAX_ITEMS,
                 special_texts: Iterable[str] = ()) -> None:
        alts = [tuple(a) for a in alternatives]
        if any(len(a) != 3 for a in alts):
            raise ValueError("each alternative is (prefix_text, schema_or_None, suffix_text)")
        self._setup(alts, max_depth, max_string, max_items, special_texts)


_GRAMMARS: OrderedDict[tuple, SchemaGrammar] = OrderedDict()
_GRAMMARS_LOCK = threading.Lock()
GRAMMAR_CACHE_SIZE = 128


def grammar_for(schema: dict[str, Any] | bool, *, max_depth: int = 6, max_string: int = DEFAULT_MAX_STRING,
                max_items: int = DEFAULT_MAX_ITEMS) -> SchemaGrammar:
    """The compiled grammar of ``schema``, from an LRU cache keyed by its canonical JSON
    (so a schema repeated across requests compiles once). Raises ValueError like SchemaGrammar."""
    key = (json.dumps(schema, sort_keys=True, separators=(",", ":")), max_depth, max_string, max_items)
    with _GRAMMARS_LOCK:
        g = _GRAMMARS.get(key)
        if g is not None:
            _GRAMMARS.move_to_end(key)
            return g
    g = SchemaGrammar(schema, max_depth, max_string=max_string, max_items=max_items)
    with _GRAMMARS_LOCK:
        _GRAMMARS[key] = g
        while len(_GRAMMARS) > GRAMMAR_CACHE_SIZE:
            _GRAMMARS.popitem(last=False)
    return g


# --------------------------------------------------------------------------- numbers


def _number_step(is_int: bool, phase: str, nd: int, ch: str, allow_exp: bool = True) -> tuple[str, int] | None:
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
        if not is_int and allow_exp and ch in "eE":
            return ("e", 0)
        return None
    if phase in ("dot", "frac"):
        if digit and nd < MAX_DIGITS:
            return ("frac", nd + 1)
        if phase == "frac" and allow_exp and ch in "eE":
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


def _bounded(spec: tuple) -> bool:
    return spec[1] is not None or spec[3] is not None or spec[5] is not None


def _describe_range(spec: tuple) -> str:
    is_int, lo, los, hi, his, step = spec
    parts = []
    if lo is not None:
        parts.append(f"{'>' if los else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if his else '<='} {hi}")
    if step is not None:
        parts.append(f"multipleOf {step}")
    return ", ".join(parts)


def _num_ok(spec: tuple, text: str) -> bool:
    """May the number ``text`` close here (in range, a multiple)?"""
    is_int, lo, los, hi, his, step = spec
    v = Fraction(text)
    if lo is not None and (v < lo or (los and v == lo)):
        return False
    if hi is not None and (v > hi or (his and v == hi)):
        return False
    return step is None or (v / step).denominator == 1


def _hit(a: Fraction, a_strict: bool, b: Fraction, b_strict: bool, bounds: tuple, s: Fraction) -> bool:
    """Is some multiple of ``s`` in the interval (a, b) (closed unless strict) and within ``bounds``?"""
    L, Ls, U, Us = bounds
    if L is not None and L >= a:
        a, a_strict = L, Ls or (a_strict and L == a)
    if U is not None and U <= b:
        b, b_strict = U, Us or (b_strict and U == b)
    k = -((-a) // s)
    x = k * s
    if a_strict and x == a:
        x += s
    return x < b or (x == b and not b_strict)


@lru_cache(maxsize=65536)
def _num_cost(spec: tuple, text: str) -> int:
    """Fewest characters to append to the number prefix ``text`` (no exponent) so that it is a
    number satisfying ``spec``; INF when no completion is."""
    is_int, lo, los, hi, his, step = spec
    if text in ("", "-"):
        best = min((_num_cost(spec, text + d) for d in "0123456789"), default=INF)
        best = _add(best, 1)
        if text == "":
            best = min(best, _add(_num_cost(spec, "-"), 1))
        return best
    neg = text[0] == "-"
    body = text[1:] if neg else text
    # work on magnitudes: for a negative number, m = -v lies in [-hi, -lo]
    bounds = (lo, los, hi, his) if not neg else (None if hi is None else -hi, his, None if lo is None else -lo, los)
    int_step = Fraction(1) if step is None else _lcm(Fraction(1), step)

    def frac_step(f: int) -> Fraction:
        g = Fraction(1, 10 ** f)
        return g if step is None else _lcm(g, step)

    int_part, dot, frac = body.partition(".")
    best = INF
    if not dot:
        d = int(int_part)
        spans = [0] if int_part == "0" else range(0, MAX_DIGITS - len(int_part) + 1)
        for j in spans:
            if j >= best:
                break
            base, span = d * 10 ** j, 10 ** j
            if bounds[2] is not None and base > bounds[2]:
                break  # larger j only moves further up
            if _hit(Fraction(base), False, Fraction(base + span - 1), False, bounds, int_step):
                best = min(best, j)
                break
            if is_int or not _hit(Fraction(base), False, Fraction(base + span), True, bounds, Fraction(1, 10 ** MAX_DIGITS)):
                continue
            for f in range(1, MAX_DIGITS + 1):
                if j + 1 + f >= best:
                    break
                if _hit(Fraction(base), False, Fraction(base + span), True, bounds, frac_step(f)):
                    best = j + 1 + f
                    break
        return best
    f0 = len(frac)
    v = Fraction(int(int_part + frac), 10 ** f0)
    if f0 and _hit(v, False, v, False, bounds, frac_step(f0)):
        return 0
    for f in range(1, MAX_DIGITS - f0 + 1):
        if _hit(v, False, v + Fraction(1, 10 ** f0), True, bounds, frac_step(f0 + f)):
            return f
    return INF


# --------------------------------------------------------------------------- tokens


class TokenVocab:
    """The text of every token, for constraint checks. Tokens that decode to a
    partial UTF-8 character (U+FFFD) or are special have no text (never allowed
    inside JSON); special tokens keep theirs in ``special`` (id -> text), so a
    ChoiceGrammar's prefix or suffix can ask for them; EOS ids are allowed once
    the value is complete."""

    def __init__(self, texts: Sequence[str | None], eos_ids: Sequence[int], special: dict[int, str] | None = None) -> None:
        self.texts = list(texts)
        self.eos_ids = list(eos_ids)
        self.eos = frozenset(self.eos_ids)
        self.special = {i: t for i, t in (special or {}).items() if i not in self.eos}
        self.size = len(self.texts)
        self._trie: dict | None = None
        self._content: tuple[torch.Tensor, list[int]] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], special_ids: Sequence[int] = ()) -> "TokenVocab":
        special = set(special_ids) | set(eos_ids)
        texts: list[str | None] = []
        special_texts: dict[int, str] = {}
        for i in range(vocab_size):
            try:
                t = tokenizer.decode([i])
            except Exception:  # ids past the tokenizer's vocabulary (padded embedding rows)
                t = None
            if i in special:
                texts.append(None)
                if t:
                    special_texts[i] = t
                continue
            texts.append(t if t and "\ufffd" not in t else None)
        return cls(texts, eos_ids, special_texts)

    def string_content(self) -> tuple[torch.Tensor, list[int]]:
        """(length of every token that is plain string content, -1 for the others; the ids of the
        tokens with text that holds a quote, a backslash or a control character)."""
        if self._content is None:
            with self._lock:
                if self._content is None:
                    lengths, others = [], []
                    for i, t in enumerate(self.texts):
                        if t is None:
                            lengths.append(-1)
                        elif any(c in '"\\' or c < " " or ord(c) >= SPECIAL_BASE for c in t):
                            lengths.append(-1)
                            others.append(i)
                        else:
                            lengths.append(len(t))
                    self._content = (torch.tensor(lengths, dtype=torch.long), others)
        return self._content

    def trie(self) -> dict:
        """A character trie of the token texts (built once per vocabulary)."""
        if self._trie is None:
            with self._lock:
                if self._trie is None:
                    root: dict = {}
                    for i, t in enumerate(self.texts):
                        if t is None:
                            continue
                        node = root
                        for ch in t:
                            node = node.setdefault(ch, {})
                        node.setdefault(None, []).append(i)
                    _heights(root)
                    self._trie = root
        return self._trie


def _heights(root: dict) -> None:
    """Store under key 0 of every trie node the most characters below it (iteratively: tokens can be long)."""
    order, todo = [], [root]
    while todo:
        node = todo.pop()
        order.append(node)
        todo.extend(child for ch, child in node.items() if isinstance(ch, str))
    for node in reversed(order):
        node[0] = max((child[0] + 1 for ch, child in node.items() if isinstance(ch, str)), default=0)


class TokenConstraint:
    """The constraint for one sequence being decoded under ``grammar`` (a SchemaGrammar or ChoiceGrammar).

    ``remaining`` (the tokens left before max_tokens, this one included) makes
    a step budget-aware: a token is allowed only if the value can still be
    closed in ``remaining - 1`` tokens, counting one character per token, so
    the value always closes within max_tokens when max_tokens is at least
    ``grammar.min_length()``.
    """

    def __init__(self, grammar: SchemaGrammar, vocab: TokenVocab) -> None:
        self.grammar = grammar
        self.vocab = vocab
        self.state = grammar.initial()
        self.text = ""
        self._symbols: dict[int, str] = {}  # special token id -> the grammar's symbol for its text
        for i, t in vocab.special.items():
            if t in grammar.specials:
                self._symbols[i] = grammar.specials[t]
        missing = set(grammar.specials) - {vocab.special[i] for i in self._symbols}
        if missing:
            raise ValueError(f"the grammar needs special tokens the vocabulary lacks: {sorted(missing)}")

    @property
    def complete(self) -> bool:
        """The value is finished and nothing may follow: only EOS remains."""
        return self.grammar.accepting(self.state) and not self.grammar.can_continue(self.state)

    @property
    def closing_cost(self) -> int:
        """The fewest characters that still complete the value."""
        return self.grammar.closing_cost(self.state)

    def _symbol(self, token_id: int) -> str | None:
        if 0 <= token_id < self.vocab.size and self.vocab.texts[token_id] is not None:
            return self.vocab.texts[token_id]
        return self._symbols.get(token_id)

    def allows(self, token_id: int, remaining: int | None = None) -> bool:
        if token_id in self.vocab.eos:
            return self.grammar.accepting(self.state)
        sym = self._symbol(token_id)
        if sym is None:
            return False
        nxt = self.grammar.advance(self.state, sym)
        return bool(nxt) and self.grammar.closing_cost(nxt) <= _limit(remaining)

    def accept(self, token_id: int) -> None:
        if token_id in self.vocab.eos:
            return
        sym = self._symbol(token_id)
        if sym is None:
            raise ValueError(f"token {token_id} has no text the grammar can take")
        state = self.grammar.advance(self.state, sym)
        live = frozenset(s for s in state if self.grammar._stack_cost(s) < INF)
        self.state = live or state
        self.text += self.vocab.texts[token_id] if self.vocab.texts[token_id] is not None else self.vocab.special[token_id]

    def mask(self, remaining: int | None = None) -> torch.Tensor:
        """Bool [vocab] of every allowed token (a trie walk over the vocabulary)."""
        g = self.grammar
        limit = _limit(remaining)
        if len(self.state) == 1:
            (stack,) = self.state
            if stack[-1][0] == "S":
                return self._string_mask(stack, remaining, limit)
        allowed = torch.zeros(self.vocab.size, dtype=torch.bool)
        ids: list[int] = []
        todo = [(self.vocab.trie(), self.state)]
        # one character lowers the closing cost by at most one, so with a budget a subtree whose deepest
        # token cannot bring the cost within the limit is skipped
        budget = remaining is not None
        while todo:
            node, state = todo.pop()
            for ch, child in node.items():
                if ch is None:
                    if g.closing_cost(state) <= limit:
                        ids.extend(child)
                    continue
                if ch == 0:
                    continue
                nxt = g.step(state, ch)
                if nxt and not (budget and g.closing_cost(nxt) - child[0] > limit):
                    todo.append((child, nxt))
        for i, sym in self._symbols.items():
            nxt = g.step(self.state, sym)
            if nxt and g.closing_cost(nxt) <= limit:
                ids.append(i)
        if ids:
            allowed[torch.tensor(ids)] = True
        if g.accepting(self.state):
            allowed[torch.tensor(self.vocab.eos_ids, dtype=torch.long)] = True
        return allowed

    def _string_mask(self, stack: Stack, remaining: int | None, limit: int) -> torch.Tensor:
        """The mask inside a plain string (one stack): every token of plain content that fits the length
        and the budget at once, the few tokens with a quote, backslash or control character one by one."""
        _, lo, hi, n = stack[-1]
        rest = self.grammar._stack_cost(stack[:-1])
        lengths, others = self.vocab.string_content()
        allowed = (lengths > 0) & (lengths <= hi - n)
        if remaining is not None:
            allowed &= rest + (lo - n - lengths).clamp(min=0) + 1 <= limit
        for i in others:
            if self.allows(i, remaining):
                allowed[i] = True
        for i in self._symbols:
            if self.allows(i, remaining):
                allowed[i] = True
        return allowed  # a string is never a complete value: no EOS

    def choose(self, logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
               remaining: int | None = None, *, tries: int = 16) -> int:
        """Pick the next token from [vocab] logits under the constraint.

        Greedy: the best allowed token among the top ``tries`` candidates.
        Sampling: ``tries`` independent draws, the first allowed one wins
        (exact rejection sampling of the constrained nucleus distribution).
        Both fall back to the full mask when no candidate passes.
        ``remaining``: tokens left before max_tokens (None: no budget).
        """
        logits = logits.float()
        if remaining is not None:
            remaining = max(remaining, self.closing_cost)  # a budget that cannot be met: the shortest way to close
        seen: dict[int, bool] = {}

        def ok(tok: int) -> bool:
            if tok not in seen:
                seen[tok] = self.allows(tok, remaining)
            return seen[tok]

        if temperature <= 0:
            top = torch.topk(logits, min(tries, logits.numel())).indices.tolist()
            for tok in top:
                if ok(tok):
                    return tok
            return int(torch.where(self._full_mask(remaining), logits, torch.tensor(float("-inf"))).argmax())
        probs = sampling_probs(logits, temperature, top_p)
        for tok in torch.multinomial(probs, tries, replacement=True, generator=generator).tolist():
            if ok(tok):
                return tok
        allowed = self._full_mask(remaining)
        constrained = probs * allowed
        if float(constrained.sum()) <= 0:  # nothing allowed inside the nucleus: the whole distribution
            constrained = sampling_probs(logits, temperature) * allowed
        if float(constrained.sum()) <= 0:  # the model puts no mass on any allowed token
            constrained = allowed.float()
        return int(torch.multinomial(constrained, 1, generator=generator))


    def _full_mask(self, remaining: int | None) -> torch.Tensor:
        allowed = self.mask(remaining)
        if not bool(allowed.any()) and remaining is not None:
            allowed = self.mask(None)  # no single-character way to close in this vocabulary: drop the budget
        if not bool(allowed.any()):
            raise RuntimeError(f"no token of the vocabulary continues the constrained output after {self.text!r}")
        return allowed


def _limit(remaining: int | None) -> int:
    return INF - 1 if remaining is None else remaining - 1
