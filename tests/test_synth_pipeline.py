"""openk2 synth's pipeline against recorded replies served over real HTTP (openk2.synth.replay), with the
real MCP filesystem and memory servers executing the agent's calls.

Recorded replies for each role:

Each role is told apart by its system prompt; replies that depend on the tools a request carries are
functions of the request body (the agent calls the tools it was given, the task writer writes gold actions
for them)."""

from __future__ import annotations

import json
import re

NOT_JSON = "Sorry, I cannot write that task."


def _last(body):
    return body["messages"][-1].get("content") or ""


def _tool_names(text):
    return re.findall(r'"name": "([A-Za-z0-9_-]+)"', text)


def domains(body):
    cat = re.search(r"Category: ([^.\n]+)", _last(body)).group(1).strip()
    return {"content": json.dumps({"domains": [
        {"name": f"{cat} ledger", "description": f"Keeps the records of {cat}."},
        {"name": f"{cat} scheduler", "description": f"Plans jobs for {cat}."}]})}


def tools(body):
    m = re.search(r"Application domain: ([^:]+):", _last(body))
    dom = re.sub(r"[^a-z0-9]+", "_", m.group(1).lower()).strip("_")
    params = [{"name": "record_id", "type": "string", "description": "id of the record", "required": True}]
    return {"content": json.dumps({"tools": [
        {"name": f"get_{dom}_record", "description": f"Look up one record of the {dom.replace('_', ' ')} by id and return it.",
         "parameters": params, "reads": "records", "changes": "nothing", "read_only": True},
        {"name": f"close_{dom}_record", "description": f"Mark a record of the {dom.replace('_', ' ')} as closed.",
         "parameters": params, "reads": "records", "changes": "the record's status", "read_only": False},
        # the same name as a real MCP tool: dropped by name
        {"name": "read_file", "description": "Read a file.", "parameters": [], "reads": "files", "changes": "nothing",
         "read_only": True},
        # a near-duplicate of the first tool: dropped by embedding similarity
        {"name": f"fetch_{dom}_record", "description": f"Look up one record of the {dom.replace('_', ' ')} by id and return it.",
         "parameters": params, "reads": "records", "changes": "nothing", "read_only": True},
    ]})}


AGENT = {"content": json.dumps({"role": "records assistant", "system_prompt":
                                "You help users manage their records with your tools. Ask for missing details and "
                                "report what you did."})}


def gold_for(names):
    if "write_file" in names:
        return ([{"name": "write_file", "arguments": {"path": "/workspace/report.txt", "content": "total: 42"}}],
                ["/workspace/report.txt contains 'total: 42'"])
    if "create_entities" in names:
        return ([{"name": "create_entities", "arguments": {"entities": [
                    {"name": "Ada", "entityType": "person", "observations": ["likes tea"]}]}}],
                ["The knowledge graph has an entity Ada who likes tea"])
    name = next(n for n in names if n.startswith("close_") or n.startswith("get_"))
    return [{"name": name, "arguments": {"record_id": "r1"}}], ["Record r1 was handled"]


def task(body):
    text = body["messages"][1]["content"]  # the task prompt (a schema retry appends feedback after it)
    if "a detail the user only gives" in text:
        return {"content": NOT_JSON}  # bad output: every multi-turn task fails its schema
    names = re.findall(r'^\{"name": "([A-Za-z0-9_-]+)"', text, re.M)
    gold, criteria = gold_for(names)
    out = {"user_goal": "Please take care of my record for me.", "known_info": "The record is r1.", "hidden_info": "",
           "success_criteria": criteria, "checkpoints": ["The assistant called a tool"], "gold_actions": gold}
    schema = body["response_format"]["json_schema"]["schema"]["properties"]
    if "initial_files" in schema:
        out["initial_files"] = [{"path": "/workspace/data.txt", "content": "42"}]
    else:
        out["initial_state"] = {"records": {"r1": {"status": "open"}}}
    return {"content": json.dumps(out)}


def agent(body):
    msgs = body["messages"]
    names = [t["function"]["name"] for t in body["tools"]]
    if msgs[-1]["role"] == "tool":
        return {"content": f"Done. The tool said: {msgs[-1]['content'][:60]}"}
    gold, _ = gold_for(names)
    return {"tool_calls": [{"name": g["name"], "arguments": g["arguments"]} for g in gold]}


SIM = {"content": json.dumps({"output": json.dumps({"id": "r1", "status": "closed"}),
                              "updates": {"records": {"r1": {"status": "closed"}}}})}


def judge(body):
    n = len(re.findall(r"^\d+\. \[", _last(body), re.M))
    return {"content": json.dumps({"verdicts": [{"item": i, "verdict": "pass", "reason": "the transcript shows it"}
                                                for i in range(1, n + 1)]})}


USER = [{"content": "Hi, please take care of record r1 for me."}, {"content": "###STOP###"}]


def script():
    return [
        {"system": "You design realistic software tools", "schema": "domains", "reply": domains},
        {"system": "You design realistic software tools", "schema": "tools", "reply": tools},
        {"system": "You write system prompts", "reply": AGENT},
        {"system": "You write evaluation tasks", "reply": task},
        {"system": "You are role-playing a user", "reply": USER},
        {"system": "You are the backend", "reply": SIM},
        {"system": "You grade transcripts", "reply": judge},
        {"has_tools": True, "reply": agent},
    ]


# -- tests ----------------------------------------------------------------------------------------------------

import pytest

from openk2.synth.mcp import SERVERS, default_install_dir, installed_version, npm_install


def _mcp_ready(names=("filesystem", "memory")):
    specs = [s for s in SERVERS if s.name in names]
    if all(installed_version(s, default_install_dir()) == s.version for s in specs):
        return True
    import shutil

    if shutil.which("npm") is None or shutil.which("node") is None:
        return False
    status = npm_install(specs, timeout=180)
    return all(v in ("installed", "cached") for v in status.values())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One pipeline run (harvest of the real filesystem + memory servers, then every stage) over the replay server."""
    if not _mcp_ready():
        pytest.skip("npm MCP servers not installed and npm cannot install them")
    from openk2.llm import make_client
    from openk2.synth.pipeline import Clients, Pipeline, SynthConfig
    from openk2.synth.replay import ReplayServer

    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(out=out, servers=("filesystem", "memory"), categories=2, domains_per_category=2, tools_per_domain=4,
                      agents=6, tasks_per_agent=3, exec_fraction=0.5, concurrency=4, failure_rate=0.0, partial_rate=0.0,
                      edge_rate=0.0, progress=False, bfcl=False)
    with ReplayServer(script()) as srv:
        client = make_client(srv.url, cache_dir=out / "llm_cache", max_concurrency=4)
        client.schema_retries = 1
        results = Pipeline(cfg, Clients.same(client)).run(["harvest", "evolve", "agents", "tasks", "rollout", "judge", "export"],
                                                          say=lambda s: None)
        n_first = len(srv.requests)
        # a rerun of every stage: finished items are skipped and replies come from the cache
        client2 = make_client(srv.url, cache_dir=out / "llm_cache")
        again = Pipeline(cfg, Clients.same(client2)).run(["evolve", "agents", "tasks", "rollout", "judge", "export"],
                                                         say=lambda s: None)
        n_second = len(srv.requests) - n_first
    return out, results, again, n_first, n_second


def _jsonl(p):
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def test_stage_counts_add_up(run_dir):
    out, res, again, _, _ = run_dir
    assert res["harvest"]["servers_ok"] == 2 and res["harvest"]["tools"] >= 20
    # 2 categories x 2 domains x 4 tools; per domain one name clash with a real tool and one near-duplicate
    assert res["evolve"] == {**res["evolve"], "domains": 4, "generated": 16, "kept": 8, "dropped": 8}
    assert res["evolve"]["repository"] == res["harvest"]["tools"] + 8
    dropped = json.loads((out / "tools_dropped.json").read_text())["tools"]
    assert sorted(d["dropped"] for d in dropped) == ["duplicate_name"] * 4 + ["near_duplicate"] * 4
    assert all(d["tool"]["function"]["name"].startswith(("read_file", "fetch_")) for d in dropped)
    # 6 agents x 3 levels; every multi-turn task reply is not JSON: counted, never a crash
    assert res["tasks"]["items"] == 18 and res["tasks"]["failed"] == 6
    tasks = _jsonl(out / "tasks.jsonl")
    assert {t["reason"] for t in tasks if not t["ok"]} == {"llm_invalid_json"}
    assert {t["level"] for t in tasks if not t["ok"]} == {"multi_turn"}
    assert res["rollout"]["items"] == 12 and res["rollout"]["ended_by_user"] == 12
    assert res["judge"] == {**res["judge"], "judged": 12, "kept": 12}
    card = json.loads((out / "card.json").read_text())
    assert card["kept"] == 12 and card["stages"]["judge"]["pass_rate"] == 1.0
    assert card["bad_llm_output"]["llm.task_generator.invalid_json"] == 6
    # 18 task requests + one schema retry for each of the 6 bad replies
    assert json.loads((out / "stats/tasks.json").read_text())["requests"]["llm_requests"] == 24
    assert card["executors"]["mcp"] == 8 and card["executors"]["simulator"] == 4
    assert "| judge | judged 12, kept 12, pass_rate 1.0 |" in (out / "card.md").read_text()


def test_rerun_is_free(run_dir):
    _, res, again, n_first, n_second = run_dir
    assert n_first > 50 and n_second == 0
    for stage in ("tasks", "rollout", "judge", "export"):
        assert {k: v for k, v in again[stage].items() if k != "seconds"} == {k: v for k, v in res[stage].items() if k != "seconds"}


def test_executable_tasks_replay_to_the_end_state(run_dir):
    out = run_dir[0]
    tasks = {t["id"]: t for t in _jsonl(out / "tasks.jsonl")}
    trajs = _jsonl(out / "trajectories.jsonl")
    exec_trajs = [t for t in trajs if tasks[t["task_id"]]["executable"]]
    assert len(exec_trajs) == 6
    for t in exec_trajs:
        gold = tasks[t["task_id"]]["gold_end_state"]
        assert gold is not None and gold["files"]["data.txt"] == "42"
        assert t["end_state"]["files"] == gold["files"] and t["end_state"].get("memory") == gold.get("memory")
        assert all(c["executor"].startswith("mcp:") and not c["is_error"] for c in t["calls"])
    written = [t for t in exec_trajs if t["calls"][0]["name"] == "write_file"]
    assert written and all(t["end_state"]["files"]["report.txt"] == "total: 42" for t in written)
    # the real server's reply, with the scratch path shown as /workspace
    assert all("/workspace/report.txt" in t["calls"][0]["output"] for t in written)


def test_sft_lines_are_k2_conversations(run_dir):
    from openk2.chat import parse_tool_calls, render

    out = run_dir[0]
    lines = _jsonl(out / "sft.jsonl")
    assert len(lines) == 12
    for rec in lines:
        calls = [c for m in rec["messages"] if m["role"] == "assistant" for c in m.get("tool_calls") or []]
        assert [c["id"] for c in calls] == [f"functions.{c['function']['name']}:{i}" for i, c in enumerate(calls)]
        results = [m for m in rec["messages"] if m["role"] == "tool"]
        assert [m["tool_call_id"] for m in results] == [c["id"] for c in calls]
        text = render(rec["messages"], rec["tools"])
        assert f"## Return of {calls[0]['id']}" in text
        # the assistant's call, rendered in K2's tokens, parses back to the same call
        section = text[text.index("<|tool_calls_section_begin|>"): text.index("<|tool_calls_section_end|>") + 26]
        back = parse_tool_calls(section, rec["tools"])
        assert back.ok and back.tool_calls[0].id == calls[0]["id"]
        assert rec["meta"]["verdicts"] and all(v["verdict"] == "pass" for v in rec["meta"]["verdicts"])


@pytest.mark.slow
def test_end_to_end_with_the_local_model(tmp_path):
    """Every stage with the real SmolLM2-135M-Instruct in process (schema-constrained decoding) and the real
    filesystem/memory servers: the small model's output is poor, but every item is accounted for and the
    kept data (if any) is valid K2 SFT data."""
    if not _mcp_ready():
        pytest.skip("npm MCP servers not installed")
    from openk2.cli import main

    out = tmp_path / "run"
    args = ["synth", "all", "--out", str(out), "--llm", "smollm2", "--servers", "filesystem,memory", "--categories", "1",
            "--domains-per-category", "1", "--tools-per-domain", "2", "--agents", "2", "--tasks-per-agent", "1",
            "--max-turns", "2", "--max-steps", "2", "--max-tokens", "96", "--concurrency", "1", "--no-progress"]
    assert main(args) == 0
    card = json.loads((out / "card.json").read_text())
    st = card["stages"]
    assert st["harvest"]["servers_ok"] == 2 and st["repository"]["by_source"]["mcp"] >= 20
    assert (out / "tool_map.png").read_bytes()[:4] == b"\x89PNG"
    assert st["agents"]["items"] == 2
    tasks = _jsonl(out / "tasks.jsonl")
    assert len(tasks) == st["agents"]["ok"] and all(t["ok"] or t["reason"] for t in tasks)
    trajs = _jsonl(out / "trajectories.jsonl")
    assert len(trajs) == sum(t["ok"] for t in tasks)
    judged = _jsonl(out / "judged.jsonl")
    assert len(judged) == len(trajs) and all(j["keep"] or j["reasons"] for j in judged)
    kept = _jsonl(out / "sft.jsonl")
    assert len(kept) == card["kept"] == sum(j["keep"] for j in judged)
    # a second run of everything loads no model and makes no model call
    assert main(args) == 0
    again = json.loads((out / "card.json").read_text())
    assert again["kept"] == card["kept"] and again["llm_requests"] == card["llm_requests"]


@pytest.mark.slow
def test_item_stages_on_ray_match_a_local_run(tmp_path):
    """agents/tasks/rollout/judge as Ray tasks over 3 shards (a real local Ray instance) give the same records
    as one local run."""
    pytest.importorskip("ray")
    if not _mcp_ready():
        pytest.skip("npm MCP servers not installed")
    from openk2.llm import make_client
    from openk2.synth.pipeline import Clients, Pipeline, SynthConfig
    from openk2.synth.ray_stage import run_on_ray
    from openk2.synth.replay import ReplayServer

    def cfg(out):
        return SynthConfig(out=out, servers=("filesystem", "memory"), categories=1, domains_per_category=2,
                           tools_per_domain=4, agents=4, tasks_per_agent=2, exec_fraction=0.5, concurrency=2,
                           failure_rate=0.0, partial_rate=0.0, edge_rate=0.0, progress=False, bfcl=False)

    with ReplayServer(script()) as srv:
        local = Pipeline(cfg(tmp_path / "local"), Clients.same(make_client(srv.url)))
        local.run(["harvest", "evolve", "agents", "tasks", "rollout", "judge", "export"], say=lambda s: None)
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            res = run_on_ray(cfg(tmp_path / "ray"), {r: srv.url for r in ("agent_writer", "task_generator", "user",
                                                                           "simulator", "agent", "judge", "tool_generator")},
                             ["harvest", "evolve", "agents", "tasks", "rollout", "judge", "export"], shards=3,
                             clients=Clients.same(make_client(srv.url)), say=lambda s: None)
        finally:
            ray.shutdown()
    assert res["rollout"]["shards"] == 3 and res["judge"]["merged"] == res["judge"]["judged"] > 0
    for f in ("agents.jsonl", "tasks.jsonl", "judged.jsonl"):
        a = {r["id"]: r for r in _jsonl(tmp_path / "local" / f)}
        b = {r["id"]: r for r in _jsonl(tmp_path / "ray" / f)}
        assert a.keys() == b.keys()
        if f != "tasks.jsonl":
            assert a == b
    assert json.loads((tmp_path / "ray" / "card.json").read_text())["kept"] == json.loads(
        (tmp_path / "local" / "card.json").read_text())["kept"]
