"""The sandbox interface: runs, files, stdin, limits, the pool, backend choice, the per-test runner, the CLI,
and the SandboxFusion-compatible client against our own server on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))
from sandbox_helpers import PROJECT_ROOT, isolating_sandbox  # noqa: E402

from openk2.sandbox import (  # noqa: E402
    ERROR,
    MEMORY,
    OK,
    OUTPUT_LIMIT,
    TIMEOUT,
    Limits,
    RunRequest,
    Sandbox,
    SandboxError,
    TestCase,
    get_backend,
    run_tests_sync,
)


@pytest.fixture(scope="module")
def sb():
    return isolating_sandbox(limits=Limits(timeout_s=10, memory_mb=512), concurrency=2)


# ------------------------------------------------------------------------------------------------ runs

def test_python_run_with_stdin_files_exit_code_and_stderr(sb):
    code = textwrap.dedent("""
        import sys, os
        data = sys.stdin.read()
        print(data[::-1], open("data/in.txt").read(), os.getcwd(), sys.argv[1:])
        print("to stderr", file=sys.stderr)
        sys.exit(7)
    """)
    r = sb.run_python_sync(code, args=["a", "b"], stdin="olleh", files={"data/in.txt": "payload"})
    assert r.status == OK and r.exit_code == 7 and r.signal is None
    assert r.stdout == "hello payload /sandbox ['a', 'b']\n"
    assert r.stderr == "to stderr\n"
    assert r.backend == sb.name and r.isolation == sb.name and r.memory_limit_by == "RLIMIT_AS"
    assert r.cpu_s is not None and r.cpu_s >= 0 and r.wall_s > 0 and r.max_rss_mb > 0
    assert not r.ok


def test_shell_run_binary_files_and_fetch(sb):
    blob = bytes(range(256)) * 3
    r = sb.run_sync(RunRequest(["bash", "-c", "wc -c < blob.bin; sha256sum blob.bin | cut -c1-16; "
                                              "printf 'made\\n' > out/made.txt; cp blob.bin out/copy.bin"],
                               files={"blob.bin": blob, "out/.keep": ""},
                               fetch_files=["out/made.txt", "out/copy.bin", "missing.txt", "../etc/passwd"]))
    import hashlib

    assert r.ok, r
    assert r.stdout.split() == ["768", hashlib.sha256(blob).hexdigest()[:16]]
    assert r.files == {"out/made.txt": b"made\n", "out/copy.bin": blob}  # no missing file, nothing outside


def test_source_dir_is_copied_and_the_copy_thrown_away(sb, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("VALUE = 41\n")
    (tmp_path / "link").symlink_to("/etc/hostname")
    r = sb.run_sync(RunRequest([sys.executable, "-c", "import pkg.mod as m, os; print(m.VALUE + 1); "
                                                      "open('pkg/mod.py', 'w').write('VALUE = 0'); "
                                                      "print(os.readlink('link'))"], src_dir=str(tmp_path)))
    assert r.ok and r.stdout == "42\n/etc/hostname\n", r
    assert (tmp_path / "pkg" / "mod.py").read_text() == "VALUE = 41\n"  # the host copy is untouched
    r2 = sb.run_sync(RunRequest(["ls", "-A"]))
    assert r2.ok and r2.stdout == ""  # the next sandbox starts empty


def test_environment_is_minimal_and_the_host_env_does_not_leak(sb, monkeypatch):
    monkeypatch.setenv("OPENK2_TEST_SECRET_TOKEN", "leak-me")
    r = sb.run_sync(RunRequest(["sh", "-c", "env | sort"], env={"EXTRA": "1"}))
    assert r.ok
    keys = {line.split("=", 1)[0] for line in r.stdout.splitlines()}
    assert "OPENK2_TEST_SECRET_TOKEN" not in keys and "EXTRA" in keys and "HOME" in keys
    assert "leak-me" not in r.stdout


def test_command_not_found_and_bad_requests(sb):
    r = sb.run_sync(RunRequest(["definitely-not-a-command-xyz"]))
    assert r.status == ERROR and "command not found" in r.error
    with pytest.raises(SandboxError, match="list of strings"):
        RunRequest("echo hi")  # type: ignore[arg-type]
    with pytest.raises(SandboxError, match="stay in the working directory"):
        RunRequest(["true"], files={"../x": "y"})
    with pytest.raises(SandboxError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(SandboxError, match="memory_mb"):
        Limits(memory_mb=1)


def test_file_size_limit_and_a_crash_signal(sb):
    r = sb.run_python_sync("open('big', 'wb').write(b'x' * (3 << 20))", limits=Limits(file_size_mb=1))
    assert r.status == OK and r.exit_code != 0 and "File too large" in r.stderr, r
    r = sb.run_python_sync("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert r.status == "killed" and r.signal == 11, r


def test_stderr_flood_is_an_output_limit_too(sb):
    r = sb.run_shell_sync("yes error 1>&2", limits=Limits(timeout_s=30, output_bytes=4096))
    assert r.status == OUTPUT_LIMIT and len(r.stderr) == 4096 and r.stderr_truncated and not r.stdout_truncated


def test_pool_runs_at_most_concurrency_programs_at_once(sb):
    """Each program records when it ran (the wall clock is shared with the host): overlap <= concurrency."""
    code = "import time; t = time.time(); time.sleep(0.4); print(t, time.time())"
    pool = Sandbox(sb.backend, limits=sb.limits, concurrency=2)
    results = pool.map_sync([RunRequest([sys.executable, "-c", code]) for _ in range(6)])
    assert [r.status for r in results] == [OK] * 6
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    assert peak == 2


def test_async_api_many_at_once(sb):
    async def go():
        return await asyncio.gather(*(sb.run_python(f"print({i} * {i})") for i in range(5)))

    results = asyncio.run(go())
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(5)]


# --------------------------------------------------------------------------------------- backend choice

def test_the_rlimit_fallback_is_refused_unless_opted_in(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENK2_SANDBOX_ALLOW_UNSAFE", raising=False)
    with pytest.raises(SandboxError, match="does NOT isolate"):
        get_backend("rlimit")
    with pytest.raises(SandboxError, match="unknown sandbox backend"):
        get_backend("docker")
    with pytest.warns(RuntimeWarning, match="NO ISOLATION"):
        import openk2.sandbox.pool as pool

        monkeypatch.setattr(pool, "_WARNED", [])
        unsafe = Sandbox("rlimit", allow_unsafe=True, limits=Limits(timeout_s=5))
    r = unsafe.run_python_sync("import os; print(os.path.exists(%r))" % str(PROJECT_ROOT))
    assert r.ok and r.isolation == "none" and r.stdout == "True\n"  # it sees the host: not isolation
    r = unsafe.run_python_sync("import time; time.sleep(30)", limits=Limits(timeout_s=0.5))
    assert r.status == TIMEOUT
    r = unsafe.run_python_sync("x = bytearray(600 << 20)", limits=Limits(memory_mb=256))
    assert r.status == MEMORY


def test_auto_picks_an_isolating_backend_here():
    isolating_sandbox()  # skips where namespaces do not work
    assert get_backend("auto").name in ("namespaces", "bwrap")


# ---------------------------------------------------------------------------------------- test runner

SOLUTION = textwrap.dedent("""
    def add(a, b):
        return a + b

    def slow():
        while True:
            pass
""")


def test_run_tests_reports_each_test(sb):
    tests = [TestCase("adds", "assert add(1, 2) == 3"),
             TestCase("wrong", "x = add(2, 2)\nassert x == 5, f'got {x}'"),
             TestCase("bare-assert", "assert add(0, 0) == 1"),
             TestCase("raises", "add(1)"),
             TestCase("hangs", "slow()"),
             TestCase("after-hang", "assert add(-1, 1) == 0")]
    rep = run_tests_sync(SOLUTION, tests, sandbox=sb, per_test_timeout_s=1.0)
    got = {t.name: (t.status, t.error) for t in rep.results}
    assert [t.status for t in rep.results] == ["passed", "failed", "failed", "error", "timeout", "passed"]
    assert got["wrong"][1] == "AssertionError: got 4 (at: assert x == 5, f'got {x}')"
    assert got["bare-assert"][1] == "AssertionError (at: assert add(0, 0) == 1)"
    assert "TypeError" in got["raises"][1] and "missing 1 required positional argument" in got["raises"][1]
    assert rep.passed == 2 and rep.total == 6 and rep.pass_rate == pytest.approx(2 / 6) and not rep.all_passed
    assert rep.run.status == OK


def test_run_tests_load_errors_early_exits_and_isolation(sb):
    rep = run_tests_sync("def f(:\n    pass\n", ["assert f() is None"], sandbox=sb)
    assert rep.load_error.startswith("solution: ") and "SyntaxError" in rep.load_error
    assert [t.status for t in rep.results] == ["error"]
    # a test that ends the process: the remaining tests are reported, not silently passed
    rep = run_tests_sync("import os\ndef f():\n    os._exit(0)\n", ["assert True", "f()", "assert True"], sandbox=sb)
    assert [t.status for t in rep.results] == ["passed", "not_run", "not_run"]
    # one sandbox per test: the early exit cannot take the other tests with it
    rep = run_tests_sync("import os\ndef f():\n    os._exit(0)\n", ["assert True", "f()", "assert 1 == 2"],
                         sandbox=sb, isolate=True)
    assert [t.status for t in rep.results] == ["passed", "not_run", "failed"] and len(rep.runs) == 3


def test_run_tests_when_the_whole_run_times_out(sb):
    tests = ["assert add(1, 1) == 2", "import time\ntime.sleep(60)", "assert True"]
    rep = run_tests_sync(SOLUTION, tests, sandbox=sb, limits=Limits(timeout_s=1.5), per_test_timeout_s=30)
    assert rep.run.status == TIMEOUT
    assert [t.status for t in rep.results] == ["passed", "timeout", "timeout"]


# ------------------------------------------------------------------------------------------------ CLI

def _cli(args, cwd, stdin=None):
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run([sys.executable, "-m", "openk2.cli", "sandbox", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_run_copies_the_cwd_passes_stdin_and_prints_json(tmp_path):
    """The real command line, as a user runs it (one subprocess: `openk2` imports torch at start-up)."""
    isolating_sandbox()
    (tmp_path / "hello.txt").write_text("from the host\n")
    p = _cli(["run", "--timeout", "5", "--memory", "256", "--", "sh", "-c",
              "cat hello.txt; tr a-z A-Z; echo oops >&2; echo new > hello.txt; exit 4"], tmp_path, stdin="shout\n")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["status"] == "ok" and out["exit_code"] == 4 and out["backend"] == "namespaces"
    assert out["stdout"] == "from the host\nSHOUT\n" and out["stderr"] == "oops\n" and out["wall_s"] > 0
    assert (tmp_path / "hello.txt").read_text() == "from the host\n"


def _cli_inproc(args, capsys, monkeypatch, cwd, stdin=b""):
    import io

    from openk2.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    capsys.readouterr()
    rc = main(["sandbox", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_timeout_fetch_and_one_line_errors(tmp_path, capsys, monkeypatch):
    isolating_sandbox()
    monkeypatch.delenv("OPENK2_SANDBOX_ALLOW_UNSAFE", raising=False)
    rc, out, _ = _cli_inproc(["run", "--timeout", "1", "--", "sleep", "30"], capsys, monkeypatch, tmp_path)
    assert rc == 0 and json.loads(out)["status"] == "timeout"
    rc, out, _ = _cli_inproc(["run", "--no-copy", "--fetch", "o.txt", "--", "sh", "-c", "ls; echo hi > o.txt"],
                             capsys, monkeypatch, tmp_path)
    res = json.loads(out)
    assert rc == 0 and res["stdout"] == "" and base64.b64decode(res["files"]["o.txt"]) == b"hi\n"
    rc, out, _ = _cli_inproc(["run", "--", "no-such-command-xyz"], capsys, monkeypatch, tmp_path)
    assert rc == 1 and json.loads(out)["status"] == "error"
    for args, msg in ((["run", "--backend", "rlimit", "--", "true"], "does NOT isolate"),
                      (["run"], "no command given"), (["run", "--timeout", "-1", "--", "true"], "timeout_s")):
        rc, out, err = _cli_inproc(args, capsys, monkeypatch, tmp_path)
        assert rc == 2 and out == "" and err.count("\n") == 1 and msg in err, (args, err)
    rc, out, _ = _cli_inproc(["info"], capsys, monkeypatch, tmp_path)
    info = json.loads(out)
    assert rc == 0 and info["auto"] == "namespaces" and info["backends"]["namespaces"] == "available"


# ---------------------------------------------------------------------------- remote (SandboxFusion API)

@pytest.fixture(scope="module")
def fusion_server(sb):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serve_helpers import LoopbackServer

    from openk2.sandbox.remote import create_app

    with LoopbackServer(create_app(sb)) as srv:
        yield srv


def test_fusion_api_wire_format(fusion_server):
    import httpx

    body = {"code": "import sys\nprint(open('in.txt').read() + sys.stdin.read())\nopen('out.txt', 'w').write('o')",
            "language": "python", "run_timeout": 5, "memory_limit_MB": 256, "stdin": "-stdin",
            "files": {"in.txt": base64.b64encode(b"file").decode()}, "fetch_files": ["out.txt"]}
    r = httpx.post(fusion_server.url + "/run_code", json=body, timeout=60).json()
    assert r["status"] == "Success" and r["compile_result"] is None
    rr = r["run_result"]
    assert rr["status"] == "Finished" and rr["return_code"] == 0 and rr["stdout"] == "file-stdin\n"
    assert rr["stderr"] == "" and rr["execution_time"] > 0
    assert r["files"] == {"out.txt": base64.b64encode(b"o").decode()}
    r = httpx.post(fusion_server.url + "/run_code", json={"code": "sleep 30", "language": "bash", "run_timeout": 1},
                   timeout=60).json()
    assert r["status"] == "Failed" and r["run_result"]["status"] == "TimeLimitExceeded"
    r = httpx.post(fusion_server.url + "/run_code", json={"code": "exit 3", "language": "bash"}, timeout=60).json()
    assert r["status"] == "Failed" and r["run_result"]["return_code"] == 3
    r = httpx.post(fusion_server.url + "/run_code", json={"code": "x", "language": "cobol"}, timeout=60).json()
    assert r["status"] == "SandboxError" and "cobol" in r["message"]
    assert httpx.post(fusion_server.url + "/run_code", json={"language": "python"}, timeout=60).status_code == 422


def test_remote_backend_against_our_server(fusion_server, sb):
    remote = Sandbox(fusion_server.url, limits=Limits(timeout_s=5, memory_mb=256), concurrency=2)
    assert remote.backend.isolation == "remote"
    r = remote.run_python_sync("import sys; print(sys.stdin.read().upper()); print('e', file=sys.stderr)",
                               stdin="abc")
    assert r.status == OK and r.exit_code == 0 and r.stdout == "ABC\n" and r.stderr == "e\n"
    assert r.isolation == f"remote ({sb.name})"
    r = remote.run_sync(RunRequest(["sh", "-c", "cat a.txt; echo z > b.txt"], files={"a.txt": "A"},
                                   fetch_files=["b.txt"]))
    assert r.ok and r.stdout == "A" and r.files == {"b.txt": b"z\n"}
    assert remote.run_python_sync("import time; time.sleep(30)", limits=Limits(timeout_s=1)).status == TIMEOUT
    assert remote.run_python_sync("x = bytearray(900 << 20)").status == MEMORY
    flood = remote.run_shell_sync("yes", limits=Limits(timeout_s=10, output_bytes=1000))
    assert flood.status == OUTPUT_LIMIT and len(flood.stdout) == 1000
    rep = run_tests_sync(SOLUTION, ["assert add(2, 3) == 5", "assert add(2, 3) == 6"], sandbox=remote)
    assert [t.status for t in rep.results] == ["passed", "failed"]


def test_remote_backend_unreachable_is_an_error_result():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = Sandbox(f"http://127.0.0.1:{port}").run_sync(["true"])
    assert r.status == ERROR and "remote sandbox" in r.error


# ------------------------------------------------------------------------------------ launcher paths

def test_exec_path_and_zygote_recovery(sb):
    """Both ways of starting the launcher: exec'd per run, and forked by the zygote (which is respawned)."""
    from openk2.sandbox.local import LocalBackend

    if sb.name != "namespaces":
        pytest.skip("the zygote serves the namespaces backend")
    plain = Sandbox(LocalBackend("namespaces", use_zygote=False), limits=Limits(timeout_s=1, output_bytes=1000))
    r = plain.run_sync(RunRequest(["sh", "-c", "tr a-z A-Z; echo e >&2"], stdin="abc\n"))
    assert r.ok and r.stdout == "ABC\n" and r.stderr == "e\n"
    assert plain.run_sync(["sleep", "30"]).status == TIMEOUT
    assert plain.run_sync(["yes"]).status == OUTPUT_LIMIT
    big = "x" * 200_000  # larger than a zygote message: exec path even with the zygote on
    r = sb.run_sync(RunRequest(["wc", "-c", "big.txt"], files={"big.txt": big}))
    assert r.ok and r.stdout.split()[0] == "200000"
    backend = LocalBackend("namespaces")
    zsb = Sandbox(backend, limits=Limits(timeout_s=5))
    assert zsb.run_sync(["echo", "one"]).stdout == "one\n"
    first = backend._zygote.proc
    first.kill()
    first.wait()
    assert zsb.run_sync(["echo", "two"]).stdout == "two\n"  # a fresh zygote took over
    assert backend._zygote.proc is not first and backend._zygote.proc.poll() is None


def test_auto_without_namespaces_refuses_unless_opted_in(monkeypatch):
    """What a machine without user namespaces sees: `auto` names each reason and refuses the fallback."""
    import openk2.sandbox.pool as pool
    from openk2.sandbox.local import LocalBackend

    monkeypatch.delenv("OPENK2_SANDBOX_ALLOW_UNSAFE", raising=False)
    for mode, why in (("namespaces", "trial run failed: cannot create namespaces: unshare: Operation not "
                                     "permitted"),
                      ("bwrap", "bwrap (bubblewrap) is not on PATH")):
        b = LocalBackend(mode)
        b.__dict__["availability"] = (False, why)  # the cached probe result, as such a machine computes it
        monkeypatch.setitem(pool._BACKENDS, ("local", mode), b)
    with pytest.raises(SandboxError) as e:
        get_backend("auto")
    msg = str(e.value)
    assert "namespaces: trial run failed" in msg and "bwrap: bwrap (bubblewrap) is not on PATH" in msg
    assert "allow_unsafe=True" in str(e.value)
    monkeypatch.setattr(pool, "_WARNED", [True])  # the warning itself is checked above
    monkeypatch.setenv("OPENK2_SANDBOX_ALLOW_UNSAFE", "1")
    assert get_backend("auto").name == "rlimit"
