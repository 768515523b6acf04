"""openk2 eval end to end with the real local model (SmolLM2-135M-Instruct, in process): replies are recorded
and scored, and a rerun with a fresh client decodes nothing. Slow (a minute of CPU decoding on a busy machine)."""

from __future__ import annotations

import json

import pytest

from openk2.eval.core import run_suite
from openk2.eval.math import Math

pytestmark = pytest.mark.slow


class ShortMath(Math):
    max_tokens = 48  # enough for a short answer; keeps the test's decoding small


def test_smollm2_end_to_end_and_a_rerun_decodes_nothing(tmp_path):
    from openk2.llm import LocalClient

    s = ShortMath(size=2)
    client = LocalClient("smollm2", cache_dir=tmp_path / "cache", max_batch_size=4)
    r = run_suite(s, client, tmp_path, model="smollm2", limit=2, concurrency=4, progress=False)
    assert r.errors == 0 and r.model_calls == 4 and len(r.records) == 4
    recs = [json.loads(x) for x in (r.dir / "items.jsonl").read_text().splitlines()]
    assert all(x["reply"]["content"] and x["reply"]["usage"]["completion_tokens"] > 0 for x in recs)
    assert all(isinstance(x["verdict"]["passed"], bool) and x["verdict"]["gold"] for x in recs)
    decoded = client.totals.completion_tokens
    again = LocalClient(client.chat_model, cache_dir=tmp_path / "cache")
    r2 = run_suite(s, again, tmp_path, model="smollm2", limit=2, concurrency=4, progress=False)
    assert r2.model_calls == 0 and r2.resumed == 4 and again.totals.completion_tokens == 0 and decoded > 0
    (r.dir / "items.jsonl").unlink()  # the JSONL gone: the reply cache answers every request
    r3 = run_suite(s, again, tmp_path, model="smollm2", limit=2, concurrency=4, progress=False)
    assert r3.model_calls == 0 and again.totals.cached == 4 and r3.metrics == r.metrics
