"""Real MCP tools (K2 report section 3.1.1): install servers from npm, start them over stdio with the
official ``mcp`` SDK, ``initialize`` + ``tools/list``, and keep every tool 1:1 in OpenAI function format.

The servers install once into a cache folder (``npm install --ignore-scripts`` of pinned versions, so no
post-install step downloads a browser); each is then started by its package's own ``bin`` under
``node``. Servers that need an account get a placeholder credential: listing tools never contacts the
service, and a server that still refuses to start is reported and skipped.

:class:`MCPSession` keeps one server running for real tool execution (the filesystem and memory servers
inside a throw-away directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.errors import OpenK2Error

PLACEHOLDER = "openk2-placeholder"


@dataclass(frozen=True)
class ServerSpec:
    """One MCP server: npm package (pinned), its bin, arguments ({root} = a scratch folder) and environment."""

    name: str
    package: str
    version: str
    bin: str | None = None  # default: the package's only/first bin
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    executable: bool = False  # safe to run for real inside a scratch folder (filesystem, memory)


def _spec(name: str, package: str, version: str, *args: str, env: dict[str, str] | None = None,
          bin: str | None = None, executable: bool = False) -> ServerSpec:
    return ServerSpec(name, package, version, bin, tuple(args), tuple(sorted((env or {}).items())), executable)


P = PLACEHOLDER
# The default catalogue: npm MCP servers that list their tools offline (credentials are placeholders).
SERVERS: tuple[ServerSpec, ...] = (
    _spec("filesystem", "@modelcontextprotocol/server-filesystem", "2026.8.31", "{root}", executable=True),
    _spec("memory", "@modelcontextprotocol/server-memory", "2026.8.31", env={"MEMORY_FILE_PATH": "{root}/memory.jsonl"},
          executable=True),
    _spec("everything", "@modelcontextprotocol/server-everything", "2026.8.31", "stdio"),
    _spec("sequential-thinking", "@modelcontextprotocol/server-sequential-thinking", "2026.8.31"),
    _spec("github", "@modelcontextprotocol/server-github", "2025.4.8", env={"GITHUB_PERSONAL_ACCESS_TOKEN": P}),
    _spec("gitlab", "@modelcontextprotocol/server-gitlab", "2025.4.25", env={"GITLAB_PERSONAL_ACCESS_TOKEN": P}),
    _spec("google-maps", "@modelcontextprotocol/server-google-maps", "0.6.2", env={"GOOGLE_MAPS_API_KEY": P}),
    _spec("brave-search", "@modelcontextprotocol/server-brave-search", "0.6.2", env={"BRAVE_API_KEY": P}),
    _spec("slack", "@modelcontextprotocol/server-slack", "2025.4.25", env={"SLACK_BOT_TOKEN": P, "SLACK_TEAM_ID": P}),
    _spec("redis", "@modelcontextprotocol/server-redis", "2025.4.25", "redis://127.0.0.1:1"),
    _spec("postgres", "@modelcontextprotocol/server-postgres", "0.6.2", "postgresql://127.0.0.1:1/none"),
    _spec("aws-kb-retrieval", "@modelcontextprotocol/server-aws-kb-retrieval", "0.6.2",
          env={"AWS_ACCESS_KEY_ID": P, "AWS_SECRET_ACCESS_KEY": P, "AWS_REGION": "us-east-1"}),
    _spec("everart", "@modelcontextprotocol/server-everart", "0.6.2", env={"EVERART_API_KEY": P}),
    _spec("puppeteer", "@modelcontextprotocol/server-puppeteer", "2025.5.12"),
    _spec("pdf", "@modelcontextprotocol/server-pdf", "2.0.4", "--stdio"),
    _spec("map", "@modelcontextprotocol/server-map", "2.0.3", "--stdio"),
    _spec("budget-allocator", "@modelcontextprotocol/server-budget-allocator", "2.0.3", "--stdio"),
    _spec("system-monitor", "@modelcontextprotocol/server-system-monitor", "2.0.3", "--stdio"),
    _spec("playwright", "@playwright/mcp", "0.0.83"),
    _spec("chrome-devtools", "chrome-devtools-mcp", "1.11.0"),
    _spec("context7", "@upstash/context7-mcp", "4.1.1"),
    _spec("notion", "@notionhq/notion-mcp-server", "2.5.2", env={"NOTION_TOKEN": P}),
    _spec("desktop-commander", "@wonderwhy-er/desktop-commander", "0.2.52"),
    _spec("tavily", "tavily-mcp", "0.2.22", env={"TAVILY_API_KEY": P}),
    _spec("firecrawl", "firecrawl-mcp", "3.26.0", env={"FIRECRAWL_API_KEY": P}),
    _spec("mongodb", "mongodb-mcp-server", "3.0.4"),
    _spec("gitlab-extended", "@zereight/mcp-gitlab", "2.1.64", env={"GITLAB_PERSONAL_ACCESS_TOKEN": P}),
    _spec("circleci", "@circleci/mcp-server-circleci", "0.20.0", env={"CIRCLECI_TOKEN": P}),
)


def server_by_name(name: str, servers: tuple[ServerSpec, ...] = SERVERS) -> ServerSpec:
    for s in servers:
        if s.name == name:
            return s
    raise OpenK2Error(f"no MCP server named {name!r} (known: {', '.join(s.name for s in servers)})")


def default_install_dir() -> Path:
    """$OPENK2_MCP_DIR if set (and not empty), else ~/.cache/openk2/mcp-servers."""
    return Path(os.environ.get("OPENK2_MCP_DIR") or Path.home() / ".cache" / "openk2" / "mcp-servers")


# -- install -------------------------------------------------------------------------------------------------

def npm_install(servers: tuple[ServerSpec, ...] | list[ServerSpec], prefix: Path | None = None,
                timeout: float = 1800.0) -> dict[str, str]:
    """``npm install`` the pinned packages into `prefix` (skipping those already there).

    Returns {server name: "installed" | "cached" | error text}. One failing package does not stop the rest:
    after a failed batch install each missing package is tried on its own."""
    prefix = Path(prefix or default_install_dir())
    prefix.mkdir(parents=True, exist_ok=True)
    if not (prefix / "package.json").exists():
        (prefix / "package.json").write_text(json.dumps({"name": "openk2-mcp-servers", "private": True}) + "\n")
    npm = shutil.which("npm")
    status: dict[str, str] = {}
    todo = []
    for s in servers:
        if installed_version(s, prefix) == s.version:
            status[s.name] = "cached"
        elif npm is None:
            status[s.name] = "npm not found"
        else:
            todo.append(s)
    if not todo:
        return status
    env = {**os.environ, "PUPPETEER_SKIP_DOWNLOAD": "1", "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}
    cmd = [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error", "--prefix", str(prefix)]

    def run(pkgs: list[ServerSpec]) -> str:
        try:
            r = subprocess.run(cmd + [f"{s.package}@{s.version}" for s in pkgs], capture_output=True, text=True,
                               timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return f"npm install timed out after {timeout:.0f} s"
        return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["npm install failed"])[-1]

    err = run(todo)
    for s in todo:
        if installed_version(s, prefix) == s.version:
            status[s.name] = "installed"
        elif err:
            one = run([s])
            status[s.name] = "installed" if installed_version(s, prefix) == s.version else (one or err)
        else:
            status[s.name] = "not installed"
    return status


def installed_version(spec: ServerSpec, prefix: Path) -> str | None:
    try:
        return json.loads((prefix / "node_modules" / spec.package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def server_command(spec: ServerSpec, prefix: Path, root: Path) -> tuple[str, list[str], dict[str, str]]:
    """(node, [entry script, args...], env) for a server installed under `prefix`."""
    pkg_dir = prefix / "node_modules" / spec.package
    try:
        meta = json.loads((pkg_dir / "package.json").read_text())
    except (OSError, ValueError):
        raise OpenK2Error(f"MCP server {spec.name}: {spec.package} is not installed under {prefix} "
                          f"(run `openk2 synth install`)") from None
    bins = meta.get("bin")
    if isinstance(bins, str):
        entry = bins
    elif isinstance(bins, dict) and bins:
        entry = bins.get(spec.bin or "", None) or next(iter(bins.values()))
    else:
        entry = meta.get("main") or "index.js"
    node = shutil.which("node")
    if node is None:
        raise OpenK2Error("node is not on PATH: MCP servers from npm need Node.js")
    fill = {"root": str(root)}
    args = [str(pkg_dir / entry)] + [a.format(**fill) for a in spec.args]
    # HOME is the scratch folder too: a server that writes settings under ~ leaves nothing behind
    env = {"HOME": str(root), **{k: v.format(**fill) for k, v in spec.env}}
    return node, args, env


# -- MCP tool -> OpenAI function ------------------------------------------------------------------------------

def to_openai(tool: dict[str, Any]) -> dict[str, Any]:
    """An MCP ``tools/list`` entry (camelCase JSON) as an OpenAI function tool, name/description/schema kept as is."""
    params = tool.get("inputSchema") or {"type": "object", "properties": {}}
    fn: dict[str, Any] = {"name": tool["name"], "description": tool.get("description") or "", "parameters": params}
    return {"type": "function", "function": fn}


def annotations_of(tool: dict[str, Any]) -> dict[str, Any]:
    """MCP tool annotations (readOnlyHint, destructiveHint, idempotentHint, openWorldHint, title) that are set."""
    return {k: v for k, v in (tool.get("annotations") or {}).items() if v is not None}


# -- a live session ---------------------------------------------------------------------------------------------

class MCPSession:
    """One MCP server over stdio: ``async with MCPSession(spec, root) as s: await s.list_tools()``."""

    def __init__(self, spec: ServerSpec, root: Path, prefix: Path | None = None, timeout: float = 30.0) -> None:
        self.spec, self.root, self.prefix, self.timeout = spec, Path(root), Path(prefix or default_install_dir()), timeout
        self._stack: contextlib.AsyncExitStack | None = None
        self.session: Any = None
        self.server_info: dict[str, Any] = {}
        self._errlog: Any = None

    async def __aenter__(self) -> "MCPSession":
        from mcp import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        node, args, env = server_command(self.spec, self.prefix, self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        params = StdioServerParameters(command=node, args=args, env=env, cwd=str(self.root))
        self._stack = contextlib.AsyncExitStack()
        self._errlog = self._stack.enter_context(open(self.root.parent / f".{self.root.name}.{self.spec.name}.stderr", "w"))
        try:
            read, write = await self._stack.enter_async_context(stdio_client(params, errlog=self._errlog))
            self.session = await self._stack.enter_async_context(ClientSession(read, write, read_timeout_seconds=self.timeout))
            init = await asyncio.wait_for(self.session.initialize(), self.timeout)
            info = getattr(init, "server_info", None)
            self.server_info = info.model_dump(by_alias=True, exclude_none=True) if info is not None else {}
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            with contextlib.suppress(Exception):
                await stack.aclose()

    def stderr_tail(self, n: int = 400) -> str:
        p = self.root.parent / f".{self.root.name}.{self.spec.name}.stderr"
        with contextlib.suppress(OSError):
            return p.read_text(errors="replace").strip()[-n:]
        return ""

    async def list_tools(self) -> list[dict[str, Any]]:
        from mcp import types

        tools, cursor = [], None
        while True:
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            res = await asyncio.wait_for(self.session.list_tools(params=params), self.timeout)
            tools += [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in res.tools]
            cursor = getattr(res, "next_cursor", None)
            if not cursor:
                return tools

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        """(text of the result, is_error). Protocol errors come back as error text, never raised."""
        try:
            res = await asyncio.wait_for(self.session.call_tool(name, arguments), self.timeout)
        except Exception as e:  # noqa: BLE001 - a tool failure is an observation
            return f"Error: {type(e).__name__}: {e}", True
        parts = []
        for c in res.content or []:
            d = c.model_dump(by_alias=True, exclude_none=True, mode="json")
            parts.append(d.get("text") if d.get("type") == "text" else json.dumps(d, ensure_ascii=False))
        if not parts and getattr(res, "structured_content", None) is not None:
            parts.append(json.dumps(res.structured_content, ensure_ascii=False))
        return "\n".join(p for p in parts if p is not None), bool(getattr(res, "is_error", False))


# -- harvest -----------------------------------------------------------------------------------------------------

@dataclass
class HarvestResult:
    tools: list[dict[str, Any]] = field(default_factory=list)  # repository entries
    servers: list[dict[str, Any]] = field(default_factory=list)  # per server: name, ok, tools, error, seconds


async def _harvest_one(spec: ServerSpec, prefix: Path, scratch: Path, timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    t0 = time.monotonic()
    report: dict[str, Any] = {"name": spec.name, "package": f"{spec.package}@{spec.version}", "ok": False, "tools": 0}
    entries: list[dict[str, Any]] = []
    sess = MCPSession(spec, scratch / spec.name, prefix, timeout=timeout)
    try:
        async with sess:
            tools = await sess.list_tools()
            report["server_info"] = sess.server_info
        for t in tools:
            entries.append({
                "id": f"mcp/{spec.name}/{t['name']}",
                "source": "mcp",
                "server": spec.name,
                "package": f"{spec.package}@{spec.version}",
                "executable": spec.executable,
                "tool": to_openai(t),
                "annotations": annotations_of(t),
                "mcp": t,  # the tools/list entry as the server sent it
            })
        report.update(ok=True, tools=len(entries))
    except BaseException as e:  # noqa: BLE001 - a server that fails is reported and skipped
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if isinstance(e, BaseExceptionGroup):
            msg = "; ".join(f"{type(x).__name__}: {x}" for x in e.exceptions)
        tail = sess.stderr_tail()
        report["error"] = (msg + (f" | stderr: {tail}" if tail else ""))[:600]
    report["seconds"] = round(time.monotonic() - t0, 2)
    return report, entries


async def harvest(servers: list[ServerSpec] | tuple[ServerSpec, ...], prefix: Path | None = None, scratch: Path | None = None,
                  concurrency: int = 4, timeout: float = 60.0, on_done: Any = None) -> HarvestResult:
    """Start each server, list its tools, stop it. Failures are reported per server, never raised."""
    import tempfile

    prefix = Path(prefix or default_install_dir())
    out = HarvestResult()
    sem = asyncio.Semaphore(max(1, concurrency))
    with tempfile.TemporaryDirectory(prefix="openk2-mcp-") as tmp:
        scratch_dir = Path(scratch or tmp)

        async def one(spec: ServerSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            async with sem:
                r = await _harvest_one(spec, prefix, scratch_dir, timeout)
            if on_done is not None:
                on_done(r[0])
            return r

        results = await asyncio.gather(*(one(s) for s in servers))
    seen: set[str] = set()
    for report, entries in results:
        out.servers.append(report)
        for e in entries:
            if e["id"] not in seen:
                seen.add(e["id"])
                out.tools.append(e)
    return out
