"""Real MCP servers from npm over stdio with the official ``mcp`` SDK: harvest, 1:1 OpenAI conversion,
failures reported and skipped, real execution in a scratch folder. Skips when node/npm cannot provide them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil

import pytest

pytest.importorskip("mcp")

from openk2.chat.schema import schema_problem  # noqa: E402
from openk2.synth.mcp import SERVERS, MCPSession, default_install_dir, harvest, installed_version, npm_install, server_by_name  # noqa: E402
from openk2.synth.repo import tool_problems  # noqa: E402

NAMES = ("filesystem", "memory", "everything")


@pytest.fixture(scope="module")
def prefix():
    specs = [server_by_name(n) for n in NAMES]
    if not all(installed_version(s, default_install_dir()) == s.version for s in specs):
        if shutil.which("npm") is None or shutil.which("node") is None:
            pytest.skip("node/npm not available")
        status = npm_install(specs, timeout=180)
        if not all(v in ("installed", "cached") for v in status.values()):
            pytest.skip(f"npm could not install the MCP servers: {status}")
    return default_install_dir()


def test_harvest_real_servers_and_report_failures(prefix):
    fs = server_by_name("filesystem")
    # node exits at start-up (a preload that does not exist): the server never answers initialize
    broken = dataclasses.replace(fs, name="filesystem-no-root", env=(("NODE_OPTIONS", "--require=/nonexistent/x.js"),))
    missing = dataclasses.replace(fs, name="not-installed", package="@openk2/no-such-server")
    res = asyncio.run(harvest([server_by_name(n) for n in NAMES] + [broken, missing], prefix, timeout=20))
    by = {s["name"]: s for s in res.servers}
    assert [by[n]["ok"] for n in NAMES] == [True, True, True]
    assert not by["filesystem-no-root"]["ok"] and by["filesystem-no-root"]["error"]
    assert not by["not-installed"]["ok"] and "openk2 synth install" in by["not-installed"]["error"]
    assert len(res.tools) == sum(by[n]["tools"] for n in NAMES) >= 30
    assert by["filesystem"]["server_info"]["name"]
    for e in res.tools:
        assert tool_problems(e["tool"]) == [], e["id"]
        # 1:1: the OpenAI function carries the server's name, description and input schema unchanged
        fn, raw = e["tool"]["function"], e["mcp"]
        assert (fn["name"], fn["description"], fn["parameters"]) == (raw["name"], raw.get("description", ""), raw["inputSchema"])
        assert schema_problem(fn["parameters"]) is None
    ann = {e["id"]: e["annotations"] for e in res.tools}
    assert ann["mcp/filesystem/read_text_file"]["readOnlyHint"] is True
    assert ann["mcp/filesystem/write_file"]["readOnlyHint"] is False
    assert any("destructiveHint" in a for a in ann.values())
    assert {e["executable"] for e in res.tools if e["server"] in ("filesystem", "memory")} == {True}


def test_memory_server_executes_for_real(prefix, tmp_path):
    async def run():
        async with MCPSession(server_by_name("memory"), tmp_path / "memory", prefix) as s:
            out1, err1 = await s.call_tool("create_entities", {"entities": [
                {"name": "Ada", "entityType": "person", "observations": ["writes programs"]}]})
            out2, err2 = await s.call_tool("read_graph", {})
            out3, err3 = await s.call_tool("no_such_tool", {})
        return (out1, err1), (out2, err2), (out3, err3)

    (o1, e1), (o2, e2), (o3, e3) = asyncio.run(run())
    assert not e1 and not e2 and e3
    assert "writes programs" in o2 and json.loads(o2)["entities"][0]["name"] == "Ada"
    lines = (tmp_path / "memory" / "memory.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["name"] == "Ada"


def test_catalogue_is_pinned():
    assert len(SERVERS) >= 20 and len({s.name for s in SERVERS}) == len(SERVERS)
    assert all(s.version[0].isdigit() for s in SERVERS)
