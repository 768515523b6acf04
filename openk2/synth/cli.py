"""``openk2 synth STAGE... --out DIR``: the agentic data synthesis pipeline, stage by stage or ``all``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from openk2.errors import OpenK2Error
from openk2.synth.pipeline import ROLES, STAGES, Clients, Pipeline, SynthConfig

NEEDS = {"evolve": ("tool_generator",), "agents": ("agent_writer",), "tasks": ("task_generator",),
         "rollout": ("user", "simulator", "agent"), "judge": ("judge",)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stages", nargs="+", metavar="STAGE", help=f"one or more of: {', '.join(STAGES)}, or all")
    p.add_argument("--out", type=Path, default=Path("runs/synth"), help="output folder (default runs/synth)")
    p.add_argument("--llm", default="smollm2", help="LLM for every role: http://host:port (OpenAI-compatible) or smollm2 / a checkpoint")
    for r in ROLES:
        p.add_argument(f"--{r.replace('_', '-')}-llm", dest=f"{r}_llm", default=None, help=f"LLM of the {r} role (default --llm)")
    p.add_argument("--model", default=None, help="model name at the endpoint (default: its first model)")
    p.add_argument("--no-cache", action="store_true", help="do not cache LLM replies (default: OUT/llm_cache)")
    p.add_argument("--request-timeout", type=float, default=900.0,
                   help="seconds an endpoint may take for one reply (default 900: a loaded CPU server is slow)")
    d = SynthConfig(out=Path("."))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--servers", default="", help="comma-separated MCP server names (default: the whole catalogue)")
    p.add_argument("--mcp-dir", type=Path, default=None, help="where npm MCP servers are installed (default ~/.cache/openk2/mcp-servers)")
    for name in ("categories", "domains_per_category", "tools_per_domain", "agents", "tasks_per_agent", "max_turns",
                 "max_steps", "max_tokens", "concurrency"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("dedup_threshold", "exec_fraction", "failure_rate", "partial_rate", "edge_rate", "harvest_timeout"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--simulate-all", action="store_true", help="simulate the executable MCP/BFCL tools too (no real execution)")
    p.add_argument("--no-bfcl", action="store_true", help="leave bfcl-eval's executable APIs out of the repository")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="run the item stages (agents, tasks, rollout, judge) as "
                   "Ray tasks: 'local' or a cluster address (auto, ray://HEAD:10001); needs pip install ray")
    p.add_argument("--shards", type=int, default=None, help="with --ray: shards per stage (default: the cluster's CPUs)")


def config_from(args: argparse.Namespace) -> SynthConfig:
    for name in ("failure_rate", "partial_rate", "edge_rate", "exec_fraction"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            raise OpenK2Error(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    if args.failure_rate + args.partial_rate + args.edge_rate > 1.0:
        raise OpenK2Error("--failure-rate + --partial-rate + --edge-rate must be at most 1")
    for name in ("agents", "tasks_per_agent", "max_turns", "max_steps", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            raise OpenK2Error(f"--{name.replace('_', '-')} must be at least 1")
    return SynthConfig(
        out=args.out, seed=args.seed, servers=tuple(s for s in args.servers.split(",") if s), mcp_dir=args.mcp_dir,
        harvest_timeout=args.harvest_timeout, categories=args.categories, domains_per_category=args.domains_per_category,
        tools_per_domain=args.tools_per_domain, dedup_threshold=args.dedup_threshold, agents=args.agents,
        tasks_per_agent=args.tasks_per_agent, exec_fraction=args.exec_fraction, max_turns=args.max_turns,
        max_steps=args.max_steps, max_tokens=args.max_tokens, concurrency=args.concurrency, failure_rate=args.failure_rate,
        partial_rate=args.partial_rate, edge_rate=args.edge_rate, real_tools=not args.simulate_all, bfcl=not args.no_bfcl,
        progress=not args.no_progress)


def clients_for(args: argparse.Namespace, stages: list[str]) -> Clients:
    """A lazy client per role: each distinct --*-llm spec is made once, when a stage first asks for it."""
    import functools

    from openk2.llm import make_client

    def make(spec: str):
        kw = {"cache_dir": None if args.no_cache else args.out / "llm_cache"}
        if spec.startswith(("http://", "https://")):
            kw.update(model=args.model, max_concurrency=max(1, args.concurrency), timeout=args.request_timeout)
        return make_client(spec, **kw)

    factories: dict[str, object] = {}
    by_role = {}
    for s in stages:
        for role in NEEDS.get(s, ()):
            spec = getattr(args, f"{role}_llm") or args.llm
            factories.setdefault(spec, functools.partial(make, spec))
            by_role[role] = factories[spec]
    return Clients(by_role)


def main(args: argparse.Namespace) -> int:
    stages = list(STAGES) if args.stages == ["all"] else args.stages
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise OpenK2Error(f"unknown stage {bad[0]!r} (stages: {', '.join(STAGES)}, or all)")
    cfg = config_from(args)
    if args.ray:
        from openk2.synth.ray_stage import run_on_ray

        specs = {r: getattr(args, f"{r}_llm") or args.llm for r in ROLES}
        res = run_on_ray(cfg, specs, stages, address=args.ray, shards=args.shards, cache=not args.no_cache,
                         model=args.model, clients=clients_for(args, stages))
    else:
        res = Pipeline(cfg, clients_for(args, stages)).run(stages)
    if "export" in res:
        card = json.loads((cfg.out / "card.json").read_text())
        print(f"kept {card['kept']} trajectories; LLM calls per kept trajectory {card['llm_calls_per_kept_trajectory']}; "
              f"SFT data {cfg.out / 'sft.jsonl'}; card {cfg.out / 'card.md'}")
    return 0
