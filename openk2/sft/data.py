"""SFT data (K2 report §3.1): conversations from several sources, rendered with the loss mask, packed.

Sources, mixed by weight (``SFTConfig.sources``: name -> weight):

| source | what |
|---|---|
| a path to a ``.jsonl`` file | OpenAI-style conversations, one per line: ``{"messages": [...], "tools": [...]}`` (``tools`` optional; what ``openk2 synth`` writes, tool-call ids ``functions.NAME:IDX``) |
| ``bfcl`` | BFCL's single-call questions (PyPI ``bfcl-eval``: simple_python, multiple, live_simple) with their function docs and the ground-truth call as the assistant's tool call |
| ``math`` | reasoning-gym ``gsm_symbolic`` problems with their worked solutions (generated offline from a seed) |

Every conversation goes to the held-out split or to training by a hash of its source and id
(``val_fraction``), so the split does not depend on order or on the other sources.

Rendering is the chat format's own (``ChatFormat``): K2's template with its SFT loss mask
(``openk2.chat.render_segments``: only assistant content and its ``<|im_end|>`` carry loss), or
for a transformers model its own Jinja template with openk2's tool prompt, the format
``openk2 serve`` prompts that model with (``openk2.chat.jinja_segments``).

Truncation never cuts inside a turn: a conversation longer than ``seq_len + 1`` tokens is cut
after its last assistant turn that fits (counted as ``truncated``), or dropped when not even its
first assistant turn fits (``dropped``); a tool call is always whole or absent.

Packing (``SFTDataset(pack=True)``): conversations are placed into rows of ``seq_len`` positions,
first-fit-decreasing within chunks of the seeded sample stream; every conversation keeps its own
positions (restarting at 0) and ``document_ids``, from which the model builds a block-diagonal
causal mask (``openk2.model.attention.packed_attention_mask``), so no token attends across a
conversation boundary. Unpacked, every row is one conversation padded to the batch's longest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openk2.data.bfcl import function_tool, gold_arguments, read_category
from openk2.errors import DataError
from openk2.model.loss import IGNORE_INDEX

BFCL_CATEGORIES = ("simple_python", "multiple", "live_simple")
BUILTIN_SOURCES = ("bfcl", "math")


@dataclass
class Conversation:
    """One OpenAI-style conversation: messages, optional tools, where it came from."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    source: str = ""
    id: str = ""

    def single_call_task(self) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        """(the messages before the first assistant tool call, that call) when the turn makes exactly one
        call: a held-out single-call task with its gold answer; else None."""
        for i, m in enumerate(self.messages):
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = m["tool_calls"]
                if len(calls) != 1 or not self.tools:
                    return None
                fn = calls[0].get("function", calls[0])
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        return None
                return [dict(x) for x in self.messages[:i]], {"name": fn["name"], "arguments": args}
        return None


# ------------------------------------------------------------------ sources
def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: message {i} needs a role of system, user, assistant or tool")
        for c in m.get("tool_calls") or []:
            fn = c.get("function", c) if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise DataError(f"{where}: message {i} has a tool call without a function name")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message (nothing to train on)")
    return messages


def load_jsonl(path: str | os.PathLike) -> list[Conversation]:
    """Conversations of an OpenAI-messages JSONL file; a malformed line is an error naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such SFT data file")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object with 'messages'")
            tools = row.get("tools")
            if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
                raise DataError(f"{where}: 'tools' must be a list of tool objects")
            out.append(Conversation(_check_messages(row.get("messages"), where), tools or None, str(p),
                                    str(row.get("id", n))))
    if not out:
        raise DataError(f"{p}: no conversations")
    return out


def bfcl_conversations(categories: Sequence[str] = BFCL_CATEGORIES) -> list[Conversation]:
    """BFCL single-call questions: the user turn(s), the declared functions, the gold call as the answer."""
    from openk2.chat import schema_errors

    out = []
    for cat in categories:
        for q, gold in read_category(cat):
            if not gold or len(gold) != 1 or len(q["question"]) != 1:
                continue  # single-call, single-turn items only
            (name, params), = gold[0].items()
            tools = [function_tool(f) for f in q["function"]]
            declared = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
            args = gold_arguments(params)
            if name not in declared or schema_errors(args, declared[name]):
                continue  # a gold call its own schema rejects (a few BFCL items): not a training target
            msgs = [dict(m) for m in q["question"][0]]
            msgs.append({"role": "assistant", "content": "",
                         "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]})
            out.append(Conversation(msgs, tools, "bfcl", q["id"]))
    return out


def math_conversations(count: int = 400, seed: int = 0) -> list[Conversation]:
    """reasoning-gym gsm_symbolic problems as (question, worked solution + answer) conversations."""
    from openk2.data.math_problems import RENDERERS, generator_seed

    try:
        import reasoning_gym
    except ModuleNotFoundError as e:
        raise DataError("SFT source 'math' needs reasoning-gym: pip install 'reasoning-gym>=0.1.25'") from e
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=generator_seed("gsm_symbolic", 1000 + seed))
    out = []
    for i, e in enumerate(ds):
        answer = "\n".join(RENDERERS["gsm_symbolic"](e)) + f"\n\nAnswer: {e['answer']}"
        out.append(Conversation([{"role": "user", "content": e["question"].strip()},
                                 {"role": "assistant", "content": answer}], None, "math", f"gsm_symbolic-{i}"))
    return out


def load_source(name: str, math_count: int = 400, seed: int = 0) -> list[Conversation]:
    if name == "bfcl":
        return bfcl_conversations()
    if name == "math":
        return math_conversations(math_count, seed)
    if name.endswith(".jsonl") or Path(name).is_file():
        return load_jsonl(name)
    raise DataError(f"SFT source {name!r}: not one of {', '.join(BUILTIN_SOURCES)} or a .jsonl file")


def is_held_out(conv: Conversation, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{conv.source}\0{conv.id}".encode()).digest()[:8], "big")
    return (h % 1_000_000) < val_fraction * 1_000_000


def split(convs: Sequence[Conversation], val_fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    train = [c for c in convs if not is_held_out(c, val_fraction)]
    val = [c for c in convs if is_held_out(c, val_fraction)]
    return train, val


# ----------------------------------------------------------------- rendering
class ChatFormat:
    """How conversations become tokens: K2's template (``"k2"``) or a transformers tokenizer's own template
    with openk2's tool prompt (``"hf"``, what ``openk2 serve`` uses for such a model)."""

    def __init__(self, tokenizer: Any, kind: str, template: str | None = None):
        from openk2.chat import DEFAULT_TEMPLATE

        if kind not in ("k2", "hf"):
            raise ValueError(f"chat format must be k2 or hf, got {kind!r}")
        self.tokenizer, self.kind = tokenizer, kind
        self.template = template or (DEFAULT_TEMPLATE if kind == "k2" else getattr(tokenizer, "chat_template", None))
        if kind == "hf" and not self.template:
            raise DataError("the transformers tokenizer has no chat template to render SFT conversations with")

    def segments(self, conv: Conversation):
        from openk2.chat import flatten_content, jinja_segments, render_segments, render_tool_messages

        msgs = flatten_content(conv.messages)
        if self.kind == "k2":
            return render_segments(msgs, conv.tools, template=self.template)
        return jinja_segments(self.template, render_tool_messages(msgs, conv.tools))

    def encode(self, conv: Conversation) -> tuple[list[int], list[int], list[int]]:
        """(ids, loss mask, token offsets where an assistant turn ends: the safe truncation points)."""
        ids: list[int] = []
        mask: list[int] = []
        ends: list[int] = []
        for seg in self.segments(conv):
            seg_ids = list(self.tokenizer.encode(seg.text, add_special_tokens=False))
            ids.extend(seg_ids)
            mask.extend([int(seg.train)] * len(seg_ids))
            if seg.train:
                ends.append(len(ids))
        return ids, mask, ends


@dataclass
class Example:
    """One encoded conversation: inputs ids[:-1] predict ids[1:] where mask[1:] is 1."""

    ids: np.ndarray
    mask: np.ndarray
    source: str

    @property
    def positions(self) -> int:
        return len(self.ids) - 1

    @property
    def loss_tokens(self) -> int:
        return int(self.mask[1:].sum())


@dataclass
class EncodeStats:
    conversations: int = 0
    truncated: int = 0  # cut after the last whole assistant turn that fits
    dropped: int = 0  # not even the first assistant turn fits
    failed: int = 0  # the renderer rejected the conversation (recorded, skipped)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"conversations": self.conversations, "truncated": self.truncated, "dropped": self.dropped,
                "failed": self.failed, "failures": self.failures[:10]}


def encode_all(fmt: ChatFormat, convs: Sequence[Conversation], seq_len: int,
               stats: EncodeStats | None = None) -> list[Example]:
    """Encode and truncate (at turn boundaries only) conversations for rows of `seq_len` positions."""
    stats = stats if stats is not None else EncodeStats()
    out = []
    limit = seq_len + 1  # tokens of one conversation: seq_len input positions
    for c in convs:
        stats.conversations += 1
        try:
            ids, mask, ends = fmt.encode(c)
        except (ValueError, KeyError, TypeError) as e:
            stats.failed += 1
            stats.failures.append(f"{c.source}:{c.id}: {e}")
            continue
        if len(ids) > limit:
            fit = [e for e in ends if e <= limit]
            if not fit:
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, mask = ids[: fit[-1]], mask[: fit[-1]]
        if sum(mask[1:]) == 0:
            stats.dropped += 1
            continue
        out.append(Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8), c.source))
    return out


# ------------------------------------------------------------------- batches
def collate(rows: list[list[Example]], pad_id: int, seq_len: int | None, documents: bool = True
            ) -> dict[str, torch.Tensor]:
    """Rows of examples -> input_ids, labels (IGNORE_INDEX off the loss), position_ids, document_ids [B, T],
    real_mask (False on padding).

    `seq_len` None pads to the longest row; every example gets its own document id and positions from
    0; padding is a document of its own with no loss. `documents=False` (one example per row, padding
    after it: plain causal attention is already confined) leaves out document_ids.
    """
    T = seq_len if seq_len is not None else max(sum(e.positions for e in r) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    doc = torch.zeros((B, T), dtype=torch.long)
    real = torch.zeros((B, T), dtype=torch.bool)
    for b, row in enumerate(rows):
        at = 0
        for d, e in enumerate(row):
            n = e.positions
            ids[b, at:at + n] = torch.from_numpy(e.ids[:-1])
            lab = torch.from_numpy(e.ids[1:].copy())
            lab[torch.from_numpy(e.mask[1:] == 0)] = IGNORE_INDEX
            labels[b, at:at + n] = lab
            pos[b, at:at + n] = torch.arange(n)
            doc[b, at:at + n] = d
            real[b, at:at + n] = True
            at += n
        if at < T:
            pos[b, at:] = torch.arange(T - at)
            doc[b, at:] = len(row)
    out = {"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": doc, "real_mask": real}
    if not documents:
        if any(len(r) > 1 for r in rows):
            raise ValueError("collate: rows of several examples need document_ids")
        del out["document_ids"]
    return out


def pack_first_fit(examples: Sequence[Example], seq_len: int) -> list[list[Example]]:
    """First-fit-decreasing bin packing into rows of `seq_len` positions (order within a row: as placed)."""
    order = sorted(range(len(examples)), key=lambda i: -examples[i].positions)
    rows: list[list[Example]] = []
    free: list[int] = []
    for i in order:
        e = examples[i]
        for r, f in enumerate(free):
            if e.positions <= f:
                rows[r].append(e)
                free[r] -= e.positions
                break
        else:
            rows.append([e])
            free.append(seq_len - e.positions)
    return rows


class SFTDataset:
    """The trainer's loader: a seeded, resumable stream of SFT rows mixed from sources by weight.

    Sample i draws a source by weight (seeded per block of samples) and that source's next example of
    a per-epoch permutation. Samples are taken ``chunk`` at a time; a chunk becomes rows (packed
    first-fit-decreasing, or one example per row) in a seeded random order; global batch b is rows
    [bB, (b+1)B) and rank r of W takes its B/W rows. The state is the next row: a resumed run (on any
    number of ranks) continues the same stream.
    """

    def __init__(self, examples: dict[str, list[Example]], weights: dict[str, float], seq_len: int,
                 pad_id: int, pack: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 chunk: int = 256):
        self.sources = [s for s in examples if weights.get(s, 0) > 0 and examples[s]]
        if not self.sources:
            raise DataError("SFT data: no source with weight > 0 has any training example")
        w = np.array([float(weights[s]) for s in self.sources])
        self.probs = w / w.sum()
        self.examples, self.seq_len, self.pad_id, self.pack = examples, seq_len, pad_id, pack
        self.seed, self.rank, self.world_size, self.chunk = seed, rank, world_size, chunk
        self.next_row = 0
        self._rows: list[list[Example]] = []
        self._drawn = {s: 0 for s in self.sources}
        self._samples = 0

    def _perm(self, source: str, epoch: int) -> np.ndarray:
        code = int.from_bytes(hashlib.sha256(f"{self.seed}:{source}:{epoch}".encode()).digest()[:4], "big")
        return np.random.default_rng(code).permutation(len(self.examples[source]))

    def _extend(self) -> None:
        rng = np.random.default_rng([self.seed, self._samples // self.chunk, 7])
        picks = rng.choice(len(self.sources), size=self.chunk, p=self.probs)
        chunk = []
        for k in picks:
            s = self.sources[int(k)]
            n = len(self.examples[s])
            i = self._drawn[s]
            chunk.append(self.examples[s][int(self._perm(s, i // n)[i % n])])
            self._drawn[s] += 1
        self._samples += self.chunk
        rows = pack_first_fit(chunk, self.seq_len) if self.pack else [[e] for e in chunk]
        # first-fit-decreasing leaves rows sorted by length: shuffle them, so batches mix long and short
        self._rows += [rows[int(i)] for i in rng.permutation(len(rows))]

    def row(self, i: int) -> list[Example]:
        while len(self._rows) <= i:
            self._extend()
        return self._rows[i]

    def batches(self, global_batch: int) -> Iterator[dict[str, torch.Tensor]]:
        if global_batch % self.world_size:
            raise DataError(f"batch of {global_batch} rows does not split over {self.world_size} ranks")
        per = global_batch // self.world_size
        while True:
            rows = [self.row(self.next_row + j) for j in range(global_batch)]
            self.next_row += global_batch
            mine = rows[self.rank * per:(self.rank + 1) * per]
            # unpacked: pad to the global batch's longest row, so every rank has one shape
            T = self.seq_len if self.pack else max(sum(e.positions for e in r) for r in rows)
            yield collate(mine, self.pad_id, T, documents=self.pack)

    def state_dict(self) -> dict:
        return {"next_row": self.next_row, "pack": self.pack, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("pack", self.pack) != self.pack:
            raise DataError("the checkpoint was trained with packing " + ("on" if state["pack"] else "off"))
        self.next_row = int(state["next_row"])


def fixed_batches(examples: Sequence[Example], seq_len: int, pad_id: int, batch_rows: int,
                  pack: bool = True) -> list[dict[str, torch.Tensor]]:
    """Every example once, in batches (held-out evaluation)."""
    rows = pack_first_fit(examples, seq_len) if pack else [[e] for e in examples]
    out = []
    for i in range(0, len(rows), batch_rows):
        out.append(collate(rows[i:i + batch_rows], pad_id, seq_len if pack else None, documents=pack))
    return out


def token_stats(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Positions computed, real (non-padding) tokens and loss-carrying tokens of a batch."""
    return {"positions": int(batch["input_ids"].numel()), "real_tokens": int(batch["real_mask"].sum()),
            "loss_tokens": int((batch["labels"] != IGNORE_INDEX).sum())}


def mixture_counts(examples: dict[str, list[Example]]) -> dict[str, dict[str, float]]:
    return {s: {"examples": len(v), "loss_tokens": int(sum(e.loss_tokens for e in v)),
                "mean_tokens": round(float(np.mean([len(e.ids) for e in v])) if v else 0.0, 1)}
            for s, v in examples.items()}


__all__ = ["BFCL_CATEGORIES", "ChatFormat", "Conversation", "EncodeStats", "Example", "SFTDataset",
           "bfcl_conversations", "collate", "encode_all", "fixed_batches", "is_held_out", "load_jsonl",
           "load_source", "math_conversations", "mixture_counts", "pack_first_fit", "split", "token_stats"]
