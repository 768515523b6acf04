"""Hostile programs in the namespaces sandbox: each is contained, reported with the right status, and the
host is unchanged afterwards (no connection reached the listener, no file changed, no process left)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sandbox_helpers import PROJECT_ROOT, host_pids_with, isolating_sandbox  # noqa: E402

from openk2.sandbox import MEMORY, OK, OUTPUT_LIMIT, TIMEOUT, Limits, RunRequest  # noqa: E402


@pytest.fixture(scope="module")
def sb():
    return isolating_sandbox(limits=Limits(timeout_s=5, memory_mb=512), concurrency=2)


def py(sb, code: str, *args: str, limits: Limits | None = None):
    return sb.run_sync(RunRequest([sys.executable, "main.py", *args], files={"main.py": textwrap.dedent(code)},
                                  limits=limits))


def test_network_to_a_host_loopback_listener_is_unreachable(sb):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    udp.setblocking(False)
    try:
        r = py(sb, f"""
            import socket
            for target in [("127.0.0.1", {port}), ("localhost", {port}), ("8.8.8.8", 53)]:
                try:
                    socket.create_connection(target, timeout=2).close()
                    print("CONNECTED", target)
                except OSError as e:
                    print("refused", target, e.errno)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:  # lo is down (namespaces) or the sandbox's own (bwrap): never the host's
                u.sendto(b"x", ("127.0.0.1", {port}))
            except OSError as e:
                print("udp refused", e.errno)
            print(open("/proc/net/dev").read().count(":"))
        """)
        assert r.status == OK and r.exit_code == 0, r
        assert "CONNECTED" not in r.stdout
        assert r.stdout.count("refused (") == 3
        assert r.stdout.strip().splitlines()[-1] == "1"  # one interface: the sandbox's own lo
        with pytest.raises(BlockingIOError):  # the listener never saw a connection
            srv.accept()
        with pytest.raises(BlockingIOError):  # nor a datagram
            udp.recvfrom(16)
    finally:
        srv.close()
        udp.close()


def test_a_secret_file_next_to_the_project_is_invisible(sb, tmp_path):
    token = uuid.uuid4().hex
    parent = PROJECT_ROOT.parent if os.access(PROJECT_ROOT.parent, os.W_OK) else PROJECT_ROOT
    secret = parent / f".openk2-sandbox-secret-{token[:8]}"
    secret.write_text(f"SECRET {token}\n")
    secret.chmod(0o644)  # readable by anyone on the host: only the sandbox's file-system view protects it
    before = secret.stat()
    try:
        r = py(sb, f"""
            import os
            for p in [{str(secret)!r}, "/proc/1/root" + {str(secret)!r}, "/proc/self/root" + {str(secret)!r},
                      "/proc/1/cwd/../" + {str(secret)!r}]:
                try:
                    print(open(p).read())
                except OSError as e:
                    print("denied", e.errno)
            print("project visible:", os.path.exists({str(PROJECT_ROOT)!r}), os.path.exists({str(parent)!r}))
            for d in ["/", "/root", "/home", "/tmp"]:
                print(d, sorted(os.listdir(d)) if os.path.isdir(d) else None)
        """)
        assert r.status == OK and r.exit_code == 0, r
        assert token not in r.stdout + r.stderr
        # ENOENT (not in the sandbox's file system) or EACCES (/proc/1 is the sandbox's init, not ours)
        assert r.stdout.count("denied 2") + r.stdout.count("denied 13") == 4
        assert "project visible: False False" in r.stdout
        assert secret.read_text() == f"SECRET {token}\n" and secret.stat().st_mtime_ns == before.st_mtime_ns
    finally:
        secret.unlink()


def test_writes_outside_the_working_directory_fail_and_the_host_is_unchanged(sb):
    tag = uuid.uuid4().hex[:10]
    host_targets = [PROJECT_ROOT / f"evil-{tag}", PROJECT_ROOT.parent / f"evil-{tag}", Path(f"/etc/evil-{tag}"),
                    Path(f"/usr/evil-{tag}"), Path(f"/evil-{tag}"), Path(f"/root/evil-{tag}"),
                    Path(sys.prefix) / f"evil-{tag}"]
    etc_hosts = Path("/etc/hosts").read_bytes()
    r = py(sb, f"""
        import os
        for p in {[str(p) for p in host_targets]!r} + ["/etc/hosts"]:
            try:
                with open(p, "a") as f:
                    f.write("pwned")
                print("WROTE", p)
            except OSError as e:
                print("blocked", e.errno)
        open("/tmp/evil-{tag}", "w").write("private tmp")
        open("inside.txt", "w").write("working dir")
        print("in sandbox:", open("/tmp/evil-{tag}").read(), open("inside.txt").read())
    """)
    assert r.status == OK and r.exit_code == 0, r
    assert "WROTE" not in r.stdout
    assert r.stdout.count("blocked") == len(host_targets) + 1
    assert "in sandbox: private tmp working dir" in r.stdout
    for p in host_targets + [Path(f"/tmp/evil-{tag}")]:
        assert not p.exists(), p
    assert Path("/etc/hosts").read_bytes() == etc_hosts


def test_fork_bomb_is_capped_by_nproc_and_ends_with_the_run(sb):
    if sb.name == "bwrap" and os.geteuid() == 0:
        pytest.skip("bwrap run by root maps the sandbox user to host uid 0, which RLIMIT_NPROC exempts "
                    "(docs/sandbox.md); the namespaces backend maps it to an unprivileged uid")
    marker = f"forkbomb-{uuid.uuid4().hex[:10]}"
    nproc = 24
    r = py(sb, """
        import os, sys, time
        n = 0
        while True:          # phase 1: count the forks allowed (children just sleep)
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(120)
                os._exit(0)
            n += 1
        print("forks", n, flush=True)
        while True:          # phase 2: the bomb itself
            try:
                os.fork()
            except OSError:
                pass
    """, marker, limits=Limits(timeout_s=2, nproc=nproc, memory_mb=256))
    assert r.status == TIMEOUT, r
    forks = int(r.stdout.split()[1])
    assert 0 < forks < nproc  # RLIMIT_NPROC counts this sandbox's user only
    assert host_pids_with(marker) == []


def test_unbounded_memory_is_a_memory_status(sb):
    r = py(sb, """
        blocks = []
        while True:
            blocks.append(bytearray(32 << 20))
    """, limits=Limits(timeout_s=20, memory_mb=256))
    assert r.status == MEMORY, r
    assert "MemoryError" in r.stderr
    assert r.max_rss_mb is not None and r.max_rss_mb < 256 + 16


def test_infinite_loop_times_out_within_the_cpu_limit(sb):
    r = py(sb, "while True:\n    pass\n", limits=Limits(timeout_s=1.5))
    assert r.status == TIMEOUT, r
    assert r.cpu_s is not None and r.cpu_s <= Limits(timeout_s=1.5).cpu_limit_s + 1.5


def test_sleep_past_the_timeout_is_killed(sb):
    marker = f"sleeper-{uuid.uuid4().hex[:10]}"
    r = py(sb, "import time\ntime.sleep(120)\n", marker, limits=Limits(timeout_s=1))
    assert r.status == TIMEOUT and "wall-clock" in r.error, r
    assert r.wall_s < 60  # not the 120 s the program asked for
    assert host_pids_with(marker) == []


def test_orphans_do_not_outlive_the_program(sb):
    marker = f"orphan-{uuid.uuid4().hex[:10]}"
    r = py(sb, f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", {marker!r}], start_new_session=True)
        if os.fork() == 0:               # a classic daemon: double fork, setsid
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)", {marker!r}])
            os._exit(0)
        time.sleep(0.5)
        print("main exits")
    """, marker)
    assert r.status == OK and r.exit_code == 0 and "main exits" in r.stdout, r
    assert r.orphans_killed == 2
    assert host_pids_with(marker) == []


def test_stdout_flood_is_cut_at_the_limit(sb):
    r = py(sb, """
        import sys
        while True:
            sys.stdout.write("x" * 65536)
    """, limits=Limits(timeout_s=30, output_bytes=100_000))
    assert r.status == OUTPUT_LIMIT, r
    assert len(r.stdout) == 100_000 and set(r.stdout) == {"x"} and r.stdout_truncated


def test_signalling_the_parent_and_the_host_has_no_effect(sb):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        r = py(sb, f"""
            import os, signal
            for target in [os.getppid(), 1, {os.getpid()}, {victim.pid}]:
                for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1):
                    try:
                        os.kill(target, sig)
                        print("sent", target, sig.name)
                    except OSError as e:
                        print("failed", target, e.errno)
            try:
                os.kill(-1, signal.SIGKILL)  # every process this user may signal (except itself): none
            except OSError as e:
                print("kill -1 failed", e.errno)
            print("survived, ppid", os.getppid())
        """, limits=Limits(timeout_s=10))
        assert r.status == OK and r.exit_code == 0, r
        assert "survived, ppid 1" in r.stdout  # signals to the sandbox's init are refused (EPERM) or ignored
        assert r.stdout.count(f"failed {os.getpid()} 3") == 3  # ESRCH: the host is not visible
        assert r.stdout.count(f"failed {victim.pid} 3") == 3 or victim.pid == os.getpid()
        assert victim.poll() is None  # the host process is alive
    finally:
        victim.kill()
        victim.wait()
    time.sleep(0)  # nothing timed: just the host still running this line


def test_symlinks_cannot_reach_the_host_for_setup_or_fetch(sb, tmp_path):
    tag = uuid.uuid4().hex[:10]
    # a source tree whose symlink points at the host's /etc: the request's files are written only after
    # the host is gone from the sandbox's view, so the write lands on the read-only /etc of the sandbox
    (tmp_path / "evil").symlink_to("/etc")
    r = sb.run_sync(RunRequest(["true"], src_dir=str(tmp_path), files={f"evil/pwned-{tag}": "x"}))
    assert r.status == "error" and "Read-only file system" in r.error, r
    assert not Path(f"/etc/pwned-{tag}").exists()
    # fetching through a link the program made: read with the program's rights, so root-only files stay closed
    if sb.name == "bwrap" and os.geteuid() == 0:
        pytest.skip("bwrap run by root: the sandbox user is host uid 0, the owner of /etc/shadow (docs/sandbox.md)")
    req = RunRequest(["sh", "-c", "ln -s /etc/shadow shadow; ln -s /etc etc; ln -s /proc/1/environ env"],
                     fetch_files=["shadow", "etc/shadow", "env", "etc/hostname"])
    r = sb.run_sync(req)
    assert r.ok and set(r.files) <= {"etc/hostname"}, r.files.keys()
