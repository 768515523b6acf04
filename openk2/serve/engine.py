"""Batched decoding for serving: one loop, many requests, each with its own sampling settings.

:class:`DecodeBatch` prefills a left-padded batch, then decodes one token per
row per step; rows that finish (a stop token, a stop string, max_tokens, a
completed JSON value, a cancelled client) leave the KV cache at once, so the
batch shrinks instead of carrying dead rows, and new rows can join between
steps (continuous batching) when the backend merges KV caches.

:class:`Engine` runs that loop on a background thread for the HTTP server;
:func:`generate_batch` runs it to the end for in-process callers.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from openk2.errors import OpenK2Error
from openk2.model.sampling import sample_next


class EngineClosed(OpenK2Error):
    """The engine is shutting down and takes no new requests."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    json_schema: dict[str, Any] | None = None
    banned_ids: Sequence[int] = ()  # never sampled (e.g. the tool-call section under tool_choice="none")
    ignore_eos: bool = False  # decode exactly max_tokens (benchmarks; vLLM's extension of the API)
    # a compiled grammar (openk2.serve.constrained: SchemaGrammar, ChoiceGrammar...) the output must match;
    # json_schema is compiled into one (cached) when grammar is None
    grammar: Any = None
    logprobs: bool = False  # record each sampled token's log-probability (model distribution, temperature 1)
    top_logprobs: int = 0  # and the k most likely tokens' (0-20)


@dataclass
class GenRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # called on the engine thread after each new token (and once more at the end with None)
    on_token: Callable[["GenRequest", int | None], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    # with params.logprobs: log p(token) of each output token (and of stop_token, last); with top_logprobs=k,
    # the k most likely (token id, log p) at each of those positions
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""  # decoded output so far (special tokens kept)
    finish_reason: str | None = None  # stop | length | cancelled | error
    stop_token: int | None = None  # the stop token that ended it (sampled, not in output_ids)
    error: str | None = None
    cancelled: bool = False
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _constraint: Any = None
    _generator: torch.Generator | None = None

    def wait(self, timeout: float | None = None) -> "GenRequest":
        self.done.wait(timeout)
        return self


def _finish(req: GenRequest, reason: str) -> None:
    req.finish_reason = reason
    req.finished_at = time.perf_counter()
    if req.on_token is not None:
        try:
            req.on_token(req, None)
        except Exception:  # a consumer's callback must not take the batch down
            pass
    req.done.set()


def _hit_stop_string(req: GenRequest) -> bool:
    for s in req.params.stop:
        if s and s in req.text:
            req.text = req.text[: req.text.index(s)]
            return True
    return False


class DecodeBatch:
    """The rows being decoded together and their KV cache.

    ``add`` prefills new requests and, when the backend can merge caches,
    joins them to the running rows (continuous batching); ``step`` samples one
    token for every row, retires finished rows and runs one decode forward.
    """

    def __init__(self, chat_model: Any) -> None:
        self.chat_model = chat_model
        self.backend = chat_model.backend
        self.stop_ids = set(chat_model.stop_ids)
        self.live: list[GenRequest] = []
        self.state: Any = None
        self.logits: torch.Tensor | None = None

    @property
    def can_join(self) -> bool:
        """New rows may join a running batch (else they wait for it to drain)."""
        return not self.live or hasattr(self.backend, "merge")

    def add(self, requests: Sequence[GenRequest]) -> None:
        from openk2.serve.constrained import SchemaGrammar, TokenConstraint

        new = []
        for r in requests:
            if r.cancelled:
                _finish(r, "cancelled")
                continue
            try:
                if r.params.seed is not None:
                    r._generator = torch.Generator().manual_seed(int(r.params.seed))
                if r.params.json_schema is not None:
                    r._constraint = TokenConstraint(SchemaGrammar(r.params.json_schema), self.chat_model.token_vocab())
            except Exception as e:  # e.g. a schema the constraint compiler rejects
                r.error = f"{type(e).__name__}: {e}"
                _finish(r, "error")
                continue
            new.append(r)
        if not new:
            return
        try:
            logits, state = self.backend.prefill([r.prompt_ids for r in new], max(r.params.max_tokens for r in new))
        except Exception as e:  # e.g. out of memory: fail these requests, keep serving the others
            for r in new:
                r.error = f"{type(e).__name__}: {e}"
                _finish(r, "error")
            return
        if self.live:
            self.state = self.backend.merge(self.state, state)
            self.logits = torch.cat([self.logits, logits])
        else:
            self.state, self.logits = state, logits
        self.live.extend(new)

    def _next_token(self, r: GenRequest, logits: torch.Tensor) -> int:
        p = r.params
        if p.banned_ids:
            logits = logits.index_fill(0, torch.tensor(list(p.banned_ids), dtype=torch.long), float("-inf"))
        if r._constraint is not None:
            tok = r._constraint.choose(logits, p.temperature, p.top_p, r._generator)
            r._constraint.accept(tok)
            return tok
        return int(sample_next(logits, p.temperature, p.top_p, r._generator))

    def step(self) -> None:
        tokens, keep = [], []
        for row, r in enumerate(self.live):
            if r.cancelled:
                _finish(r, "cancelled")
                continue
            tok = self._next_token(r, self.logits[row])
            if r.first_token_at is None:
                r.first_token_at = time.perf_counter()
            if tok in self.stop_ids and not r.params.ignore_eos:
                r.stop_token = tok
                _finish(r, "stop")
                continue
            r.output_ids.append(tok)
            r.text = self.chat_model.decode(r.output_ids)
            hit_stop = _hit_stop_string(r)  # before on_token, so a stream never shows the stop string
            if r.on_token is not None:
                r.on_token(r, tok)
            if hit_stop or (r._constraint is not None and r._constraint.complete):
                _finish(r, "stop")
            elif len(r.output_ids) >= r.params.max_tokens:
                _finish(r, "length")
            else:
                tokens.append(tok)
                keep.append(row)
        if not keep:
            self.live, self.state, self.logits = [], None, None
            return
        if len(keep) < len(self.live):
            self.state = self.backend.select(self.state, torch.tensor(keep, dtype=torch.long))
        self.live = [self.live[i] for i in keep]
        try:
            self.logits = self.backend.decode(self.state, torch.tensor(tokens, dtype=torch.long))
        except Exception as e:
            self.fail(e)

    def fail(self, e: Exception) -> None:
        for r in self.live:
            if not r.done.is_set():
                r.error = f"{type(e).__name__}: {e}"
                _finish(r, "error")
        self.live, self.state, self.logits = [], None, None


def generate_batch(chat_model: Any, requests: Sequence[GenRequest]) -> None:
    """Decode every request to its end (fills output_ids, text, finish_reason)."""
    batch = DecodeBatch(chat_model)
    batch.add(requests)
    while batch.live:
        batch.step()


class Engine:
    """A background thread that decodes queued requests in one :class:`DecodeBatch`.

    Requests join the running batch between decode steps (continuous batching)
    when the backend can merge KV caches; otherwise they wait until it drains.
    After a cold start the engine waits ``batch_window_s`` for company.
    """

    def __init__(self, chat_model: Any, max_batch_size: int = 16, batch_window_s: float = 0.005) -> None:
        self.chat_model = chat_model
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self._queue: queue.Queue[GenRequest | None] = queue.Queue()
        self._closed = False
        self._batch = DecodeBatch(chat_model)
        self._thread = threading.Thread(target=self._run, name="openk2-engine", daemon=True)
        self.stats = {"batches": 0, "requests": 0, "generated_tokens": 0, "max_batch": 0}
        self._thread.start()

    def submit(self, req: GenRequest) -> GenRequest:
        if self._closed:
            raise EngineClosed("the server is shutting down")
        self._queue.put(req)
        return req

    def generate(self, req: GenRequest, timeout: float | None = None) -> GenRequest:
        return self.submit(req).wait(timeout)

    @property
    def pending(self) -> int:
        """Requests waiting for a batch (not counting the running one)."""
        return self._queue.qsize()

    def _take(self, block: bool, room: int) -> tuple[list[GenRequest], bool]:
        """Up to ``room`` queued requests (waiting for the first one if ``block``); True if told to stop."""
        got: list[GenRequest] = []
        deadline = None
        while len(got) < room:
            try:
                if block and not got:
                    item = self._queue.get()
                    deadline = time.perf_counter() + self.batch_window_s
                elif deadline is not None and (left := deadline - time.perf_counter()) > 0:
                    item = self._queue.get(timeout=left)  # the collection window after a cold start
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return got, True
            got.append(item)
        return got, False

    @property
    def running(self) -> int:
        """Requests being decoded right now."""
        return len(self._batch.live)

    def _run(self) -> None:
        batch = self._batch
        stopping = False
        while True:
            if not batch.live and stopping:
                return
            new: list[GenRequest] = []
            if not stopping and batch.can_join:
                new, stopping = self._take(block=not batch.live, room=self.max_batch_size - len(batch.live))
            try:
                if new:
                    batch.add(new)
                    self.stats["requests"] += len(new)
                    self.stats["batches"] += 0 if len(batch.live) > len(new) else 1
                    self.stats["max_batch"] = max(self.stats["max_batch"], len(batch.live))
                if batch.live:
                    before = sum(len(r.output_ids) for r in batch.live)
                    rows = list(batch.live)
                    batch.step()
                    self.stats["generated_tokens"] += sum(len(r.output_ids) for r in rows) - before
            except Exception as e:  # never leave a waiting client hanging
                batch.fail(e)
                for r in new:
                    if not r.done.is_set():
                        r.error = f"{type(e).__name__}: {e}"
                        _finish(r, "error")

    def close(self, timeout: float | None = 30.0) -> None:
        """Take no new requests, finish the queued and running ones, stop the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
