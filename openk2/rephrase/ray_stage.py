"""The rephrasing stage on Ray: shards of the corpus as Ray tasks, each one ordinary resumable pipeline run.

    openk2 rephrase corpus:default/text --out /shared/rephrase/text --llm http://vllm:8000 --ray auto --shards 64

Documents go to shards by a hash of their id (the same shard on every run), shard k
runs :class:`openk2.rephrase.Rephraser` into OUT/shards/k (its own journal, so a
lost task or a killed job resumes shard by shard), and the driver merges the
shards' outputs into OUT/rephrased.jsonl, dropped.jsonl and summary.json. On a
cluster OUT must be on a filesystem every node sees, openk2 must be installed on
every node, and ``--llm`` should be an endpoint (each task would otherwise load
its own in-process model). Ray is optional: ``pip install ray``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

from openk2.errors import ConfigError
from openk2.rephrase.pipeline import DROPPED, OUTPUT, SUMMARY, RephraseConfig, SourceDoc, Summary
from openk2.utils.files import atomic_write


def shard_of(doc_id: str, shards: int) -> int:
    return int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:8], 16) % shards


def run_shard(docs: list[dict], failures: list[dict], cfg: dict, out_dir: str, llm: str, model: str | None,
              tokenizer: str | None, domain: str, cache: bool) -> dict:
    """One shard, in a Ray worker (or anywhere): returns the shard's summary as a dict."""
    from openk2.llm import make_client
    from openk2.rephrase.pipeline import Rephraser

    config = RephraseConfig.from_dict(cfg)
    remote = llm.startswith(("http://", "https://"))
    kw = {"max_concurrency": config.concurrency} if remote else {"max_batch_size": config.concurrency}
    client = make_client(llm, model=model, cache_dir=os.path.join(out_dir, "llm-cache") if cache else None, **kw)
    count = tokenizer or ("smollm2" if remote else None)
    pipe = Rephraser(client, config, out_dir, count_tokens=count, domain=domain, progress=False)
    return pipe.run([SourceDoc(**d) for d in docs], failures).as_dict()


def merge(out: Path, shard_dirs: list[Path], summaries: list[dict], seconds: float, domain: str) -> Summary:
    kept, dropped = [], []
    for d in shard_dirs:
        for name, acc in ((OUTPUT, kept), (DROPPED, dropped)):
            p = d / name
            if p.exists():
                acc += [x for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    s = Summary(model=summaries[0]["model"] if summaries else "", output=str(out / OUTPUT), domain=domain)
    for sm in summaries:
        for f in dataclasses.fields(Summary):
            v = sm.get(f.name)
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(s, f.name, getattr(s, f.name) + v)
            elif isinstance(v, dict):
                c = Counter(getattr(s, f.name))
                c.update(v)
                setattr(s, f.name, dict(c))
    s.seconds = round(seconds, 2)
    atomic_write(out / OUTPUT, "".join(x + "\n" for x in kept))
    atomic_write(out / DROPPED, "".join(x + "\n" for x in dropped))
    atomic_write(out / SUMMARY, json.dumps({**s.as_dict(), "shards": len(shard_dirs)}, indent=2) + "\n")
    return s


def run_on_ray(docs: list[SourceDoc], failures: list[dict], cfg: RephraseConfig, out_dir: str | os.PathLike, *,
               llm: str, model: str | None = None, tokenizer: str | None = None, address: str = "local",
               shards: int | None = None, domain: str = "text-rephrased", cache: bool = True) -> Summary:
    """Rephrase `docs` as Ray tasks over shards; `address`: "local" (start Ray here) or a cluster address."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install ray") from None
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            # local workers import this checkout of openk2 (a cluster's nodes have it installed)
            root = str(Path(__file__).resolve().parents[2])
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}},
                     include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        n = shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        parts: list[list[dict]] = [[] for _ in range(n)]
        for d in docs:
            parts[shard_of(d.id, n)].append(dataclasses.asdict(d))
        task = ray.remote(num_cpus=1)(run_shard)
        dirs = [out / "shards" / f"{k:05d}" for k in range(n)]
        refs = [task.remote(parts[k], failures if k == 0 else [], cfg.to_dict(), str(dirs[k]), llm, model, tokenizer,
                            domain, cache) for k in range(n)]
        summaries = ray.get(refs)
    finally:
        if started_here:
            ray.shutdown()
    return merge(out, dirs, summaries, time.perf_counter() - t0, domain)
