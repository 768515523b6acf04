"""openk2 synth's item stages on Ray: each stage's items split into shards by a hash of their id, one Ray task
per shard running the ordinary resumable stage (:class:`Pipeline` with ``shard=(k, n)``), then the driver
merges the shards into OUT before the next stage.

    openk2 synth agents tasks rollout judge --out /shared/synth --llm http://vllm:8000 --ray auto --shards 64

The other stages (install, harvest, evolve, map, export) run on the driver. On a cluster OUT must be on a
filesystem every node sees and openk2 installed on every node; roles should be endpoints (a task would
otherwise load its own in-process model). A lost task or a killed job resumes shard by shard. Ray is
optional: ``pip install ray``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from openk2.errors import ConfigError
from openk2.synth.pipeline import ITEM_STAGES, Clients, Pipeline, SynthConfig, merge_shards


def _config_dict(cfg: SynthConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["out"] = str(cfg.out)
    d["mcp_dir"] = str(cfg.mcp_dir) if cfg.mcp_dir else None
    d["progress"] = False
    return d


def run_shard(cfg: dict[str, Any], specs: dict[str, str], stage: str, k: int, n: int, cache: bool, model: str | None) -> dict:
    """One shard of one stage, in a Ray worker (or anywhere). `specs`: role -> LLM spec."""
    from openk2.llm import make_client

    cfg = {**cfg, "out": Path(cfg["out"]), "mcp_dir": Path(cfg["mcp_dir"]) if cfg.get("mcp_dir") else None,
           "servers": tuple(cfg.get("servers") or ())}
    config = SynthConfig(**cfg)
    made: dict[str, Any] = {}

    def factory(spec: str) -> Callable[[], Any]:
        def make() -> Any:
            kw: dict[str, Any] = {"cache_dir": config.out / "llm_cache" if cache else None}
            if spec.startswith(("http://", "https://")):
                kw.update(model=model, max_concurrency=config.concurrency, timeout=900.0)
            return make_client(spec, **kw)
        return made.setdefault(spec, make)

    clients = Clients({role: factory(spec) for role, spec in specs.items()})
    res = Pipeline(config, clients, shard=(k, n)).run([stage], say=lambda s: None)
    return res[stage]


def run_on_ray(cfg: SynthConfig, specs: dict[str, str], stages: list[str], *, address: str = "local", shards: int | None = None,
               cache: bool = True, model: str | None = None, clients: Clients | None = None,
               say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `stages` in order: item stages as `shards` Ray tasks each (default: the cluster's CPUs), the rest here
    with `clients`."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install ray") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            root = str(Path(__file__).resolve().parents[2])
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1", **(
                {"OPENK2_MCP_DIR": os.environ["OPENK2_MCP_DIR"]} if os.environ.get("OPENK2_MCP_DIR") else {})}},
                     log_to_driver=False, include_dashboard=False)
        else:
            ray.init(address=address, log_to_driver=False)
    results: dict[str, Any] = {}
    try:
        n = shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1)(run_shard)
        driver = Pipeline(cfg, clients or Clients())
        conf = _config_dict(cfg)
        for stage in stages:
            if stage not in ITEM_STAGES:
                results.update(driver.run([stage], say=say))
                continue
            outs = ray.get([task.remote(conf, specs, stage, k, n, cache, model) for k in range(n)])
            merged = merge_shards(cfg.out, stage, n)
            summary: dict[str, Any] = {"shards": n, "merged": merged}
            for o in outs:
                for key, v in o.items():
                    if isinstance(v, (int, float)) and key != "seconds":
                        summary[key] = summary.get(key, 0) + v
            results[stage] = summary
            say(f"{stage}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    finally:
        if started_here:
            ray.shutdown()
    return results
