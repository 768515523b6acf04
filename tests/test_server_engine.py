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
from openk2.serve.engine import DecodeBatch, Engine, EngineClosed, GenRequest, SamplingParams, generate_batch  # noqa: E402

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
    b = DecodeBatch(cm)
    b.add(staggered[:1]), b.step(), b.step()
    b.add(staggered[1:3]), b.step()
    b.add(staggered[3:])
    while b.live:
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
