"""openk2's one generation loop: continuous batching over a row-slot KV cache.

:class:`Scheduler` owns a :class:`~openk2.model.kv_cache.KVCache` of ``max_batch_size + 1``
rows (the decoding rows, compacted at the front, and one staging row where prompts are
prefilled). Each :meth:`Scheduler.step`:

1. prefills up to ``prefill_chunk`` prompt tokens (a long prompt takes several steps, so
   running streams never freeze for a whole prompt), starting from the longest cached
   prefix of the prompt when one exists (a prompt another request is decoding from, or
   one kept in the prefix store), and computes logits for the last position only.
   Up to ``max_prefills`` prompts are prefilled at once, each in its own staging row, and
   share the step's budget shortest-remaining first (the one that has waited longest keeps
   at least a quarter), so a short prompt that arrives during a long prompt's prefill gets
   its first token within a step or two instead of after the whole long prompt;
   a finished prompt moves into a free decoding row, together with every queued request
   that has the same prompt (``n > 1``, RL's K samples of one prompt): one prefill;
2. decodes one token for every running row in one forward pass; a row whose request
   finished (stop token or string, max_tokens, the context, a closed JSON value, a
   cancelled client, an error) leaves at once and its memory goes to the next request.

Requests are isolated: bad parameters are rejected before they enter (:func:`prepare`),
anything that fails while one request is sampled fails that request alone, and when a
decode forward over several rows fails, the rows are retried one at a time so that only
the request whose row fails again is failed.

:class:`Engine` runs the scheduler on a background thread for the HTTP server;
:func:`generate_batch` runs it to the end in the caller's thread (pipelines, RL rollouts).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from openk2.errors import OpenK2Error
from openk2.model.sampling import sample_next


class EngineClosed(OpenK2Error):
    """The engine is shutting down and takes no new requests."""


class InvalidRequest(OpenK2Error, ValueError):
    """A request the engine cannot run (its message names the parameter)."""


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
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not recomputed)
    done: threading.Event = field(default_factory=threading.Event)
    _constraint: Any = None
    _generator: torch.Generator | None = None
    _prepared: bool = False
    _pending: int | None = None  # the last sampled token, fed at the next decode step
    _done_prefill: int = 0
    _row: int = -1  # the staging row while the prompt is prefilled
    _ids_np: Any = None  # prompt_ids as an int64 array (prefix matching), made once when the prefill starts
    _text_from: int = 0  # incremental detokenisation: output_ids[_text_from:_text_read] decode to the text's tail
    _text_read: int = 0

    def wait(self, timeout: float | None = None) -> "GenRequest":
        self.done.wait(timeout)
        return self


def _finish(req: GenRequest, reason: str, error: str | None = None) -> None:
    if req.done.is_set():
        return
    req.finish_reason = reason
    if error is not None:
        req.error = error
    req.finished_at = time.perf_counter()
    if req.on_token is not None:
        try:
            req.on_token(req, None)
        except Exception:  # a consumer's callback must not take the batch down
            pass
    req.done.set()


def prepare(req: GenRequest, chat_model: Any) -> GenRequest:
    """Check a request's parameters and compile its grammar (in the caller's thread, before it is queued).

    Raises :class:`InvalidRequest` naming what is wrong.
    """
    if req._prepared:
        return req
    p, backend = req.params, chat_model.backend
    ids = req.prompt_ids
    if not ids:
        raise InvalidRequest("the prompt is empty")
    if any((not isinstance(t, int)) or isinstance(t, bool) or not 0 <= t < backend.vocab_size for t in ids):
        raise InvalidRequest(f"prompt token ids must be integers in [0, {backend.vocab_size})")
    if len(ids) >= backend.max_context:
        raise InvalidRequest(f"the prompt has {len(ids)} tokens; the model's context is {backend.max_context}")
    if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {p.max_tokens!r}")
    if not (isinstance(p.temperature, (int, float)) and math.isfinite(p.temperature) and p.temperature >= 0):
        raise InvalidRequest(f"temperature must be a finite number >= 0, got {p.temperature!r}")
    if not (isinstance(p.top_p, (int, float)) and math.isfinite(p.top_p) and 0 < p.top_p <= 1):
        raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p!r}")
    if not 0 <= int(p.top_logprobs) <= 20:
        raise InvalidRequest(f"top_logprobs must be between 0 and 20, got {p.top_logprobs!r}")
    if any((not isinstance(t, int)) or not 0 <= t < backend.vocab_size for t in p.banned_ids):
        raise InvalidRequest("banned token ids out of the vocabulary")
    try:
        if p.seed is not None:
            req._generator = torch.Generator().manual_seed(int(p.seed) % (2**63))
        grammar = p.grammar
        if grammar is None and p.json_schema is not None:
            from openk2.serve import constrained

            grammar = constrained.grammar_for(p.json_schema)
        if grammar is not None:
            from openk2.serve.constrained import TokenConstraint

            req._constraint = TokenConstraint(grammar, chat_model.token_vocab())
    except InvalidRequest:
        raise
    except Exception as e:  # e.g. a schema the constraint compiler rejects
        raise InvalidRequest(f"response format: {e}") from None
    req._prepared = True
    return req


class PrefixStore:
    """Recently prefilled prompts' KV (copies), least recently used first out, within a byte budget."""

    def __init__(self, max_bytes: int, min_tokens: int = 16) -> None:
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, dict[str, torch.Tensor], int]] = OrderedDict()
        self.nbytes = 0

    def wants(self, ids: Sequence[int], size: int) -> bool:
        """Would :meth:`put` keep this prompt (so its KV is worth copying)?"""
        return size <= self.max_bytes // 4 and len(ids) >= self.min_tokens and tuple(ids) not in self.entries

    def put(self, ids: Sequence[int], features: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in features.values())
        if not self.wants(ids, size):
            return
        key = tuple(ids)
        self.entries[key] = (np.asarray(ids, dtype=np.int64), features, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes and self.entries:
            _, (_, _, s) = self.entries.popitem(last=False)
            self.nbytes -= s

    def best(self, ids: np.ndarray) -> tuple[int, dict[str, torch.Tensor] | None]:
        """The longest stored prefix of ``ids``: (length, features) or (0, None)."""
        best_n, best_key = 0, None
        for key, (arr, _, _) in self.entries.items():
            n = _common_prefix(arr, ids)
            if n > best_n:
                best_n, best_key = n, key
        if best_key is None or best_n < self.min_tokens:
            return 0, None
        self.entries.move_to_end(best_key)
        return best_n, self.entries[best_key][1]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class Scheduler:
    """The decoding state: running rows, the prompt being prefilled, the waiting queue."""

    def __init__(self, chat_model: Any, max_batch_size: int = 16, prefill_chunk: int | None = None,
                 prefix_cache_mb: float = 256.0, max_prefills: int = 4) -> None:
        self.chat_model = chat_model
        self.backend = chat_model.backend
        self.stop_ids = set(chat_model.stop_ids)
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk or getattr(self.backend, "prefill_chunk", 256)
        self.max_prefills = max(1, min(max_prefills, max_batch_size))
        self.cache = self.backend.new_cache(max_batch_size + self.max_prefills, 256)
        # the rows where prompts are prefilled, after the decoding rows
        self.free_staging: list[int] = list(range(max_batch_size + self.max_prefills - 1, max_batch_size - 1, -1))
        self.decoding: list[GenRequest] = []  # row i holds decoding[i]
        self.prefilling: list[GenRequest] = []  # in arrival order; each in its staging row (req._row)
        self.waiting: deque[GenRequest] = deque()
        self.prefix_store = PrefixStore(int(prefix_cache_mb * 2**20))
        self.stats = {"requests": 0, "generated_tokens": 0, "prefill_tokens": 0, "prefix_reused_tokens": 0,
                      "max_batch": 0, "steps": 0, "errors": 0}

    # ------------------------------------------------------------ queue
    def add(self, req: GenRequest) -> None:
        try:
            prepare(req, self.chat_model)
        except InvalidRequest as e:
            self.stats["errors"] += 1
            _finish(req, "error", str(e))
            return
        self.stats["requests"] += 1
        self.waiting.append(req)

    @property
    def busy(self) -> bool:
        return bool(self.decoding or self.prefilling or self.waiting)

    @property
    def running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    # ------------------------------------------------------------ one step
    def step(self) -> None:
        self.stats["steps"] += 1
        self._drop_cancelled()
        self._prefill(self.prefill_chunk if self.decoding else 4 * self.prefill_chunk)
        if self.decoding:
            self._decode()

    def _drop_cancelled(self) -> None:
        if any(r.cancelled for r in self.waiting):
            for r in [r for r in self.waiting if r.cancelled]:
                _finish(r, "cancelled")
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for r in [r for r in self.prefilling if r.cancelled]:
            self._end_prefill(r)
            _finish(r, "cancelled")

    def _end_prefill(self, r: GenRequest) -> None:
        """``r`` leaves the prefilling set; its staging row is free again."""
        self.prefilling.remove(r)
        self.cache.reset_row(r._row)
        self.free_staging.append(r._row)
        r._row = -1

    def _fill_staging(self) -> None:
        """Start waiting prompts in free staging rows, while they will find a decoding row.

        A prompt equal to one being prefilled waits for it (it joins that prefill's group)."""
        skipped: list[GenRequest] = []
        while (self.waiting and self.free_staging
               and len(self.decoding) + len(self.prefilling) < self.max_batch_size):
            r = self.waiting.popleft()
            if any(p.prompt_ids == r.prompt_ids for p in self.prefilling):
                skipped.append(r)
                continue
            self._start(r, self.free_staging.pop())
        self.waiting.extendleft(reversed(skipped))

    def _shares(self, budget: int) -> list[tuple[GenRequest, int]]:
        """How the step's prefill budget is split: shortest remaining prompt first, except that the
        prompt prefilling longest keeps at least a quarter of the budget (a stream of short prompts
        cannot starve a long one)."""
        left = {id(r): len(r.prompt_ids) - r._done_prefill for r in self.prefilling}
        give: dict[int, int] = {}
        oldest = self.prefilling[0]
        if len(self.prefilling) > 1:
            give[id(oldest)] = min(left[id(oldest)], max(1, budget // 4))
            budget -= give[id(oldest)]
        for r in sorted(self.prefilling, key=lambda r: left[id(r)]):
            more = min(left[id(r)] - give.get(id(r), 0), budget)
            if more > 0:
                give[id(r)] = give.get(id(r), 0) + more
                budget -= more
        return [(r, give[id(r)]) for r in list(self.prefilling) if give.get(id(r), 0) > 0]

    def _prefill(self, budget: int) -> None:
        while budget > 0:
            self._fill_staging()
            if not self.prefilling:
                return
            shares = self._shares(budget)
            for r, n in shares:
                todo = r.prompt_ids[r._done_prefill : r._done_prefill + n]
                budget -= len(todo)
                try:
                    logits = self.backend.forward(torch.tensor([todo], dtype=torch.long), self.cache.view(r._row, len(todo)))
                except Exception as e:  # e.g. out of memory on a huge prompt: this request fails, the rest go on
                    self._end_prefill(r)
                    self.stats["errors"] += 1
                    _finish(r, "error", f"prefill failed: {type(e).__name__}: {e}")
                    continue
                self.stats["prefill_tokens"] += len(todo)
                r._done_prefill += len(todo)
                if r._done_prefill == len(r.prompt_ids):
                    self._admit(r, logits[0])

    def _start(self, r: GenRequest, row: int) -> None:
        """Put a waiting request in staging row ``row``, reusing the longest cached prefix of its prompt."""
        ids = r._ids_np = np.asarray(r.prompt_ids, dtype=np.int64)
        limit = len(ids) - 1  # at least one prompt token is computed: its logits start the output
        best_n, src = 0, None
        for i, other in enumerate(self.decoding):
            n = _common_prefix(other._ids_np, ids)
            if n > best_n:
                best_n, src = n, i
        stored_n, features = self.prefix_store.best(ids)
        self.cache.reset_row(row)
        n = 0
        if max(best_n, stored_n) >= self.prefix_store.min_tokens:
            if best_n >= stored_n:
                n = min(best_n, limit)
                self.cache.copy_prefix(src, row, n)
            else:
                n = min(stored_n, limit)
                self.cache.store({k: t[:, :n] for k, t in features.items()}, row)
        r._done_prefill = n
        r.cached_prompt_tokens = n
        self.stats["prefix_reused_tokens"] += n
        r._row = row
        self.prefilling.append(r)

    def _admit(self, r: GenRequest, logits: torch.Tensor) -> None:
        """A prompt is prefilled: it and every waiting request with the same prompt start decoding."""
        staging = r._row
        n = len(r.prompt_ids)
        if self.prefix_store.wants(r.prompt_ids, n * self.cache.bytes_per_token()):
            self.prefix_store.put(r.prompt_ids, self.cache.snapshot(staging, n))
        group = [r]
        if self.waiting:
            same = [w for w in self.waiting if w.prompt_ids == r.prompt_ids]
            room = self.max_batch_size - len(self.decoding) - len(self.prefilling)
            for w in same[:room]:
                w.cached_prompt_tokens = n
                self.stats["prefix_reused_tokens"] += n
                group.append(w)
            if len(group) > 1:
                ids = {id(w) for w in group}
                self.waiting = deque(w for w in self.waiting if id(w) not in ids)
        for g in group:
            row = len(self.decoding)
            self.cache.copy_prefix(staging, row, n)
            g._ids_np = r._ids_np
            self.decoding.append(g)
        self._end_prefill(r)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(self.decoding))
        finished = [len(self.decoding) - len(group) + i for i, g in enumerate(group) if self._sample(g, logits)]
        self._retire(finished)

    def _decode(self) -> None:
        rows = self.decoding
        B = len(rows)
        ids = torch.tensor([[r._pending] for r in rows], dtype=torch.long)
        errors: dict[int, Exception] = {}
        try:
            logits = self.backend.forward(ids, self.cache.view(slice(0, B), 1))
        except Exception as e:
            # one forward serves every row: find the row(s) that fail on their own (a request's bad
            # state, a poisoned row of the cache) and fail only those; the others go on with this step
            logits, errors = None, {0: e}
            if B > 1:
                logits, errors = self._decode_singly(ids)
        # greedy rows without a constraint or banned ids: one argmax over the batch, not one per row
        plain = [r._constraint is None and not r.params.banned_ids and r.params.temperature <= 0 for r in rows]
        greedy = logits.argmax(-1).tolist() if logits is not None and sum(plain) > 1 else None
        finished = []
        for i, r in enumerate(rows):
            if i in errors:
                self.stats["errors"] += 1
                e = errors[i]
                _finish(r, "error", f"decode failed: {type(e).__name__}: {e}")
                finished.append(i)
            elif self._sample(r, logits[i], greedy[i] if greedy is not None and plain[i] else None):
                finished.append(i)
        self._retire(finished)

    def _decode_singly(self, ids: torch.Tensor) -> tuple[torch.Tensor | None, dict[int, Exception]]:
        """Decode each row alone (after a batched forward failed): logits [B, V] (a failed row's are
        zeros) and the exception of each row that failed."""
        out: list[torch.Tensor | None] = []
        errors: dict[int, Exception] = {}
        for i in range(ids.shape[0]):
            try:
                out.append(self.backend.forward(ids[i : i + 1], self.cache.view(i, 1))[0])
            except Exception as e:
                errors[i] = e
                out.append(None)
        good = next((t for t in out if t is not None), None)
        if good is None:
            return None, errors
        return torch.stack([t if t is not None else torch.zeros_like(good) for t in out]), errors

    def _retire(self, finished: list[int]) -> None:
        """Free the rows of finished requests, keeping the running rows at the front of the cache."""
        for i in sorted(finished, reverse=True):
            last = len(self.decoding) - 1
            if i != last:
                self.cache.move_row(last, i)
                self.decoding[i] = self.decoding[last]
            self.cache.reset_row(last)
            self.decoding.pop()
        if finished and self.cache.capacity > 4 * self.cache.block and self.cache.capacity > 2 * (self.cache.length + self.cache.block):
            self.cache.trim()

    # ------------------------------------------------------------ sampling
    def _sample(self, r: GenRequest, logits: torch.Tensor, greedy: int | None = None) -> bool:
        """Sample the next token of ``r`` (``greedy``: its argmax, already taken for the batch); True when
        the request is finished (its row can go)."""
        if r.cancelled:
            _finish(r, "cancelled")
            return True
        try:
            return self._sample_token(r, logits, greedy)
        except Exception as e:  # a constraint or a callback that fails fails its own request only
            self.stats["errors"] += 1
            _finish(r, "error", f"{type(e).__name__}: {e}")
            return True

    def _sample_token(self, r: GenRequest, logits: torch.Tensor, greedy: int | None = None) -> bool:
        p = r.params
        raw = logits
        if p.banned_ids:
            logits = logits.index_fill(0, torch.tensor(list(p.banned_ids), dtype=torch.long), float("-inf"))
        remaining = p.max_tokens - len(r.output_ids)
        if greedy is not None:
            tok = greedy
        elif r._constraint is not None:
            # the token budget lets the value close within max_tokens
            tok = r._constraint.choose(logits, p.temperature, p.top_p, r._generator, remaining=remaining)
            r._constraint.accept(tok)
        else:
            tok = int(sample_next(logits, p.temperature, p.top_p, r._generator))
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        if p.logprobs or p.top_logprobs:
            lp = torch.log_softmax(raw.float(), dim=-1)
            r.logprobs.append(float(lp[tok]))
            if p.top_logprobs:
                v, i = lp.topk(int(p.top_logprobs))
                r.top_logprobs.append(list(zip(i.tolist(), v.tolist())))
        if tok in self.stop_ids and not p.ignore_eos:
            r.stop_token = tok
            self._detokenize(r, final=True)
            _finish(r, "stop")
            return True
        r.output_ids.append(tok)
        self.stats["generated_tokens"] += 1
        self._detokenize(r)
        hit_stop = _cut_stop_string(r)  # before on_token, so a stream never shows the stop string
        if r.on_token is not None:
            r.on_token(r, tok)
        if hit_stop:
            _finish(r, "stop")
            return True
        if r._constraint is not None and r._constraint.complete:
            self._detokenize(r, final=True)
            _finish(r, "stop")
            return True
        if len(r.output_ids) >= p.max_tokens or len(r.prompt_ids) + len(r.output_ids) >= self.backend.max_context:
            self._detokenize(r, final=True)
            _cut_stop_string(r)
            _finish(r, "length")
            return True
        r._pending = tok
        return False

    def _detokenize(self, r: GenRequest, final: bool = False) -> None:
        """Append the newly complete characters to ``r.text`` (decoding a short window, not the whole output)."""
        decode = self.chat_model.decode
        ids = r.output_ids
        prev = decode(ids[r._text_from : r._text_read]) if r._text_read > r._text_from else ""
        full = decode(ids[r._text_from :])
        if len(full) > len(prev) and (final or not full.endswith("\ufffd")):
            r.text += full[len(prev):]
            r._text_from, r._text_read = r._text_read, len(ids)

    def fail_all(self, message: str) -> None:
        for r in list(self.decoding) + list(self.prefilling) + list(self.waiting):
            _finish(r, "error", message)
        for i in range(self.cache.rows):
            self.cache.reset_row(i)
        self.decoding, self.prefilling, self.waiting = [], [], deque()
        self.free_staging = list(range(self.cache.rows - 1, self.max_batch_size - 1, -1))


def _cut_stop_string(req: GenRequest) -> bool:
    for s in req.params.stop:
        if s and s in req.text:
            req.text = req.text[: req.text.index(s)]
            return True
    return False


def generate_batch(chat_model: Any, requests: Sequence[GenRequest], max_batch_size: int | None = None,
                   prefill_chunk: int | None = None) -> None:
    """Decode every request to its end in this thread (fills output_ids, text, finish_reason, logprobs).

    A request with bad parameters finishes with finish_reason "error" and its message; the others run.
    """
    sched = Scheduler(chat_model, max_batch_size or max(1, min(len(requests), 64)), prefill_chunk)
    for r in requests:
        sched.add(r)
    while sched.busy:
        sched.step()


class Engine:
    """A background thread running one :class:`Scheduler` for the HTTP server.

    Requests join the running batch at every step (continuous batching). After a cold
    start the engine waits ``batch_window_s`` for company.
    """

    def __init__(self, chat_model: Any, max_batch_size: int = 16, batch_window_s: float = 0.005,
                 prefill_chunk: int | None = None, prefix_cache_mb: float = 256.0) -> None:
        self.chat_model = chat_model
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self._queue: queue.Queue[GenRequest | None] = queue.Queue()
        self._closed = False
        self._sched = Scheduler(chat_model, max_batch_size, prefill_chunk, prefix_cache_mb)
        self.stats = self._sched.stats
        self._thread = threading.Thread(target=self._run, name="openk2-engine", daemon=True)
        self._thread.start()

    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a request (its parameters are checked here: :class:`InvalidRequest`)."""
        if self._closed:
            raise EngineClosed("the server is shutting down")
        prepare(req, self.chat_model)
        self._queue.put(req)
        return req

    def generate(self, req: GenRequest, timeout: float | None = None) -> GenRequest:
        return self.submit(req).wait(timeout)

    @property
    def pending(self) -> int:
        """Requests waiting for a row (not counting the running ones)."""
        return self._queue.qsize() + len(self._sched.waiting)

    @property
    def running(self) -> int:
        """Requests being prefilled or decoded right now."""
        return self._sched.running

    def _drain(self, block: bool) -> bool:
        """Move queued requests into the scheduler; True when told to stop."""
        deadline = None
        while True:
            try:
                if block:
                    item = self._queue.get()
                    block = False
                    deadline = time.perf_counter() + self.batch_window_s
                elif deadline is not None and (left := deadline - time.perf_counter()) > 0:
                    item = self._queue.get(timeout=left)  # the collection window after a cold start
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            self._sched.add(item)

    def _run(self) -> None:
        sched = self._sched
        stopping = False
        while True:
            if not stopping:
                stopping = self._drain(block=not sched.busy)
            elif self._queue.qsize():
                self._drain(block=False)
            if not sched.busy:
                if stopping:
                    return
                continue
            try:
                sched.step()
            except Exception as e:  # never leave a waiting client hanging
                sched.fail_all(f"engine error: {type(e).__name__}: {e}")

    def close(self, timeout: float | None = 30.0) -> None:
        """Take no new requests, finish the queued and running ones, stop the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
