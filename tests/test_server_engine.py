"""The decode engine: batched, joined-mid-flight and single decoding give the same tokens."""

import dataclasses
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))

from serve_helpers import tiny_tokenizer  # noqa: E402

import openk2  # noqa: E402
from openk2.model.config import get_preset  # noqa: E402
from openk2.serve.backends import k2_chat_model  # noqa: E402
from openk2.serve.engine import Engine, EngineClosed, GenRequest, SamplingParams, Scheduler, generate_batch  # noqa: E402

PROMPTS = ["Hello there", "What is the weather like in Paris today, please? Tell me everything.", "x",
           "A medium prompt here"]


@pytest.fixture(scope="module")
def cm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = openk2.K2ForCausalLM(dataclasses.replace(get_preset("k2-nano"), vocab_size=1024))
    yield k2_chat_model(model, tiny_tokenizer(), "nano")
    torch.set_num_threads(threads)


def _ids(cm):
    return [cm.chat_prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]


def _params(**kw):
    return SamplingParams(**{"max_tokens": 10, "ignore_eos": True, **kw})


def test_single_equals_model_generate(cm):
    ids = _ids(cm)[1]
    r = GenRequest(ids, _params())
    generate_batch(cm, [r])
    ref = cm.backend.model.generate(torch.tensor([ids]), max_new_tokens=10)[0, len(ids):].tolist()
    assert r.output_ids == ref and r.finish_reason == "length"


def test_static_and_continuous_batching_match_single_requests(cm):
    ids = _ids(cm)
    single = []
    for i in ids:
        r = GenRequest(i, _params(max_tokens=12))
        generate_batch(cm, [r])
        single.append(r.output_ids)
    together = [GenRequest(i, _params(max_tokens=12)) for i in ids]
    generate_batch(cm, together)
    assert [r.output_ids for r in together] == single
    staggered = [GenRequest(i, _params(max_tokens=6 + 2 * k)) for k, i in enumerate(ids)]
    b = Scheduler(cm, max_batch_size=4)
    b.add(staggered[0]), b.step(), b.step()
    b.add(staggered[1]), b.add(staggered[2]), b.step()
    b.add(staggered[3])
    while b.busy:
        b.step()
    assert [r.output_ids for r in staggered] == [s[: 6 + 2 * k] for k, s in enumerate(single)]


def test_seeded_sampling_is_reproducible_and_per_request(cm):
    ids = _ids(cm)[0]
    a, b, c = (GenRequest(ids, _params(temperature=1.0, top_p=0.9, seed=s)) for s in (1, 1, 2))
    generate_batch(cm, [a, b, c])
    assert a.output_ids == b.output_ids != c.output_ids


def test_engine_thread_streams_and_closes(cm):
    engine = Engine(cm, max_batch_size=4, batch_window_s=0.01)
    seen = []
    done = threading.Event()

    def on_token(req, tok):
        seen.append(tok)
        if tok is None:
            done.set()

    reqs = [engine.submit(GenRequest(i, _params(), on_token=on_token if k == 0 else None)) for k, i in enumerate(_ids(cm))]
    for r in reqs:
        r.wait(30)
    assert done.is_set() and seen[-1] is None and seen[:-1] == reqs[0].output_ids
    engine.close()  # joins the thread, so its stats are final
    assert engine.stats["requests"] == 4 and engine.stats["generated_tokens"] == 40
    with pytest.raises(EngineClosed):
        engine.submit(GenRequest(_ids(cm)[0], _params()))


def test_stop_strings_and_banned_tokens(cm):
    ids = _ids(cm)[0]
    free = GenRequest(ids, _params(max_tokens=12))
    generate_batch(cm, [free])
    stop = free.text[3:6]
    cut = GenRequest(ids, _params(max_tokens=12, stop=(stop,)))
    generate_batch(cm, [cut])
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    banned = GenRequest(ids, _params(max_tokens=12, banned_ids=(free.output_ids[0],)))
    generate_batch(cm, [banned])
    assert banned.output_ids[0] != free.output_ids[0]


# ---------------------------------------------------------------- continuous batching, prefix sharing, isolation

LONG = "the quick brown fox jumps over the lazy dog " * 8  # ~200 tokens with the tiny tokenizer


def _run(cm, reqs, **kw):
    s = Scheduler(cm, **kw)
    for r in reqs:
        s.add(r)
    while s.busy:
        s.step()
    return s


def _alone(cm, ids, **kw):
    r = GenRequest(ids, _params(**kw))
    _run(cm, [r], max_batch_size=1, prefix_cache_mb=0)
    return r


def test_memory_and_attention_length_stay_flat_under_steady_load(cm):
    """Waves of requests reuse the same rows: the cache never grows past the longest live sequence."""
    ids = _ids(cm)
    s = Scheduler(cm, max_batch_size=4)
    longest, caps = 0, []
    for wave in range(6):
        for k in range(8):
            s.add(GenRequest(ids[k % 4], _params(max_tokens=8 + k)))
        while s.busy:
            s.step()
            longest = max(longest, s.cache.length)
        caps.append(s.cache.capacity)
    # the old engine's shared cache grew one position per step for as long as the batch never emptied
    assert longest <= max(len(i) for i in ids) + 8 + 7
    assert caps == [caps[0]] * 6 and s.stats["generated_tokens"] == 6 * sum(8 + k for k in range(8))


def test_long_prompt_is_prefilled_in_chunks_while_running_streams_decode(cm):
    ids = _ids(cm)[0]
    long_ids = cm.chat_prompt_ids([{"role": "user", "content": LONG}])
    s = Scheduler(cm, max_batch_size=4, prefill_chunk=16)
    running = GenRequest(ids, _params(max_tokens=40))
    s.add(running)
    s.step()
    late = GenRequest(long_ids, _params(max_tokens=4))
    s.add(late)
    steps, before = 0, len(running.output_ids)
    while not late.output_ids:
        s.step()
        steps += 1
    assert steps == -(-(len(long_ids) - late.cached_prompt_tokens) // 16)  # one chunk per step
    assert len(running.output_ids) - before == steps  # the running stream got a token at every one of them
    while s.busy:
        s.step()
    assert running.output_ids == _alone(cm, ids, max_tokens=40).output_ids
    assert late.output_ids == _alone(cm, long_ids, max_tokens=4).output_ids


def test_n_copies_of_one_prompt_are_prefilled_once(cm):
    ids = cm.chat_prompt_ids([{"role": "user", "content": LONG}])
    reqs = [GenRequest(ids, _params(max_tokens=6, temperature=1.0, seed=i)) for i in range(4)]
    s = _run(cm, reqs, max_batch_size=4)
    assert s.stats["prefill_tokens"] == len(ids)
    assert [r.cached_prompt_tokens for r in reqs] == [0] + [len(ids)] * 3
    for i, r in enumerate(reqs):  # each sample is what it would be alone
        assert r.output_ids == _alone(cm, ids, max_tokens=6, temperature=1.0, seed=i).output_ids
    assert len({tuple(r.output_ids) for r in reqs}) > 1


def test_shared_prefix_is_reused_from_the_prefix_store(cm):
    system = {"role": "system", "content": LONG}
    a = cm.chat_prompt_ids([system, {"role": "user", "content": "first question"}])
    b = cm.chat_prompt_ids([system, {"role": "user", "content": "another one"}])
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    s = Scheduler(cm, max_batch_size=2)
    ra, rb = GenRequest(a, _params()), GenRequest(b, _params())
    s.add(ra)
    while s.busy:
        s.step()
    s.add(rb)  # after ra finished: its prompt's KV comes from the store
    while s.busy:
        s.step()
    assert rb.cached_prompt_tokens == common > 100
    assert s.stats["prefill_tokens"] == len(a) + len(b) - common
    assert rb.output_ids == _alone(cm, b).output_ids


def test_logprobs_are_the_models_log_softmax(cm):
    ids = _ids(cm)[1]
    r = GenRequest(ids, _params(max_tokens=6, temperature=1.0, seed=3, logprobs=True, top_logprobs=3))
    generate_batch(cm, [r])
    full = torch.tensor([ids + r.output_ids])
    with torch.inference_mode():
        lp = torch.log_softmax(cm.backend.model(full).logits[0].float(), -1)
    want = [float(lp[len(ids) - 1 + t, tok]) for t, tok in enumerate(r.output_ids)]
    assert len(r.logprobs) == 6 and max(abs(x - y) for x, y in zip(r.logprobs, want)) < 1e-4
    for t, top in enumerate(r.top_logprobs):
        v, i = lp[len(ids) - 1 + t].topk(3)
        assert [k for k, _ in top] == i.tolist() and max(abs(a - b) for (_, a), b in zip(top, v.tolist())) < 1e-4


class _BrokenConstraint:
    complete = False

    def choose(self, *a, **k):
        raise RuntimeError("constraint blew up")


def test_a_failing_or_invalid_request_fails_alone(cm):
    ids = _ids(cm)
    good = [GenRequest(i, _params()) for i in ids[:2]]
    nan = GenRequest(ids[2], _params(temperature=float("nan")))
    broken = GenRequest(ids[3], _params())
    broken._constraint, broken._prepared = _BrokenConstraint(), True
    _run(cm, [good[0], nan, broken, good[1]], max_batch_size=4)
    assert nan.finish_reason == "error" and "temperature" in nan.error
    assert broken.finish_reason == "error" and "constraint blew up" in broken.error
    assert [g.output_ids for g in good] == [_alone(cm, i).output_ids for i in ids[:2]]


def test_cancelled_request_leaves_and_the_rest_go_on(cm):
    ids = _ids(cm)
    s = Scheduler(cm, max_batch_size=3)
    reqs = [GenRequest(i, _params(max_tokens=12)) for i in ids[:3]]
    for r in reqs:
        s.add(r)
    for _ in range(3):
        s.step()
    reqs[1].cancelled = True
    s.step()
    assert reqs[1].finish_reason == "cancelled" and len(s.decoding) == 2
    while s.busy:
        s.step()
    assert [reqs[0].output_ids, reqs[2].output_ids] == [_alone(cm, ids[k], max_tokens=12).output_ids for k in (0, 2)]


def test_output_stops_at_the_context(cm):
    ctx = cm.backend.max_context
    ids = (cm.chat_prompt_ids([{"role": "user", "content": LONG * 5}]) * 3)[: ctx - 5]
    r = GenRequest(ids, _params(max_tokens=50))
    generate_batch(cm, [r])
    assert r.finish_reason == "length" and len(r.output_ids) == 5


def test_soak_looping_clients_keep_memory_flat(cm):
    """8 threads looping requests through the engine thread for a bounded time (~4 s)."""
    import time as _time

    engine = Engine(cm, max_batch_size=4, batch_window_s=0.0)
    ids = _ids(cm)
    results, caps, stop_at = [], [], _time.perf_counter() + 4.0

    def client(k):
        while _time.perf_counter() < stop_at:
            r = engine.generate(GenRequest(ids[k % 4], _params(max_tokens=12)), timeout=60)
            results.append(r)
            caps.append(engine._sched.cache.capacity)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    engine.close()
    assert len(results) >= 16 and all(r.finish_reason == "length" and len(r.output_ids) == 12 for r in results)
    assert max(caps) == min(caps)  # no growth however long it runs
    assert engine.stats["generated_tokens"] == 12 * len(results) and engine.stats["errors"] == 0
    assert engine.stats["max_batch"] == 4


def test_a_short_prompt_arriving_during_a_long_prefill_gets_its_first_token_first(cm):
    """Waiting prompts share a step's prefill budget: shortest first, the oldest keeping a quarter."""
    long_ids = cm.chat_prompt_ids([{"role": "user", "content": LONG * 2}])
    short_ids = _ids(cm)[0]
    s = Scheduler(cm, max_batch_size=4, prefill_chunk=16, prefix_cache_mb=0)
    running = GenRequest(_ids(cm)[1], _params(max_tokens=60))
    s.add(running)
    s.step()
    long = GenRequest(long_ids, _params(max_tokens=4))
    s.add(long)
    s.step(), s.step()
    short = GenRequest(short_ids, _params(max_tokens=4))
    s.add(short)
    done_before = long._done_prefill
    steps = 0
    while not short.output_ids:
        s.step()
        steps += 1
    # the short prompt took the budget the long one left (12 of 16 tokens a step), not the long prompt's ~30 steps
    todo = len(short_ids) - short.cached_prompt_tokens
    assert steps == -(-todo // 12) and not long.output_ids
    # the long prompt kept its quarter every step and had the rest of the budget
    assert long._done_prefill - done_before == 16 * steps - todo >= 4 * steps
    assert len(long_ids) - long._done_prefill > 16 * 5  # still far from done: the short one did not wait for it
    while s.busy:
        s.step()
    assert short.first_token_at < long.first_token_at
    for r, ids in ((running, _ids(cm)[1]), (long, long_ids), (short, short_ids)):
        assert r.output_ids == _alone(cm, ids, max_tokens=len(r.output_ids)).output_ids


def test_identical_prompts_waiting_together_are_prefilled_once_even_with_free_staging_rows(cm):
    ids = cm.chat_prompt_ids([{"role": "user", "content": LONG}])
    other = _ids(cm)[2]
    reqs = [GenRequest(ids, _params(max_tokens=3)), GenRequest(other, _params(max_tokens=3)),
            GenRequest(ids, _params(max_tokens=3))]
    s = _run(cm, reqs, max_batch_size=4, prefix_cache_mb=0)
    assert s.stats["prefill_tokens"] == len(ids) + len(other)
    assert reqs[2].cached_prompt_tokens == len(ids)


class _FaultyRow:
    """The model, except that a decode forward whose rows include ``victim``'s row raises (an injected
    fault: the row's KV or the request's state gone bad)."""

    def __init__(self, backend, sched, victim):
        self.backend, self.sched, self.victim = backend, sched, victim
        self.max_context, self.vocab_size = backend.max_context, backend.vocab_size
        self.calls = []

    def forward(self, ids, view):
        rows = range(view.rows.start, view.rows.stop)
        self.calls.append(len(rows))
        if ids.shape[1] == 1 and self.victim in self.sched.decoding and self.sched.decoding.index(self.victim) in rows:
            raise RuntimeError("injected fault")
        return self.backend.forward(ids, view)


def test_a_failing_decode_row_fails_only_its_request(cm):
    ids = _ids(cm)
    s = Scheduler(cm, max_batch_size=4)
    reqs = [GenRequest(i, _params(max_tokens=8)) for i in ids]
    victim = reqs[2]
    for r in reqs:
        s.add(r)
    s.step()  # all four prefilled and decoding
    had = len(victim.output_ids)
    s.backend = faulty = _FaultyRow(s.backend, s, victim)
    while s.busy:
        s.step()
    assert victim.finish_reason == "error" and "injected fault" in victim.error and len(victim.output_ids) == had
    assert s.stats["errors"] == 1
    assert faulty.calls[:5] == [4, 1, 1, 1, 1]  # the batch failed, then each row alone
    for r, i in zip(reqs, ids):
        if r is not victim:  # the others never noticed
            assert r.finish_reason == "length" and r.output_ids == _alone(cm, i, max_tokens=8).output_ids
