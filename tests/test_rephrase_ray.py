"""The rephrasing stage on a local Ray instance: the same records as one process (skipped without ray)."""

import json
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("fastapi")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "fixtures" / "serve"))
sys.path.insert(0, str(HERE / "fixtures" / "rephrase"))

from fake_llm import make_app  # noqa: E402
from serve_helpers import TOKENIZER_JSON, LoopbackServer  # noqa: E402

from openk2.llm import OpenAICompatClient  # noqa: E402
from openk2.rephrase import Rephraser, RephraseConfig, SourceDoc, read_output  # noqa: E402
from openk2.rephrase.ray_stage import run_on_ray  # noqa: E402

pytestmark = pytest.mark.slow  # starting Ray takes ~10-30 s


def test_ray_shards_give_the_records_of_a_single_process_run(tmp_path):
    docs = [SourceDoc(f"d{i}", f"Person {i} Arden was born in {1800 + i} in Vessary and worked for the Olm Guild "
                      f"for {i + 3} years.", "text") for i in range(6)]
    cfg = RephraseConfig(rephrasings=2, chunk_tokens=100, concurrency=4)
    with LoopbackServer(make_app()) as srv:
        s = run_on_ray(docs, [{"source_id": "bad", "reason": "bad_input"}], cfg, tmp_path / "ray", llm=srv.url,
                       model="fake-llm", tokenizer=str(TOKENIZER_JSON), address="local", shards=3, cache=False)
        one = Rephraser(OpenAICompatClient(srv.url, model="fake-llm"), cfg, tmp_path / "one",
                        count_tokens=str(TOKENIZER_JSON), domain="text-rephrased", progress=False).run(docs)
    assert s.kept == one.kept == 12 and s.dropped == {"bad_input": 1} and s.requests == one.requests == 24
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(read_output(tmp_path / "ray"), key=key) == sorted(read_output(tmp_path / "one"), key=key)
    assert len(list((tmp_path / "ray" / "shards").iterdir())) == 3
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["shards"] == 3
