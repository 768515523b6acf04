"""The rephrasing pipeline: chunk-wise autoregressive rewrites with fidelity checks, resumable.

    from openk2.llm import make_client
    from openk2.rephrase import Rephraser, RephraseConfig, read_inputs

    docs, failures = read_inputs(["wiki.jsonl"])
    pipe = Rephraser(make_client("http://127.0.0.1:8000"), RephraseConfig(rephrasings=2), "runs/rephrase/wiki")
    summary = pipe.run(docs, failures)

One *rewrite* is (document, rephrasing index k, style). A document is split
into chunks under a token budget (:mod:`openk2.rephrase.chunking`); chunk i is
rewritten from the original chunk and the tail of the rewrite of chunks
0..i-1, so the result reads as one document. Every rewritten chunk passes the
model-free checks (:mod:`openk2.rephrase.checks`) and, unless ``judge="off"``,
an LLM judge with a structured verdict; a chunk that fails is retried with a
new sampling seed up to ``retries`` times, then its rewrite is dropped with
the reason recorded (a rewrite is never emitted with a chunk missing). Math
documents are rewritten as learning notes (translated to English when not in
English) and must keep the source's final answer.

Work units: every chunk of every rewrite has a deterministic id (a hash of the
config, the document id and text, k and the chunk index). A finished unit is
appended to OUT/journal.jsonl (fsynced after every wave of requests), so a
killed run resumes from the first unfinished chunk and a rerun makes no LLM
request at all. Requests go through the project's one LLM client
(:mod:`openk2.llm`): ``chat_many`` runs a wave of up to ``concurrency``
requests at once (concurrent HTTP requests to an endpoint, one decode batch
for the in-process engine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.errors import ConfigError
from openk2.llm.base import LLMClient, LLMError, StructuredOutputError
from openk2.rephrase.checks import CheckConfig, check_rewrite, detect_language
from openk2.rephrase.chunking import Chunk, join_rewrites, split_document, tail_tokens
from openk2.rephrase.mathcheck import answers_match, final_answer, looks_like_math
from openk2.rephrase import styles as _styles
from openk2.rephrase.styles import JUDGE_SCHEMA, Style, choose_styles, get_styles, judge_messages, rewrite_messages
from openk2.utils.files import atomic_write
from openk2.utils.progress import progress_bar

JOURNAL = "journal.jsonl"
OUTPUT = "rephrased.jsonl"
DROPPED = "dropped.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"


@dataclass(frozen=True)
class SourceDoc:
    """One input document; `id` must be unique within a run."""

    id: str
    text: str
    domain: str = ""
    source: str = ""


@dataclass(frozen=True)
class RephraseConfig:
    mode: str = "auto"  # knowledge | math | auto (math when the domain is "math" or the text looks like math)
    rephrasings: int = 2  # at most this many rewrites per document (K2: at most two per corpus)
    styles: tuple[str, ...] | None = None  # None: the whole library of the document's kind
    chunk_tokens: int = 256  # token budget of one chunk of the original
    tail_tokens: int = 96  # tokens of the rewrite so far shown with the next chunk
    output_ratio: float = 2.5  # max_tokens of a chunk's rewrite = output_ratio * chunk tokens + 32
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    retries: int = 2  # further tries of a chunk that fails a check
    judge: str = "require"  # require: unfaithful fails the chunk; record: verdict kept only; off: no judge
    judge_max_tokens: int = 160
    checks: CheckConfig = field(default_factory=CheckConfig)
    check_answers: bool = True  # math: the rewrite's final answer must equal the source's
    translate: bool = True  # math: non-English material is rewritten in English
    concurrency: int = 8  # requests per wave

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"rephrase: {msg}")

        need(self.mode in ("knowledge", "math", "auto"), f"mode must be knowledge, math or auto, got {self.mode!r}")
        need(self.rephrasings >= 1, f"rephrasings must be >= 1, got {self.rephrasings}")
        need(self.chunk_tokens >= 8, f"chunk_tokens must be >= 8, got {self.chunk_tokens}")
        need(self.tail_tokens >= 0, f"tail_tokens must be >= 0, got {self.tail_tokens}")
        need(self.retries >= 0, f"retries must be >= 0, got {self.retries}")
        need(self.judge in ("require", "record", "off"), f"judge must be require, record or off, got {self.judge!r}")
        need(self.concurrency >= 1, f"concurrency must be >= 1, got {self.concurrency}")
        need(0 <= self.temperature <= 2, f"temperature must be in [0, 2], got {self.temperature}")
        c = self.checks
        need(0 < c.min_length_ratio <= c.max_length_ratio, "length ratio bounds must satisfy 0 < min <= max")
        if self.styles:
            get_styles(list(self.styles), "knowledge")  # unknown names raise

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RephraseConfig":
        d = dict(d)
        if isinstance(d.get("checks"), dict):
            d["checks"] = CheckConfig(**d["checks"])
        if d.get("styles") is not None:
            d["styles"] = tuple(d["styles"])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"rephrase: unknown setting(s) {', '.join(unknown)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """What decides the text of a rewrite (concurrency does not): the settings and the prompt library
        (any edit of a style, the judge schema or the message builders in openk2/rephrase/styles.py makes
        finished units stale, so a rerun redoes them)."""
        d = self.to_dict()
        d.pop("concurrency")
        d["_prompts"] = _prompt_library_digest()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _prompt_library_digest() -> str:
    """A digest of the prompt texts and builders (openk2/rephrase/styles.py as loaded)."""
    with open(_styles.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _sha(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------- token counting
def token_counter(spec: Any = "smollm2") -> Callable[[str], int]:
    """A function text -> token count: a callable as is; a LocalClient's own tokenizer; "smollm2" (the offline
    model's tokenizer); a tokenizer.json file or a tokenizer directory."""
    if callable(spec) and not isinstance(spec, LLMClient):
        return spec
    tok = None
    if isinstance(spec, LLMClient):
        tok = getattr(getattr(spec, "chat_model", None), "tokenizer", None)
        if tok is None:
            return token_counter("smollm2")
    elif str(spec).lower() in ("smollm2", "smollm2-135m-instruct"):
        from openk2.serve.backends import SMOLLM2_FILE, smollm2_path

        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ConfigError("the SmolLM2 tokenizer needs transformers: pip install 'openk2[local]'") from e
        tok = AutoTokenizer.from_pretrained(str(smollm2_path()), gguf_file=SMOLLM2_FILE)
    else:
        from openk2.data.tokenizer import load_tokenizer

        p = Path(spec)
        if not p.exists():
            raise ConfigError(f"tokenizer {spec}: no such file or directory")
        tok = load_tokenizer(p)

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    return count


# ----------------------------------------------------------------------------------------------- outputs
def clean_reply(text: str | None) -> str:
    """The rewrite without a chatty preamble ("Sure! Here is ..."), code fences or wrapping quotes."""
    t = (text or "").strip()
    t = re.sub(r"^```[a-zA-Z]*\n(.*?)\n```$", r"\1", t, flags=re.S).strip()
    first, _, rest = t.partition("\n")
    if rest and re.match(r"^(sure|certainly|of course|here('s| is| are)|okay|ok)\b.*:\s*$", first.strip(), re.I):
        t = rest.strip()
    if len(t) > 1 and t[0] == t[-1] == '"' and t.count('"') == 2:
        t = t[1:-1].strip()
    return t


@dataclass
class Summary:
    documents: int = 0
    documents_failed: int = 0  # unreadable or empty input, recorded in dropped.jsonl
    chunks: int = 0  # chunk units of all rewrites
    chunks_done_before: int = 0  # found finished in the journal (a resumed run)
    rewrites: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # by reason, rewrites and failed inputs together
    attempt_failures: dict[str, int] = field(default_factory=dict)  # failed tries by reason (retried or not)
    judge: dict[str, int] = field(default_factory=dict)  # verdicts of the chunks kept
    translated: int = 0
    requests: int = 0
    cached: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0
    model: str = ""
    output: str = ""
    domain: str = ""

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dropped_total"] = self.dropped_total
        d["out_tokens_per_s"] = round(self.tokens_out / self.seconds, 2) if self.seconds > 0 else None
        return d

    def lines(self) -> list[str]:
        drop = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items(), key=lambda kv: -kv[1])) or "none"
        tries = ", ".join(f"{k} {v}" for k, v in sorted(self.attempt_failures.items(), key=lambda kv: -kv[1])) or "none"
        rate = f" ({self.tokens_out / self.seconds:,.1f} out tok/s)" if self.seconds > 0 and self.tokens_out else ""
        judge = ", ".join(f"{k} {v}" for k, v in sorted(self.judge.items())) or "not used"
        return [
            f"documents: {self.documents} ({self.documents_failed} unusable), chunks: {self.chunks} "
            f"({self.chunks_done_before} already done), rewrites: {self.rewrites}",
            f"kept {self.kept}, dropped {self.dropped_total} ({drop}); failed tries by reason: {tries}",
            f"judge verdicts on kept chunks: {judge}; translated to English: {self.translated}",
            f"LLM ({self.model}): {self.requests} requests ({self.cached} cached), {self.tokens_in:,} tokens in, "
            f"{self.tokens_out:,} out, {self.seconds:.1f} s{rate}",
            f"output: {self.output} (corpus domain {self.domain!r})",
        ]


# ----------------------------------------------------------------------------------------------- one rewrite
class _Rewrite:
    """The state machine of one rewrite: chunk i, try a, phase rewrite -> judge -> next chunk."""

    def __init__(self, pipe: "Rephraser", doc: SourceDoc, k: int, style: Style, kind: str, lang: str,
                 translate_from: str | None, chunks: list[Chunk], answer: str | None) -> None:
        self.pipe, self.doc, self.k, self.style, self.kind = pipe, doc, k, style, kind
        self.lang, self.translate_from, self.chunks, self.answer = lang, translate_from, chunks, answer
        self.rid = _sha(pipe.fp, doc.id, _sha(doc.text), k)[:20]
        self.parts: list[str] = []
        self.verdicts: list[dict] = []
        self.answer_check: dict | None = None
        self.failed: dict | None = None  # the journal record of the chunk that failed for good
        self.attempt = 0
        self.phase = "rewrite"
        self.candidate = ""
        self.cand_details: dict = {}
        self.reasons: list[str] = []
        self.tokens = [0, 0]

    @property
    def i(self) -> int:
        return len(self.parts)

    @property
    def done(self) -> bool:
        return self.failed is not None or self.i == len(self.chunks)

    def unit(self, i: int) -> str:
        return f"{self.rid}:{i}"

    def resume(self, journal: dict[str, dict]) -> int:
        """Take finished chunks from the journal; returns how many."""
        n = 0
        while not self.done:
            rec = journal.get(self.unit(self.i))
            if rec is None:
                break
            n += 1
            if rec["ok"]:
                self.parts.append(rec["text"])
                self.verdicts.append(rec.get("verdict") or {})
                if rec.get("answer_check"):
                    self.answer_check = rec["answer_check"]
            else:
                self.failed = rec
        return n

    def request(self) -> dict:
        cfg = self.pipe.cfg
        seed = int(_sha(self.unit(self.i), self.attempt)[:8], 16)
        chunk = self.chunks[self.i]
        if self.phase == "rewrite":
            tail = tail_tokens(join_rewrites(self.parts), cfg.tail_tokens, self.pipe.count)
            msgs = rewrite_messages(self.style, chunk.text, tail, self.i, len(self.chunks), self.translate_from)
            return {"messages": msgs, "max_tokens": int(cfg.output_ratio * chunk.tokens) + 32,
                    "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": seed}
        return {"messages": judge_messages(chunk.text, self.candidate), "json_schema": JUDGE_SCHEMA,
                "max_tokens": cfg.judge_max_tokens, "temperature": 0.0, "seed": seed}

    def feed(self, reply: Any) -> dict | None:
        """Take the reply to `request()`; returns a journal record when the chunk is finished (kept or failed)."""
        if not isinstance(reply, Exception):
            self.tokens[0] += 0 if reply.cached else reply.usage.prompt_tokens
            self.tokens[1] += 0 if reply.cached else reply.usage.completion_tokens
        if self.phase == "rewrite":
            return self._rewritten(reply)
        return self._judged(reply)

    def _rewritten(self, reply: Any) -> dict | None:
        pipe, cfg = self.pipe, self.pipe.cfg
        if isinstance(reply, Exception):
            return self._fail_try("llm_error", {"error": f"{type(reply).__name__}: {str(reply)[:300]}"})
        text = clean_reply(reply.content)
        chunk = self.chunks[self.i]
        translated = self.translate_from is not None
        res = check_rewrite(chunk.text, text, cfg.checks, pipe.count, translated=translated)
        reasons = list(res.reasons)
        if reply.finish_reason == "length":
            reasons.insert(0, "truncated")
        if text:
            out_lang = detect_language(text)[0]
            if translated and out_lang not in ("en", "und"):
                reasons.append("not_english")
            elif not translated and self.lang not in ("und",) and out_lang not in ("und", self.lang):
                reasons.append("language_changed")
        details = dict(res.details)
        if self.kind == "math" and cfg.check_answers and self.answer is not None and self.i == len(self.chunks) - 1:
            got = final_answer(text)
            match, how = answers_match(self.answer, got) if got is not None else (False, "none")
            details["answer_check"] = {"source": self.answer, "rewrite": got, "match": match, "method": how}
            if not match:
                reasons.append("answer_mismatch")
        if reasons:
            return self._fail_try(reasons[0], details, reasons)
        self.candidate, self.cand_details = text, details
        if cfg.judge == "off":
            return self._keep({"verdict": "skipped"})
        self.phase = "judge"
        return None

    def _judged(self, reply: Any) -> dict | None:
        cfg = self.pipe.cfg
        if isinstance(reply, Exception):
            kind = "judge_error" if isinstance(reply, (StructuredOutputError, LLMError)) else "judge_error"
            verdict = {"verdict": "error", "error": f"{type(reply).__name__}: {str(reply)[:300]}"}
            if cfg.judge == "require":
                return self._fail_try(kind, {**self.cand_details, "judge": verdict})
            return self._keep(verdict)
        v = reply.parsed or {}
        verdict = {"verdict": v.get("verdict", "error"), "differences": list(v.get("differences", []))[:4]}
        if verdict["verdict"] != "faithful" and cfg.judge == "require":
            return self._fail_try("judge_unfaithful", {**self.cand_details, "judge": verdict})
        return self._keep(verdict)

    def _record(self, ok: bool, **kw: Any) -> dict:
        return {"unit": self.unit(self.i), "rewrite": self.rid, "doc": self.doc.id, "k": self.k, "chunk": self.i,
                "ok": ok, "attempts": self.attempt + 1, "failed_tries": list(self.reasons),
                "tokens_in": self.tokens[0], "tokens_out": self.tokens[1], **kw}

    def _keep(self, verdict: dict) -> dict:
        rec = self._record(True, text=self.candidate, verdict=verdict, checks=self.cand_details,
                           answer_check=self.cand_details.get("answer_check"))
        self.parts.append(self.candidate)
        self.verdicts.append(verdict)
        if rec["answer_check"]:
            self.answer_check = rec["answer_check"]
        self._next()
        return rec

    def _fail_try(self, reason: str, details: dict, all_reasons: list[str] | None = None) -> dict | None:
        self.reasons.append(reason)
        for r in all_reasons or [reason]:
            self.pipe._attempt_failures[r] += 1
        if self.attempt < self.pipe.cfg.retries:
            self.attempt += 1
            self.phase = "rewrite"
            return None
        rec = self._record(False, reason=reason, details=details, text=self.candidate or "")
        self.failed = rec
        return rec

    def _next(self) -> None:
        self.attempt, self.phase, self.candidate, self.cand_details = 0, "rewrite", "", {}
        self.reasons, self.tokens = [], [0, 0]

    def output(self, model: str, domain: str) -> dict:
        judged = [v.get("verdict") for v in self.verdicts]
        return {
            "id": f"{self.doc.id}#r{self.k}",
            "text": join_rewrites(self.parts),
            "domain": domain,
            "source_id": self.doc.id,
            "source_domain": self.doc.domain,
            "source": self.doc.source,
            "rephrasing_index": self.k,
            "style": self.style.name,
            "kind": self.kind,
            "language": self.lang,
            "translated_from": self.translate_from,
            "chunks": len(self.chunks),
            "fidelity": {
                "checks": "passed",
                "judge": "faithful" if judged and all(v == "faithful" for v in judged) else
                         ("skipped" if all(v == "skipped" for v in judged) else "mixed"),
                "chunk_verdicts": self.verdicts,
                "answer": self.answer_check,
            },
            "model": model,
            "rewrite_id": self.rid,
        }

    def dropped(self) -> dict:
        f = self.failed or {}
        return {"rewrite_id": self.rid, "source_id": self.doc.id, "rephrasing_index": self.k, "style": self.style.name,
                "reason": f.get("reason", "unknown"), "chunk": f.get("chunk"), "chunks": len(self.chunks),
                "failed_tries": f.get("failed_tries", []), "details": f.get("details", {})}


# ----------------------------------------------------------------------------------------------- the pipeline
class Rephraser:
    """Rephrase documents into OUT_DIR (see the module docstring for the layout and the resume rule)."""

    def __init__(self, client: LLMClient, config: RephraseConfig | None = None,
                 out_dir: str | os.PathLike = "runs/rephrase",
                 *, count_tokens: Callable[[str], int] | str | None = None, domain: str = "rephrased",
                 progress: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.cfg = config or RephraseConfig()
        self.cfg.validate()
        self.out = Path(out_dir)
        self.count = token_counter(client if count_tokens is None else count_tokens)
        self.domain = domain
        self.progress = progress
        self.log = log or (lambda s: None)
        self.fp = self.cfg.fingerprint()
        self._attempt_failures: Counter = Counter()

    # -- journal
    def _load_journal(self) -> dict[str, dict]:
        path = self.out / JOURNAL
        if not path.exists():
            return {}
        raw = path.read_bytes()
        out: dict[str, dict] = {}
        good = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a line torn by a kill: dropped below
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            good += len(line)
            out[rec["unit"]] = rec
        if good < len(raw):
            with open(path, "r+b") as f:
                f.truncate(good)
        return out

    def _jobs(self, docs: Sequence[SourceDoc], failures: list[dict]) -> list[_Rewrite]:
        cfg = self.cfg
        seen: set[str] = set()
        jobs: list[_Rewrite] = []
        for doc in docs:
            if doc.id in seen:
                raise ConfigError(f"rephrase: duplicate document id {doc.id!r}")
            seen.add(doc.id)
            if not doc.text.strip():
                failures.append({"source_id": doc.id, "reason": "empty_document"})
                continue
            kind = cfg.mode if cfg.mode != "auto" else (
                "math" if doc.domain == "math" or looks_like_math(doc.text) else "knowledge")
            lang, _ = detect_language(doc.text)
            translate_from = lang if kind == "math" and cfg.translate and lang not in ("en", "und") else None
            styles = choose_styles(doc.id, cfg.rephrasings, get_styles(list(cfg.styles or ()), kind), cfg.seed)
            chunks = split_document(doc.text, cfg.chunk_tokens, self.count)
            answer = final_answer(doc.text) if kind == "math" and cfg.check_answers else None
            for k, style in enumerate(styles):
                jobs.append(_Rewrite(self, doc, k, style, kind, lang, translate_from, chunks, answer))
        return jobs

    def run(self, docs: Iterable[SourceDoc], input_failures: Sequence[dict] = ()) -> Summary:
        """Rephrase `docs` (resuming from OUT/journal.jsonl) and write rephrased.jsonl, dropped.jsonl, summary.json."""
        t0 = time.perf_counter()
        docs = list(docs)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / CONFIG, json.dumps({"fingerprint": self.fp, **self.cfg.to_dict()}, indent=2) + "\n")
        failures = [dict(f) for f in input_failures]
        jobs = self._jobs(docs, failures)
        journal = self._load_journal()
        before = sum(j.resume(journal) for j in jobs)
        s = Summary(documents=len(docs) + len(input_failures), documents_failed=len(failures),
                    chunks=sum(len(j.chunks) for j in jobs), chunks_done_before=before, rewrites=len(jobs),
                    model=self.client.model, output=str(self.out / OUTPUT), domain=self.domain)
        totals0 = dict(self.client.totals.as_dict())
        todo = [j for j in jobs if not j.done]
        remaining = sum(len(j.chunks) - j.i for j in todo)
        start = sum(j.i for j in todo)
        with open(self.out / JOURNAL, "a", encoding="utf-8") as jf, \
                progress_bar("rephrasing", remaining, enabled=self.progress and remaining > 0, unit="chunks",
                             info=True) as bar:
            active: list[_Rewrite] = []
            queue = iter(todo)
            while True:
                while len(active) < self.cfg.concurrency:
                    nxt = next(queue, None)
                    if nxt is None:
                        break
                    active.append(nxt)
                if not active:
                    break
                replies = self.client.chat_many([j.request() for j in active])
                wrote = 0
                for job, reply in zip(active, replies):
                    rec = job.feed(reply)
                    if rec is not None:
                        jf.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        wrote += 1
                if wrote:
                    jf.flush()
                    os.fsync(jf.fileno())
                active = [j for j in active if not j.done]
                t = self.client.totals
                # a failed chunk ends its rewrite: the chunks after it count as done
                done_units = sum(len(j.chunks) if j.failed else j.i for j in todo) - start
                bar.update(completed=done_units, info=f"{t.completion_tokens - totals0['completion_tokens']:,} tok out")
        return self._finish(jobs, failures, s, totals0, t0)

    def _finish(self, jobs: list[_Rewrite], failures: list[dict], s: Summary, totals0: dict, t0: float) -> Summary:
        kept, dropped = [], list(failures)
        judge: Counter = Counter()
        for j in jobs:
            if j.failed is not None:
                dropped.append(j.dropped())
            else:
                kept.append(j.output(self.client.model, self.domain))
                judge.update(v.get("verdict", "?") for v in j.verdicts)
                s.translated += j.translate_from is not None
        t = self.client.totals.as_dict()
        s.kept = len(kept)
        s.dropped = dict(Counter(d["reason"] for d in dropped))
        s.attempt_failures = dict(self._attempt_failures)
        s.judge = dict(judge)
        s.requests = t["requests"] + t["failures"] - totals0["requests"] - totals0["failures"]
        s.cached = t["cached"] - totals0["cached"]
        s.tokens_in = t["prompt_tokens"] - totals0["prompt_tokens"]
        s.tokens_out = t["completion_tokens"] - totals0["completion_tokens"]
        s.seconds = round(time.perf_counter() - t0, 2)
        atomic_write(self.out / OUTPUT, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        atomic_write(self.out / DROPPED, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dropped))
        atomic_write(self.out / SUMMARY, json.dumps(s.as_dict(), indent=2) + "\n")
        return s


def read_output(out_dir: str | os.PathLike) -> list[dict]:
    """The kept rewrites of a finished run (rephrased.jsonl)."""
    path = Path(out_dir) / OUTPUT
    if not path.exists():
        raise ConfigError(f"{path}: no rephrasing output here (run `openk2 rephrase` first)")
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
