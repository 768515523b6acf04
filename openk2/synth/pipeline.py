"""The stage runner of ``openk2 synth``: each stage reads the previous stage's files in the output folder and
writes its own, so stages run one by one or end to end, resume after an interruption (finished items are
skipped) and cost no tokens on a rerun (every LLM reply is cached on disk).

| stage | reads | writes |
|---|---|---|
| install | | the npm MCP servers, under ``--mcp-dir`` |
| harvest | the servers | ``mcp_tools.json``, ``mcp_servers.json`` |
| evolve | ``mcp_tools.json`` | ``evolve_domains.jsonl``, ``evolve_tools.jsonl``, ``tools.json`` (the repository), ``tools_dropped.json`` |
| map | ``tools.json`` | ``tool_map.png`` (report Fig. 9) |
| agents | ``tools.json`` | ``agents.jsonl`` |
| tasks | ``agents.jsonl`` | ``tasks.jsonl`` |
| rollout | ``tasks.jsonl`` | ``trajectories.jsonl`` |
| judge | ``trajectories.jsonl`` | ``judged.jsonl`` |
| export | ``judged.jsonl`` | ``sft.jsonl`` (kept trajectories), ``card.json``, ``card.md`` |
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from openk2.errors import OpenK2Error
from openk2.llm.base import LLMClient
from openk2.synth import agents as agents_mod
from openk2.synth import evolve as evolve_mod
from openk2.synth.common import JsonlStore, Stats, run_items, stable_id
from openk2.synth.env import Environment, SimRates
from openk2.synth.judge import decide, judge, rule_checks
from openk2.synth.rollout import rollout
from openk2.utils.files import atomic_write, read_json

STAGES = ("install", "harvest", "evolve", "map", "agents", "tasks", "rollout", "judge", "export")
ROLES = ("tool_generator", "agent_writer", "task_generator", "user", "simulator", "agent", "judge")


@dataclass
class SynthConfig:
    out: Path
    seed: int = 0
    servers: tuple[str, ...] = ()  # empty: the whole catalogue
    mcp_dir: Path | None = None
    harvest_timeout: float = 20.0
    categories: int = 4
    domains_per_category: int = 2
    tools_per_domain: int = 4
    dedup_threshold: float = 0.9
    agents: int = 6
    tasks_per_agent: int = 2
    exec_fraction: float = 0.34
    max_turns: int = 5
    max_steps: int = 5
    max_tokens: int = 512
    concurrency: int = 4
    failure_rate: float = 0.1
    partial_rate: float = 0.05
    edge_rate: float = 0.1
    real_tools: bool = True
    bfcl: bool = True  # add bfcl-eval's executable stateful APIs to the repository (when installed)
    progress: bool = True

    @property
    def rates(self) -> SimRates:
        return SimRates(self.failure_rate, self.partial_rate, self.edge_rate)


class Clients:
    """One LLM client per role (the same object may serve several roles). A value may be a zero-argument
    factory: the client is made when a stage first needs it (a stage that stops early loads no model)."""

    def __init__(self, by_role: dict[str, Any] | None = None) -> None:
        self.by_role: dict[str, Any] = dict(by_role or {})
        self._made: dict[int, LLMClient] = {}

    def __getitem__(self, role: str) -> LLMClient:
        if role not in self.by_role:
            raise OpenK2Error(f"no LLM client for the {role} role")
        v = self.by_role[role]
        if isinstance(v, LLMClient):
            return v
        if id(v) not in self._made:
            self._made[id(v)] = v()
        return self._made[id(v)]

    @classmethod
    def same(cls, client: LLMClient) -> "Clients":
        return cls({r: client for r in ROLES})

    def made(self) -> list[LLMClient]:
        out = {id(c): c for c in self.by_role.values() if isinstance(c, LLMClient)}
        out.update({id(c): c for c in self._made.values()})
        return list(out.values())

    def request_totals(self) -> dict[str, int]:
        """HTTP/decode requests made so far by all clients (schema retries included), and tokens."""
        uniq = self.made()
        return {"llm_requests": sum(c.totals.requests + c.totals.failures for c in uniq),
                "llm_requests_cached": sum(c.totals.cached for c in uniq),
                "llm_schema_retries": sum(c.totals.schema_retries for c in uniq),
                "llm_tokens": sum(c.totals.total_tokens for c in uniq)}


class Pipeline:
    def __init__(self, cfg: SynthConfig, clients: Clients | None = None, shard: tuple[int, int] | None = None) -> None:
        """`shard` = (k, n): run only the items of shard k of n (by a hash of their id) of the item stages
        (agents, tasks, rollout, judge), reading the inputs from OUT and writing to OUT/shards/k-of-n/ (merged
        by :func:`merge_shards`); see :mod:`openk2.synth.ray_stage`."""
        self.cfg = cfg
        self.clients = clients or Clients()
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard = shard
        self.wdir = self.out / "shards" / f"{shard[0]}-of-{shard[1]}" if shard else self.out

    # -- helpers
    def _run(self, coro: Any) -> Any:
        """Run a stage's coroutine on a fresh event loop, closing the clients' connections of that loop."""

        async def main() -> Any:
            try:
                return await coro
            finally:
                for c in self.clients.made():
                    if hasattr(c, "aclose"):
                        await c.aclose()

        return asyncio.run(main())

    def path(self, name: str) -> Path:
        return self.out / name

    def _save_stats(self, stage: str, stats: Stats, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Counters add up over reruns (a resumed stage counts only the work it did)."""
        p = self.wdir / f"stats/{stage}.json"
        old = read_json(p) if p.exists() else {}
        counters = Counter(old.get("counters", {}))
        counters.update(stats.as_dict())
        data = {"stage": stage, "counters": dict(sorted(counters.items())), **(extra or {})}
        if "requests" in old:
            data["requests"] = old["requests"]
        atomic_write(p, json.dumps(data, indent=2) + "\n")
        return data

    def _add_requests(self, stage: str, used: dict[str, int]) -> None:
        p = self.wdir / f"stats/{stage}.json"
        data = read_json(p) if p.exists() else {"stage": stage, "counters": {}}
        req = Counter(data.get("requests", {}))
        req.update(used)
        data["requests"] = dict(req)
        atomic_write(p, json.dumps(data, indent=2) + "\n")

    def _store(self, name: str) -> JsonlStore:
        """An item stage's output: in OUT, or in this shard's folder."""
        return JsonlStore(self.wdir / name)

    def _mine(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.shard is None:
            return items
        k, n = self.shard
        return [it for it in items if shard_of(it["id"], n) == k]

    def _need(self, name: str, stage: str) -> Any:
        p = self.path(name)
        if not p.exists():
            raise OpenK2Error(f"{p} is missing: run `openk2 synth {stage} --out {self.out}` first")
        return read_json(p) if p.suffix == ".json" else JsonlStore(p)

    def repository(self) -> list[dict[str, Any]]:
        return self._need("tools.json", "evolve")["tools"]

    def run(self, stages: tuple[str, ...] | list[str], say: Callable[[str], None] = print) -> dict[str, Any]:
        results = {}
        for s in stages:
            if s not in STAGES:
                raise OpenK2Error(f"unknown stage {s!r} (stages: {', '.join(STAGES)}, or all)")
            t0 = time.monotonic()
            before = self.clients.request_totals()
            res = getattr(self, f"stage_{s}")()
            after = self.clients.request_totals()
            used = {k: after[k] - before[k] for k in after}
            if any(used.values()):
                self._add_requests(s, used)
            res["seconds"] = round(time.monotonic() - t0, 1)
            results[s] = res
            say(f"{s}: " + ", ".join(f"{k} {v}" for k, v in res.items() if not isinstance(v, (dict, list))))
        return results

    # -- stages
    def _servers(self):
        from openk2.synth.mcp import SERVERS, server_by_name

        return [server_by_name(n) for n in self.cfg.servers] if self.cfg.servers else list(SERVERS)

    def stage_install(self) -> dict[str, Any]:
        from openk2.synth.mcp import default_install_dir, npm_install

        status = npm_install(self._servers(), self.cfg.mcp_dir or default_install_dir())
        ok = sum(v in ("installed", "cached") for v in status.values())
        self._save_stats("install", Stats(), {"status": status})
        return {"servers": len(status), "ready": ok, "failed": len(status) - ok}

    def stage_harvest(self) -> dict[str, Any]:
        from openk2.synth.mcp import harvest
        from openk2.utils.progress import progress_bar

        servers = self._servers()
        with progress_bar("harvest", total=len(servers), enabled=self.cfg.progress) as bar:
            res = self._run(harvest(servers, self.cfg.mcp_dir, timeout=self.cfg.harvest_timeout,
                                      concurrency=self.cfg.concurrency, on_done=lambda r: bar.advance(1)))
        atomic_write(self.path("mcp_tools.json"), json.dumps({"tools": res.tools}, indent=1, ensure_ascii=False) + "\n")
        atomic_write(self.path("mcp_servers.json"), json.dumps({"servers": res.servers}, indent=1) + "\n")
        ok = [s for s in res.servers if s["ok"]]
        out = {"servers_ok": len(ok), "servers_failed": len(res.servers) - len(ok), "tools": len(res.tools)}
        if self.cfg.bfcl:
            from openk2.synth.bfcl import bfcl_tools

            b = bfcl_tools()
            atomic_write(self.path("bfcl_tools.json"), json.dumps({"tools": b}, indent=1, ensure_ascii=False) + "\n")
            out["bfcl_tools"] = len(b)
        return out

    def stage_evolve(self) -> dict[str, Any]:
        cfg, stats = self.cfg, Stats()
        real = self._need("mcp_tools.json", "harvest")["tools"]
        if self.path("bfcl_tools.json").exists():
            real = real + read_json(self.path("bfcl_tools.json"))["tools"]
        cats = list(evolve_mod.CATEGORIES[: cfg.categories])
        dstore = JsonlStore(self.path("evolve_domains.jsonl"))

        async def domains(it: dict[str, Any]) -> dict[str, Any]:
            ds = await evolve_mod.evolve_domains(self.clients["tool_generator"], it["category"], cfg.domains_per_category, stats, seed=cfg.seed)
            return {"id": it["id"], "ok": bool(ds), "category": it["category"], "domains": ds,
                    **({} if ds else {"reason": "llm_invalid_json"})}

        drecs = self._run(run_items(evolve_mod.evolve_items(cats, cfg.seed), domains, dstore, concurrency=cfg.concurrency,
                                      description="evolve domains", progress=cfg.progress, stats=stats))
        titems = [{"id": stable_id("tools", r["category"], d["name"], cfg.seed), "category": r["category"], "domain": d}
                  for r in drecs for d in r.get("domains", [])]
        tstore = JsonlStore(self.path("evolve_tools.jsonl"))

        async def tools(it: dict[str, Any]) -> dict[str, Any]:
            es = await evolve_mod.evolve_tools(self.clients["tool_generator"], it["category"], it["domain"], cfg.tools_per_domain, stats, seed=cfg.seed)
            return {"id": it["id"], "ok": bool(es), "tools": es, **({} if es else {"reason": "no_valid_tools"})}

        trecs = self._run(run_items(titems, tools, tstore, concurrency=cfg.concurrency, description="evolve tools",
                                      progress=cfg.progress, stats=stats))
        synthetic = [e for r in trecs for e in r.get("tools", [])]
        kept, dropped = evolve_mod.dedup(real, synthetic, cfg.dedup_threshold) if synthetic else ([], [])
        repo = list(real) + kept
        atomic_write(self.path("tools.json"), json.dumps({"tools": repo}, indent=1, ensure_ascii=False) + "\n")
        atomic_write(self.path("tools_dropped.json"), json.dumps({"tools": dropped}, indent=1, ensure_ascii=False) + "\n")
        self._save_stats("evolve", stats)
        return {"domains": len(titems), "generated": len(synthetic), "kept": len(kept), "dropped": len(dropped),
                "repository": len(repo)}

    def stage_map(self) -> dict[str, Any]:
        from openk2.synth.repo import tool_map

        return tool_map(self.repository(), self.path("tool_map.png"), seed=self.cfg.seed)

    def stage_agents(self) -> dict[str, Any]:
        cfg, stats = self.cfg, Stats()
        repo = {e["id"]: e for e in self.repository()}
        plans = agents_mod.sample_agents(list(repo.values()), cfg.agents, cfg.seed, cfg.exec_fraction)

        async def write(it: dict[str, Any]) -> dict[str, Any]:
            return await agents_mod.write_agent(self.clients["agent_writer"], it, [repo[i] for i in it["tool_ids"]], stats)

        recs = self._run(run_items(self._mine(plans), write, self._store("agents.jsonl"), concurrency=cfg.concurrency,
                                     description="agents", progress=cfg.progress, stats=stats))
        self._save_stats("agents", stats)
        return _outcome(recs)

    def stage_tasks(self) -> dict[str, Any]:
        cfg, stats = self.cfg, Stats()
        repo = {e["id"]: e for e in self.repository()}
        agents = [a for a in self._need("agents.jsonl", "agents").values() if a.get("ok")]
        items = [{"id": stable_id("task", a["id"], j, cfg.seed), "agent": a,
                  "level": agents_mod.LEVELS[j % len(agents_mod.LEVELS)]}
                 for a in agents for j in range(cfg.tasks_per_agent)]

        async def write(it: dict[str, Any]) -> dict[str, Any]:
            a = it["agent"]
            return await agents_mod.write_task(self.clients["task_generator"], a, [repo[i] for i in a["tool_ids"]], it["level"], it["id"], stats,
                                               prefix=cfg.mcp_dir, replay=cfg.real_tools)

        recs = self._run(run_items(self._mine(items), write, self._store("tasks.jsonl"), concurrency=cfg.concurrency,
                                     description="tasks", progress=cfg.progress, stats=stats))
        self._save_stats("tasks", stats)
        return _outcome(recs)

    def stage_rollout(self) -> dict[str, Any]:
        cfg, stats = self.cfg, Stats()
        repo = {e["id"]: e for e in self.repository()}
        agents = {a["id"]: a for a in self._need("agents.jsonl", "agents").values()}
        tasks = [t for t in self._need("tasks.jsonl", "tasks").values() if t.get("ok")]
        items = [{"id": stable_id("traj", t["id"], cfg.seed), "task": t} for t in tasks]

        async def run(it: dict[str, Any]) -> dict[str, Any]:
            t = it["task"]
            agent = agents[t["agent_id"]]
            tools = [repo[i] for i in agent["tool_ids"]]
            env = Environment(tools, it["id"], simulator=self.clients["simulator"], rates=cfg.rates,
                              initial_state=t["task"].get("initial_state") or {}, initial_files=t["task"].get("initial_files") or {},
                              real=cfg.real_tools, prefix=cfg.mcp_dir, stats=stats)
            async with env:
                traj = await rollout(self.clients["agent"], self.clients["user"], agent, t, env, max_turns=cfg.max_turns,
                                     max_steps=cfg.max_steps, max_tokens=cfg.max_tokens, stats=stats)
            return {"id": it["id"], "ok": True, "task_id": t["id"], "agent_id": agent["id"], **traj}

        recs = self._run(run_items(self._mine(items), run, self._store("trajectories.jsonl"), concurrency=cfg.concurrency,
                                     description="rollout", progress=cfg.progress, stats=stats))
        self._save_stats("rollout", stats)
        ends = Counter(r.get("end", r.get("reason")) for r in recs)
        return {**_outcome(recs), "ended_by_user": ends.get("stop", 0)}

    def stage_judge(self) -> dict[str, Any]:
        cfg, stats = self.cfg, Stats()
        tasks = {t["id"]: t for t in self._need("tasks.jsonl", "tasks").values()}
        trajs = [t for t in self._need("trajectories.jsonl", "rollout").values() if t.get("ok")]

        async def one(traj: dict[str, Any]) -> dict[str, Any]:
            task = tasks[traj["task_id"]]
            rules = rule_checks(traj, task.get("gold_end_state"))
            if rules:  # a rule already rejects it: no judge call
                verdict = {"ok": True, "items": [], "skipped": "rule checks failed"}
            else:
                verdict = await judge(self.clients["judge"], task["task"], traj, stats)
            keep, reasons = decide(rules, verdict)
            stats.add("judge.kept" if keep else "judge.rejected")
            return {"id": traj["id"], "ok": True, "keep": keep, "reasons": reasons, "rules": rules, "verdict": verdict}

        items = [{**t} for t in trajs]
        recs = self._run(run_items(self._mine(items), one, self._store("judged.jsonl"), concurrency=cfg.concurrency,
                                     description="judge", progress=cfg.progress, stats=stats))
        self._save_stats("judge", stats)
        kept = sum(bool(r.get("keep")) for r in recs)
        return {"judged": len(recs), "kept": kept, "rejected": len(recs) - kept}

    def stage_export(self) -> dict[str, Any]:
        from openk2.chat.render import normalize_messages

        repo = {e["id"]: e for e in self.repository()}
        agents = {a["id"]: a for a in self._need("agents.jsonl", "agents").values()}
        tasks = {t["id"]: t for t in self._need("tasks.jsonl", "tasks").values()}
        trajs = {t["id"]: t for t in self._need("trajectories.jsonl", "rollout").values()}
        judged = self._need("judged.jsonl", "judge").values()
        lines = []
        for j in sorted(judged, key=lambda r: r["id"]):
            if not j.get("keep"):
                continue
            tr = trajs[j["id"]]
            task, agent = tasks[tr["task_id"]], agents[tr["agent_id"]]
            lines.append(json.dumps({
                "id": tr["id"],
                "messages": normalize_messages(tr["messages"]),
                "tools": tr["tools"],
                "meta": {"task_id": task["id"], "agent_id": agent["id"], "level": task["level"], "agent_kind": agent["kind"],
                         "toolkits": agent["toolkits"], "turns": tr["turns"], "calls": len(tr["calls"]),
                         "persona": tr["persona"], "verdicts": j["verdict"].get("items", [])},
            }, ensure_ascii=False))
        atomic_write(self.path("sft.jsonl"), "".join(x + "\n" for x in lines))
        card = self.card()
        atomic_write(self.path("card.json"), json.dumps(card, indent=2) + "\n")
        atomic_write(self.path("card.md"), card_markdown(card))
        return {"kept": len(lines), "sft": str(self.path("sft.jsonl")), "card": str(self.path("card.md"))}

    # -- the dataset card
    def card(self) -> dict[str, Any]:
        def load(name: str) -> list[dict[str, Any]]:
            p = self.path(name)
            return JsonlStore(p).values() if p.exists() else []

        stages: dict[str, Any] = {}
        if self.path("mcp_servers.json").exists():
            srv = read_json(self.path("mcp_servers.json"))["servers"]
            stages["harvest"] = {"servers": len(srv), "servers_ok": sum(s["ok"] for s in srv),
                                 "tools": sum(s["tools"] for s in srv),
                                 "failed": {s["name"]: s.get("error", "")[:160] for s in srv if not s["ok"]}}
        if self.path("tools.json").exists():
            repo = self.repository()
            src = Counter(e["source"] for e in repo)
            stages["repository"] = {"tools": len(repo), "by_source": dict(src),
                                    "synthetic_domains": len({(e.get("category"), e.get("domain")) for e in repo if e["source"] == "synthetic"})}
            if self.path("tools_dropped.json").exists():
                stages["repository"]["dropped"] = dict(Counter(d["dropped"] for d in read_json(self.path("tools_dropped.json"))["tools"]))
        for name, file in (("agents", "agents.jsonl"), ("tasks", "tasks.jsonl"), ("rollout", "trajectories.jsonl")):
            recs = load(file)
            if recs:
                stages[name] = _outcome(recs) | {"reasons": dict(Counter(r.get("reason") for r in recs if not r.get("ok")))}
        trajs = {t["id"]: t for t in load("trajectories.jsonl")}
        judged = load("judged.jsonl")
        kept = [trajs[j["id"]] for j in judged if j.get("keep") and j["id"] in trajs]
        if judged:
            reasons = Counter(r for j in judged for r in j.get("reasons", []))
            stages["judge"] = {"judged": len(judged), "kept": len(kept), "pass_rate": round(len(kept) / len(judged), 3),
                               "rejection_reasons": dict(reasons.most_common())}
        if trajs:
            stages["rollout"]["ends"] = dict(Counter(t.get("end") for t in trajs.values()))
        agents = {a["id"]: a for a in load("agents.jsonl")}
        tools_used = Counter(c["name"] for t in kept for c in t["calls"])
        kits = Counter(k for t in kept for k in agents.get(t["agent_id"], {}).get("toolkits", []))
        counters: Counter[str] = Counter()
        requests: Counter[str] = Counter()
        for p in sorted(self.path("stats").glob("*.json")) if self.path("stats").exists() else []:
            counters.update(read_json(p).get("counters", {}))
            requests.update(read_json(p).get("requests", {}))
        llm_calls = {k: v for k, v in counters.items() if k.startswith("llm.") and k.endswith(".calls")}
        total_calls = sum(llm_calls.values())
        card = {
            "stages": stages,
            "kept": len(kept),
            "turns": _dist([t["turns"] for t in kept]),
            "calls_per_trajectory": _dist([len(t["calls"]) for t in kept]),
            "executors": dict(Counter(c["executor"].split(":")[0] for t in kept for c in t["calls"])),
            "simulated_outcomes": dict(Counter(c["mode"] for t in kept for c in t["calls"] if c["executor"] == "simulator")),
            "toolkits": dict(kits.most_common()),
            "tools": dict(tools_used.most_common(50)),
            "llm_calls": dict(sorted(llm_calls.items())),
            "llm_calls_per_kept_trajectory": round(total_calls / len(kept), 1) if kept else None,
            # requests the clients really sent (schema retries included, disk-cache hits excluded)
            "llm_requests": dict(requests),
            "llm_requests_per_kept_trajectory": (round((requests["llm_requests"] - requests["llm_requests_cached"]) / len(kept), 1)
                                                 if kept and requests else None),
            "bad_llm_output": {k: v for k, v in sorted(counters.items())
                               if k.startswith("llm.") and not k.endswith(".calls")},
            "events": {k: v for k, v in sorted(counters.items()) if not k.startswith("llm.")},
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()},
        }
        return card


ITEM_STAGES = {"agents": "agents.jsonl", "tasks": "tasks.jsonl", "rollout": "trajectories.jsonl", "judge": "judged.jsonl"}


def shard_of(item_id: str, shards: int) -> int:
    """The shard of an item: a hash of its id, the same on every run."""
    return int(stable_id(item_id, n=8), 16) % shards


def merge_shards(out: Path, stage: str, shards: int) -> int:
    """Append the shards' records of `stage` that OUT's file lacks (or holds only as retryable); add up their
    counters into OUT/stats. Returns the number of records merged."""
    main = JsonlStore(Path(out) / ITEM_STAGES[stage])
    merged = 0
    total: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    for k in range(shards):
        d = Path(out) / "shards" / f"{k}-of-{shards}"
        for rec in JsonlStore(d / ITEM_STAGES[stage]).values() if (d / ITEM_STAGES[stage]).exists() else []:
            if rec["id"] not in main.done and main.records.get(rec["id"]) != rec:
                main.add(rec)
                merged += 1
        sp = d / "stats" / f"{stage}.json"
        if sp.exists():
            data = read_json(sp)
            total.update(data.get("counters", {}))
            requests.update(data.get("requests", {}))
            sp.unlink()  # counted once
    p = Path(out) / "stats" / f"{stage}.json"
    old = read_json(p) if p.exists() else {"stage": stage, "counters": {}}
    c = Counter(old.get("counters", {}))
    c.update(total)
    r = Counter(old.get("requests", {}))
    r.update(requests)
    atomic_write(p, json.dumps({**old, "counters": dict(sorted(c.items())), "requests": dict(r)}, indent=2) + "\n")
    return merged


def _outcome(recs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = sum(bool(r.get("ok")) for r in recs)
    return {"items": len(recs), "ok": ok, "failed": len(recs) - ok}


def _dist(xs: list[int]) -> dict[str, Any]:
    if not xs:
        return {}
    return {"mean": round(statistics.mean(xs), 2), "min": min(xs), "max": max(xs)}


def card_markdown(card: dict[str, Any]) -> str:
    st = card["stages"]
    lines = ["# Synthetic agentic data: dataset card", "",
             "Made by `openk2 synth` (K2 report section 3.1.1): MCP and synthetic tools -> agents -> tasks with rubrics -> "
             "trajectories (simulated user, agent, real tools or a tool simulator) -> rubric judge.", "",
             "| stage | numbers |", "|---|---|"]
    for name, d in st.items():
        flat = ", ".join(f"{k} {v}" for k, v in d.items() if not isinstance(v, dict))
        lines.append(f"| {name} | {flat} |")
    lines += ["", f"Kept trajectories: **{card['kept']}**; turns {card['turns']}; tool calls per trajectory "
              f"{card['calls_per_trajectory']}; LLM calls per kept trajectory {card['llm_calls_per_kept_trajectory']} "
              f"({card['llm_requests_per_kept_trajectory']} requests sent, schema retries included).", ""]

    def table(title: str, d: dict[str, Any]) -> None:
        if d:
            lines.extend([f"## {title}", "", "| | count |", "|---|---|"] + [f"| {k} | {v} |" for k, v in d.items()] + [""])

    table("Rejection reasons", st.get("judge", {}).get("rejection_reasons", {}))
    table("Dialogue ends", st.get("rollout", {}).get("ends", {}))
    table("Task failures", st.get("tasks", {}).get("reasons", {}))
    table("Failed MCP servers", st.get("harvest", {}).get("failed", {}))
    table("Toolkits of kept trajectories", card["toolkits"])
    table("Tools called in kept trajectories", card["tools"])
    table("Tool executors", card["executors"])
    table("Simulated outcomes", card["simulated_outcomes"])
    table("LLM calls per role", card["llm_calls"])
    table("Bad LLM output", card["bad_llm_output"])
    table("Events", card["events"])
    return "\n".join(lines) + "\n"
