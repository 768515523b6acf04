"""SandboxFusion-compatible HTTP API: a client backend (for a sandbox cluster) and a server over the local backend.

The API (SandboxFusion's ``POST /run_code``)::

    request:  {"code": str, "language": "python" | "bash" | ..., "run_timeout": s, "compile_timeout": s,
               "memory_limit_MB": int (-1: none), "stdin": str | null, "files": {path: base64 | null},
               "fetch_files": [path], "args": [str], "output_limit_bytes": int (an openk2 extension)}
    response: {"status": "Success" | "Failed" | "SandboxError", "message": str, "compile_result": null,
               "run_result": {"status": "Finished" | "TimeLimitExceeded" | "Error", "execution_time": s,
                              "return_code": int | null, "stdout": str, "stderr": str},
               "files": {path: base64}, "executor_pod_name": null}

The client sends any command as a ``bash`` program (``exec`` of the shell-quoted argv) with the request's
files, so everything openk2 runs locally also runs remotely. Our server adds an ``openk2`` object to the
response (the full RunResult without stdout/stderr: memory / output_limit / killed, CPU time...); the
client uses it when present and maps SandboxFusion's coarser status otherwise.
"""


import base64
import re
import shlex

from openk2.sandbox.types import (
    ERROR,
    MEMORY,
    OK,
    TIMEOUT,
    Limits,
    RunRequest,
    RunResult,
    SandboxError,
)

SERVER_LANGUAGES = ("python", "bash")
_MEMORY_RE = re.compile(r"MemoryError|Cannot allocate memory|std::bad_alloc|[Oo]ut of memory")


def to_fusion_request(req: RunRequest, limits: Limits) -> dict:
    files = req.encoded_files()
    script = "exec " + shlex.join(req.command) + "\n"
    return {"code": script, "language": "bash", "run_timeout": float(limits.timeout_s), "compile_timeout": 10.0,
            "memory_limit_MB": int(limits.memory_mb) if limits.memory_mb else -1,
            "stdin": req.stdin if isinstance(req.stdin, str) else (req.stdin.decode("utf-8", "replace")
                                                                    if req.stdin else None),
            "files": files, "fetch_files": list(req.fetch_files),
            "output_limit_bytes": int(limits.output_bytes)}  # an extension; SandboxFusion ignores it


def from_fusion_response(body: dict, limits: Limits, wall_s: float, backend: str) -> RunResult:
    rr = body.get("run_result") or {}
    extra = body.get("openk2") or {}
    stdout, stderr = str(rr.get("stdout") or ""), str(rr.get("stderr") or "")
    out_t, err_t = len(stdout.encode()) > limits.output_bytes, len(stderr.encode()) > limits.output_bytes
    stdout = stdout.encode()[:limits.output_bytes].decode("utf-8", "ignore")
    stderr = stderr.encode()[:limits.output_bytes].decode("utf-8", "ignore")
    files = {k: base64.b64decode(v) for k, v in (body.get("files") or {}).items() if v is not None}
    rc = rr.get("return_code")
    if extra.get("status"):
        status, error = extra["status"], extra.get("error", "")
    elif body.get("status") == "SandboxError" or rr.get("status") == "Error" or not rr:
        status, error = ERROR, str(body.get("message") or stderr or "remote sandbox error")[:2000]
    elif rr.get("status") == "TimeLimitExceeded":
        status, error = TIMEOUT, f"wall-clock timeout ({limits.timeout_s:g} s)"
    elif rc not in (None, 0) and _MEMORY_RE.search(stderr[-4096:]):
        status, error = MEMORY, ""
    else:
        status, error = OK, ""
    return RunResult(status=status, exit_code=extra.get("exit_code", rc), signal=extra.get("signal"),
                     stdout=stdout, stderr=stderr, wall_s=round(wall_s, 4), cpu_s=extra.get("cpu_s"),
                     max_rss_mb=extra.get("max_rss_mb"), stdout_truncated=out_t or bool(extra.get("stdout_truncated")),
                     stderr_truncated=err_t or bool(extra.get("stderr_truncated")), backend=backend,
                     isolation=f"remote ({extra.get('isolation', 'unknown')})", memory_limit_by="remote",
                     orphans_killed=int(extra.get("orphans_killed", 0)), error=error, files=files)


class RemoteBackend:
    """A SandboxFusion-compatible server (``POST {url}/run_code``) as a sandbox backend."""

    python = "python3"  # the remote machine's interpreter

    def __init__(self, url: str, request_timeout_s: float = 30.0):
        if not url.startswith(("http://", "https://")):
            raise SandboxError(f"remote sandbox URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.name = f"remote {self.url}"
        self.isolation = "remote"
        self.request_timeout_s = request_timeout_s
        self._clients: dict = {}

    def availability(self):  # pragma: no cover - trivial
        return True, "not probed"

    def _client(self):
        import asyncio

        import httpx

        loop = asyncio.get_running_loop()
        c = self._clients.get(id(loop))
        if c is None or c[0] is not loop:
            c = self._clients[id(loop)] = (loop, httpx.AsyncClient(timeout=None))
        return c[1]

    async def run(self, req: RunRequest, limits: Limits) -> RunResult:
        import time

        import httpx

        t0 = time.monotonic()
        body = to_fusion_request(req, limits)
        try:
            r = await self._client().post(self.url + "/run_code", json=body,
                                          timeout=limits.timeout_s + self.request_timeout_s)
        except httpx.HTTPError as e:
            return RunResult(ERROR, None, "", "", round(time.monotonic() - t0, 4), backend=self.name,
                             isolation="remote", error=f"remote sandbox {self.url}: {type(e).__name__}: {e}")
        if r.status_code != 200:
            return RunResult(ERROR, None, "", "", round(time.monotonic() - t0, 4), backend=self.name,
                             isolation="remote", error=f"remote sandbox {self.url}: HTTP {r.status_code}: "
                                                   f"{r.text[:300]}")
        try:
            data = r.json()
        except ValueError:
            return RunResult(ERROR, None, "", "", round(time.monotonic() - t0, 4), backend=self.name,
                             isolation="remote", error=f"remote sandbox {self.url}: response is not JSON")
        return from_fusion_response(data, limits, time.monotonic() - t0, self.name)


# ---------------------------------------------------------------------------------------------- server

def create_app(sandbox, max_timeout_s: float = 300.0, max_memory_mb: int = 16384):
    """A FastAPI app serving SandboxFusion's ``/run_code`` over `sandbox` (an openk2 Sandbox)."""
    from typing import Optional

    from fastapi import FastAPI
    from pydantic import BaseModel, Field

    class RunCodeRequest(BaseModel):
        code: str
        language: str
        compile_timeout: float = 10
        run_timeout: float = Field(10, gt=0)
        memory_limit_MB: int = -1
        stdin: Optional[str] = None
        files: dict[str, Optional[str]] = {}
        fetch_files: list[str] = []
        args: list[str] = []
        output_limit_bytes: Optional[int] = Field(None, gt=0)  # openk2 extension

    app = FastAPI(title="openk2 sandbox (SandboxFusion-compatible)")

    @app.get("/v1/ping")
    async def ping():
        return "pong"

    @app.post("/run_code")
    async def run_code(request: RunCodeRequest):
        resp = {"status": "Success", "message": "", "compile_result": None, "run_result": None, "files": {},
                "executor_pod_name": None}
        if request.language not in SERVER_LANGUAGES:
            resp.update(status="SandboxError", message=f"language {request.language!r} is not supported by this "
                                                       f"server ({', '.join(SERVER_LANGUAGES)})")
            return resp
        try:
            files = {p: base64.b64decode(v) if v else b"" for p, v in request.files.items()}
            # the code gets a name of its own, so the request's files (main.py, main.sh...) stay as sent
            main = "__fusion_main__.py" if request.language == "python" else "__fusion_main__.sh"
            files[main] = request.code.encode()
            cmd = [sandbox.backend_python(), main] if request.language == "python" else ["bash", main]
            limits = sandbox.limits.with_(
                timeout_s=min(float(request.run_timeout), max_timeout_s),
                # -1 (no limit asked): the server's own default limit still applies
                memory_mb=min(request.memory_limit_MB, max_memory_mb) if request.memory_limit_MB > 0 else None,
                output_bytes=min(request.output_limit_bytes, sandbox.limits.output_bytes)
                if request.output_limit_bytes else None)
            req = RunRequest(cmd + list(request.args), files=files, stdin=request.stdin,
                             fetch_files=list(request.fetch_files), limits=limits)
            res = await sandbox.run(req)
        except (SandboxError, ValueError) as e:
            resp.update(status="SandboxError", message=str(e))
            return resp
        run_status = {TIMEOUT: "TimeLimitExceeded", ERROR: "Error"}.get(res.status, "Finished")
        resp["run_result"] = {"status": run_status, "execution_time": res.wall_s, "return_code": res.exit_code,
                              "stdout": res.stdout, "stderr": res.stderr}
        resp["files"] = {k: base64.b64encode(v).decode() for k, v in res.files.items()}
        if res.status == ERROR:
            resp.update(status="SandboxError", message=res.error)
        elif res.status != OK or res.exit_code != 0:
            resp["status"] = "Failed"
        extra = res.to_json()
        for k in ("stdout", "stderr", "files"):
            extra.pop(k, None)
        resp["openk2"] = extra
        return resp

    return app
