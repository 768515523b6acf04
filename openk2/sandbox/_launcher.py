"""The process that builds one sandbox and runs one program in it (stdlib only, run as `python -I -S`).

The host (openk2.sandbox.local) starts this file with the program's stdin/stdout/stderr as its own, a
config pipe on the fd named by ``--config-fd`` and a status pipe on ``--status-fd`` (both carry `marshal`
data: no json/base64 imports, which would cost more start-up time than the namespaces themselves). It is deliberately
free of openk2 imports: it must start fast and it runs partly inside the new namespaces.

Process tree of a ``namespaces`` run::

    host (asyncio)                 host namespaces
     └─ L  this launcher           host namespaces; unshares user+mount+net+pid+ipc+uts, forwards signals
         ├─ H  id-mapper           (root hosts only) writes L's uid_map/gid_map from the parent namespace
         └─ D  PID 1               new namespaces: builds the root, then reaps; when it exits the kernel
             └─ P  the program     kills every process left in the PID namespace
                                   uid 1000 (root hosts) or uid 0 without capabilities, rlimits, setsid

Modes: ``namespaces`` (the above), ``bwrap`` (L execs bubblewrap, which runs this file again with
``--inside`` as PID 1 of the sandbox), ``rlimit`` (no isolation at all: rlimits and a temporary
directory; the host refuses it for untrusted code unless the user opts in).

D writes one marshal record to the status fd: exit code / signal of the program, CPU time and peak RSS of
every process it reaped, how many processes were still alive when the program ended (killed), the
requested files (base64), and `error` if the sandbox itself could not be built.
"""

import ctypes
import errno
import marshal
import os
import resource
import signal
import stat
import sys
import time

T_START = time.monotonic()  # when this launcher got control (the host subtracts: interpreter start-up)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
# statvfs f_flag bits -> the mount flags a remount must keep (the kernel locks them in a user namespace)
_ST_TO_MS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME),
             (2048, MS_NODIRATIME), (4096, MS_RELATIME))

PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 1, 24, 28, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SECBITS_LOCKED_NOROOT = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20  # noroot, no_setuid_fixup, keep_caps: set+locked

SANDBOX_UID = 1000  # the program's uid inside the namespace when the host can map a second uid (root hosts)
WORKDIR = "/sandbox"

_libc = ctypes.CDLL(None, use_errno=True)  # the C library is already in the process: no find_library
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class SetupError(Exception):
    pass


def _check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(e)} (errno {e})")


def _b(s):
    return None if s is None else os.fsencode(s)


def mount(src, target, fstype, flags, data=None):
    _check(_libc.mount(_b(src), _b(target), _b(fstype), flags, _b(data)), f"mount {src} -> {target}")


def prctl(option, arg2=0):
    _check(_libc.prctl(option, arg2, 0, 0, 0), f"prctl({option})")


def unshare(flags):
    _check(_libc.unshare(flags), "unshare")


def pivot_root(new, old):
    _check(_libc.pivot_root(_b(new), _b(old)), f"pivot_root {new}")


# ------------------------------------------------------------------------------------------------ mounts

_PROC = ["/proc"]  # where the host's /proc is while the root is being built


def _mountpoints_under(path):
    """Mount points at or below `path` (from mountinfo), shortest first."""
    out = []
    with open(_PROC[0] + "/self/mountinfo", "rb") as f:
        for line in f:
            mp = line.split()[4].decode()
            mp = mp.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
            if mp == path or mp.startswith(path.rstrip("/") + "/"):
                out.append(mp)
    return sorted(set(out), key=len)


def _locked_flags(path):
    try:
        f = os.statvfs(path).f_flag
    except OSError:
        return 0
    return sum(ms for st, ms in _ST_TO_MS if f & st)


def ro_bind(src, dst):
    """Recursive bind of `src` at `dst`, then every mount below `dst` remounted read-only, nosuid, nodev."""
    mount(src, dst, None, MS_BIND | MS_REC)
    for mp in _mountpoints_under(dst):
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(mp)
        try:
            mount(None, mp, None, flags)
        except SetupError:
            if mp == dst:
                raise
            # a submount we cannot remount (e.g. a locked one): hide it instead of leaving it writable
            mount("tmpfs", mp, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0555")


def _makedirs(path, mode=0o755):
    os.makedirs(path, mode=mode, exist_ok=True)


def _bind_point(src, dst):
    """Create what `dst` needs to be a bind target for `src` (a directory or an empty file)."""
    if os.path.isdir(src):
        _makedirs(dst)
    else:
        _makedirs(os.path.dirname(dst))
        if not os.path.exists(dst):
            open(dst, "wb").close()


def build_root(cfg, sandbox_uid):
    """In a fresh mount namespace: build the sandbox's root file system and pivot into it."""
    lim = cfg["limits"]
    disk = f"size={int(lim['disk_mb'])}m"
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Step 1 (as bubblewrap does): a tmpfs on /tmp becomes the root, the host's root moves to /oldroot,
    # so every host path (the original /tmp included) stays reachable while the new root is built.
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.chdir("/tmp")
    for d in ("newroot", "oldroot"):
        os.mkdir(d)
    pivot_root(".", "oldroot")
    os.chdir("/")
    old = "/oldroot"
    _PROC[0] = old + "/proc"
    new = "/newroot"
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    # Step 2: the read-only system.
    for p in cfg["ro_paths"]:
        src = old + p
        if not os.path.lexists(src):
            continue
        dst = new + p
        if os.path.islink(src) and os.path.dirname(p) == "/":  # /bin -> usr/bin on merged-/usr systems
            os.symlink(os.readlink(src), dst)
            continue
        _bind_point(src, dst)
        ro_bind(src, dst)
    # Step 3: /proc of the new PID namespace, a minimal /dev, private writable /tmp and working directory.
    _makedirs(new + "/proc")
    mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _makedirs(new + "/dev")
    mount("tmpfs", new + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for n in ("null", "zero", "full", "random", "urandom", "tty"):
        if os.path.exists(f"{old}/dev/{n}"):
            open(f"{new}/dev/{n}", "wb").close()
            mount(f"{old}/dev/{n}", f"{new}/dev/{n}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{new}/dev/{name}")
    _makedirs(new + "/dev/shm")
    mount("tmpfs", new + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"{disk},mode=1777")
    _makedirs(new + "/tmp")
    mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"{disk},mode=1777")
    _makedirs(new + WORKDIR)
    mount("tmpfs", new + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV, f"{disk},mode=0755")
    if cfg.get("src_dir"):  # the only step that reads the host's files (symlinks are copied, never followed)
        _copy_tree(old + cfg["src_dir"], new + WORKDIR)
    # Step 4: pivot into the new root, drop the host's tree entirely, make / read-only.
    os.mkdir(new + "/oldroot")
    os.chdir(new)
    pivot_root(".", "oldroot")
    os.chdir("/")
    _check(_libc.umount2(b"/oldroot", MNT_DETACH), "umount oldroot")
    os.rmdir("/oldroot")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    # Step 5: the request's files, written only now that no path (or symlink) can reach the host
    populate_workdir(dict(cfg, src_dir=None), WORKDIR, "", sandbox_uid)


def populate_workdir(cfg, workdir, src_root, uid):
    """Copy the source directory (if any) and write the request's files into the working directory."""
    if cfg.get("src_dir"):
        _copy_tree(src_root + cfg["src_dir"], workdir)
    for rel, data in cfg.get("files", {}).items():
        path = os.path.normpath(os.path.join(workdir, rel))
        if not path.startswith(workdir + "/"):
            raise SetupError(f"file path escapes the working directory: {rel!r}")
        _makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(data)
        if rel in cfg.get("executable", ()):
            os.chmod(path, 0o755)
    if uid:
        for dirpath, dirnames, filenames in os.walk(workdir):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), uid, uid)
        os.chown(workdir, uid, uid)


def _copy_file(src, dst):
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            b = fi.read(1 << 20)
            if not b:
                break
            fo.write(b)


def _copy_tree(src, dst):
    """Copy regular files, directories and symlinks (not followed) from src into dst."""
    for entry in os.scandir(src):
        s, d = entry.path, os.path.join(dst, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(s), d)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(d, 0o755)
            _copy_tree(s, d)
        elif entry.is_file(follow_symlinks=False):
            _copy_file(s, d)
            os.chmod(d, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode) | 0o600)


# -------------------------------------------------------------------------------------------- privileges

def _cap_last():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_privileges(uid):
    """No capabilities now or after any exec (bounding set empty, securebits locked, no_new_privs)."""
    prctl(PR_SET_SECUREBITS, SECBITS_LOCKED_NOROOT)
    for cap in range(_cap_last() + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except SetupError:
            pass
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except SetupError:
        pass
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if uid:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    hdr, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def set_limits(lim):
    def setl(which, value):
        value = int(value)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):  # above the current hard limit: lower only the soft one
            hard = resource.getrlimit(which)[1]
            resource.setrlimit(which, (min(value, hard) if hard >= 0 else value, hard))

    cpu = int(lim["cpu_s"])
    soft_hard = (cpu, cpu + 1)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, soft_hard)  # SIGXCPU at the soft limit, SIGKILL one second later
    except (ValueError, OSError):
        pass
    if lim.get("memory_mb"):
        setl(resource.RLIMIT_AS, int(lim["memory_mb"]) << 20)
    setl(resource.RLIMIT_NPROC, lim["nproc"])
    setl(resource.RLIMIT_FSIZE, int(lim["file_size_mb"]) << 20)
    setl(resource.RLIMIT_NOFILE, lim["nofile"])
    setl(resource.RLIMIT_CORE, 0)


# ------------------------------------------------------------------------------------------ run & reap

def _resolve(cmd0, path_env):
    if "/" in cmd0:
        return cmd0
    for d in path_env.split(":"):
        p = os.path.join(d, cmd0)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def spawn_program(cfg, uid, drop, workdir):
    """Fork the program: new session, limits, no privileges, exec. Exec errors go back through a pipe."""
    er, ew = os.pipe()  # both close-on-exec: EOF on exec success
    pid = os.fork()
    if pid == 0:
        try:
            os.close(er)
            os.setsid()
            os.chdir(workdir)
            env = cfg["env"]
            exe = _resolve(cfg["command"][0], env.get("PATH", "/usr/bin:/bin"))
            if exe is None:
                raise FileNotFoundError(errno.ENOENT, "command not found", cfg["command"][0])
            set_limits(cfg["limits"])
            if drop:
                drop_privileges(uid)
            for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGUSR1, signal.SIGTERM, signal.SIGALRM,
                      signal.SIGINT, signal.SIGCHLD):
                signal.signal(s, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execve(exe, cfg["command"], env)
        except BaseException as e:  # noqa: BLE001 - report anything to D
            try:
                os.write(ew, f"{type(e).__name__}: {e}".encode()[:2000])
            finally:
                os._exit(127)
    os.close(ew)
    msg = b""
    while True:
        try:
            chunk = os.read(er, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        msg += chunk
    os.close(er)
    return pid, msg.decode(errors="replace")


_EARLY_KILL = []


def _early_kill(signum, frame):
    _EARLY_KILL.append(signum)


def _live_processes():
    """Processes of this PID namespace other than PID 1 that are not zombies."""
    n = 0
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        n += state != b"Z"
    return n


class Reaper:
    """The PID-1 role: run the program, reap everything, kill the rest, report."""

    def __init__(self, cfg, status_fd, pid1):
        self.cfg, self.status_fd, self.pid1 = cfg, status_fd, pid1
        self.kill_reason = None

    def _trusted(self, info):
        """A kill request counts only from the launcher side, never from the sandboxed program itself."""
        if info.si_signo == signal.SIGALRM:
            return True
        if self.pid1:
            return info.si_pid == 0  # sent from outside the PID namespace (its sender is not visible here)
        return info.si_pid in (os.getppid(), 0, self.cfg.get("host_pid", 0))

    def _kill_all(self):
        if self.pid1:
            try:
                os.kill(-1, signal.SIGKILL)  # PID 1 of the namespace: every other process in it
            except ProcessLookupError:
                pass
        elif self.pgid:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def run(self, uid, drop, workdir):
        cfg = self.cfg
        self.pgid = None
        waited = {signal.SIGCHLD, signal.SIGUSR1, signal.SIGTERM, signal.SIGALRM}
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)  # taken with sigwaitinfo (sender known); children unblock
        for s_ in waited:
            signal.signal(s_, signal.SIG_DFL)
        if _EARLY_KILL:  # the host asked for the end before the program started
            write_status(self.status_fd, {"exit_code": None, "signal": signal.SIGKILL, "kill_reason": "host",
                                          "cpu_s": 0.0, "max_rss_kb": 0, "orphans_killed": 0, "files": {}})
            return
        # a second line of defence behind the host's wall clock: the sandbox ends itself
        deadline = float(cfg["limits"]["timeout_s"]) + float(cfg.get("deadline_grace_s", 2.0))
        signal.setitimer(signal.ITIMER_REAL, deadline)
        t0 = time.monotonic()
        setup_s = t0 - T_START
        pid, exec_error = spawn_program(cfg, uid, drop, workdir)
        self.pgid = pid
        res = {"exit_code": None, "signal": None}
        if exec_error:
            res["error"] = exec_error
        status = None
        while status is None:
            # reap whatever has ended (the program, or orphans re-parented to PID 1)
            try:
                while True:
                    wpid, st = os.waitpid(-1 if self.pid1 else pid, os.WNOHANG)
                    if wpid == 0:
                        break
                    if wpid == pid:
                        status = st
                        break
            except ChildProcessError:
                break
            if status is not None:
                break
            info = signal.sigwaitinfo(waited)
            if info.si_signo != signal.SIGCHLD and self._trusted(info) and self.kill_reason is None:
                self.kill_reason = "deadline" if info.si_signo == signal.SIGALRM else "host"
                self._kill_all()
        prog_wall = time.monotonic() - t0
        if status is not None:
            if os.WIFEXITED(status):
                res["exit_code"] = os.WEXITSTATUS(status)
            elif os.WIFSIGNALED(status):
                res["signal"] = os.WTERMSIG(status)
        # whatever is still alive outlived the program: count it, kill it, reap it
        orphans = 0
        if self.pid1:
            orphans = _live_processes()
        else:
            try:
                os.killpg(pid, 0)
                orphans = 1
            except (ProcessLookupError, PermissionError):
                pass
        self._kill_all()
        signal.setitimer(signal.ITIMER_REAL, 0)
        while True:
            try:
                os.waitpid(-1, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                break
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        res.update(cpu_s=round(ru.ru_utime + ru.ru_stime, 4), max_rss_kb=ru.ru_maxrss, orphans_killed=orphans,
                   program_wall_s=round(prog_wall, 4), kill_reason=self.kill_reason, setup_s=round(setup_s, 4),
                   t_start=T_START)
        if cfg.get("fetch_files"):
            if drop and self.pid1:  # read them with the program's rights, never init's
                drop_privileges(uid)
            res["files"] = fetch_files(cfg["fetch_files"], workdir, int(cfg.get("fetch_limit", 4 << 20)))
        else:
            res["files"] = {}
        write_status(self.status_fd, res)


def fetch_files(names, workdir, limit):
    out, used = {}, 0
    for rel in names:
        path = os.path.normpath(os.path.join(workdir, rel))
        if not (path + "/").startswith(workdir.rstrip("/") + "/"):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                data = os.read(fd, max(0, limit - used) + 1)
            finally:
                os.close(fd)
        except OSError:
            continue
        if used + len(data) > limit:
            break
        used += len(data)
        out[rel] = data
    return out


def write_status(fd, res):
    data = marshal.dumps(res)
    while data:
        try:
            n = os.write(fd, data)
        except InterruptedError:
            continue
        data = data[n:]


# --------------------------------------------------------------------------------------------- launcher

def _write_file(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _enter_namespaces(cfg):
    """Unshare everything; map ids (through a helper in the parent namespace when we are root)."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if uid != 0:
        unshare(flags)
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"0 {uid} 1\n")
        _write_file("/proc/self/gid_map", f"0 {gid} 1\n")
        return 0  # the program runs as uid 0 of the namespace with no capabilities
    outer = int(cfg.get("outer_uid", 65534))
    r, w = os.pipe()
    r2, w2 = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:  # H: still in the parent namespaces
        try:
            os.close(w)
            os.close(r2)
            if os.read(r, 1) != b"u":
                os._exit(3)
            _write_file(f"/proc/{me}/uid_map", f"0 0 1\n{SANDBOX_UID} {outer} 1\n")
            _write_file(f"/proc/{me}/gid_map", f"0 0 1\n{SANDBOX_UID} {outer} 1\n")
            os.write(w2, b"k")
            os._exit(0)
        except BaseException as e:  # noqa: BLE001
            os.write(w2, f"id map: {e}".encode()[:500])
            os._exit(3)
    os.close(r)
    os.close(w2)
    try:
        unshare(flags)
    finally:
        os.write(w, b"u")
        os.close(w)
    reply = os.read(r2, 600)
    os.close(r2)
    os.waitpid(helper, 0)
    if reply != b"k":
        raise SetupError(reply.decode(errors="replace") or "id map helper failed")
    return SANDBOX_UID


def _d_main(cfg, status_fd, uid, parent):
    """D: PID 1 of the new namespaces."""
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, _early_kill)
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # L gone -> D gone -> the whole PID namespace gone
        unshare(CLONE_NEWNS)  # a mount namespace of its own, so the pivots leave L's root alone
        try:
            with open("/proc/sys/kernel/hostname", "w") as f:
                f.write("sandbox")
        except OSError:
            pass
        build_root(cfg, uid)
    except BaseException as e:  # noqa: BLE001
        write_status(status_fd, {"error": f"sandbox setup failed: {e}", "setup_failed": True})
        os._exit(0)
    try:
        Reaper(cfg, status_fd, pid1=True).run(uid, drop=True, workdir=WORKDIR)
    except BaseException as e:  # noqa: BLE001
        write_status(status_fd, {"error": f"sandbox failed: {type(e).__name__}: {e}"})
    os._exit(0)


def main_namespaces(cfg, status_fd):
    try:
        uid = _enter_namespaces(cfg)
    except BaseException as e:  # noqa: BLE001
        write_status(status_fd, {"error": f"cannot create namespaces: {e}", "setup_failed": True})
        return 0
    me = os.getpid()
    d = os.fork()
    if d == 0:
        _d_main(cfg, status_fd, uid, me)
    _supervise(d, status_fd)
    return 0


def _supervise(child, status_fd):
    """L after the fork: forward a kill request, wait for D, report if D died without a word."""
    def forward(signum, frame):
        try:
            os.kill(child, signal.SIGUSR1)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            _, st = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            return
    if not (os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0):
        write_status(status_fd, {"error": f"sandbox init died (wait status {st})"})


def main_rlimit(cfg, status_fd):
    """No isolation: a temporary working directory, rlimits, a new session. The host knows it is unsafe."""
    workdir = cfg["workdir"]
    try:
        populate_workdir(cfg, workdir, "", None)
    except BaseException as e:  # noqa: BLE001
        write_status(status_fd, {"error": f"sandbox setup failed: {e}", "setup_failed": True})
        return 0
    Reaper(cfg, status_fd, pid1=False).run(None, drop=False, workdir=workdir)
    return 0


def main_bwrap_inside(cfg, status_fd):
    """PID 1 inside bubblewrap (which did the mounts, the namespaces and the privilege drop)."""
    try:
        if cfg.get("src_dir"):
            _copy_tree("/.openk2-src", WORKDIR)
        populate_workdir(dict(cfg, src_dir=None), WORKDIR, "", None)
    except BaseException as e:  # noqa: BLE001
        write_status(status_fd, {"error": f"sandbox setup failed: {e}", "setup_failed": True})
        return 0
    Reaper(cfg, status_fd, pid1=os.getpid() == 1).run(None, drop=False, workdir=WORKDIR)
    return 0


def main_bwrap(cfg, status_fd, config_fd):
    """L for bubblewrap: exec bwrap, which runs this file again inside (config and status fds pass through)."""
    lim = cfg["limits"]
    disk = str(int(lim["disk_mb"]) << 20)
    args = [cfg["bwrap"], "--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1",
            "--hostname", "sandbox", "--cap-drop", "ALL", "--uid", "1000" if os.geteuid() == 0 else "0",
            "--gid", "1000" if os.geteuid() == 0 else "0"]
    for p in cfg["ro_paths"]:
        if os.path.islink(p) and os.path.dirname(p) == "/":
            args += ["--symlink", os.readlink(p), p]
        elif os.path.exists(p):
            args += ["--ro-bind", p, p]
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", disk, "--tmpfs", "/tmp",
             "--size", disk, "--tmpfs", WORKDIR, "--chdir", WORKDIR]
    if cfg.get("src_dir"):
        args += ["--ro-bind", cfg["src_dir"], "/.openk2-src"]
    me = os.path.abspath(__file__)
    args += ["--ro-bind", me, "/.openk2-launcher.py", "--remount-ro", "/", "--",
             sys.executable, "-I", "-S", "/.openk2-launcher.py",
             "--inside", "--config-fd", str(config_fd), "--status-fd", str(status_fd)]
    os.set_inheritable(status_fd, True)
    # bwrap re-reads the config from a fresh pipe (we consumed ours)
    r, w = os.pipe()
    os.set_inheritable(r, True)
    data = marshal.dumps(cfg)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        while data:
            data = data[os.write(w, data):]
        os._exit(0)
    os.close(w)
    os.dup2(r, config_fd)
    os.close(r)
    os.execv(cfg["bwrap"], args)


def main_zygote(sock_fd):
    """A fork server: one interpreter start-up for many runs (the host falls back to exec'ing this file).

    Each request is one SOCK_SEQPACKET message: the marshal config plus four fds (stdin, stdout, stderr,
    status). The zygote forks a launcher for it (its own session), answers with the launcher's pid, and
    exits when the host closes the socket.
    """
    global T_START
    import socket

    sock = socket.socket(fileno=sock_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # launchers are reaped by the kernel
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 18, 4)
        except InterruptedError:
            continue
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)  # the host is gone
        if len(fds) != 4:
            for f in fds:
                os.close(f)
            sock.send(b"-1")
            continue
        pid = os.fork()
        if pid == 0:
            status_fd = fds[3]
            try:
                T_START = time.monotonic()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                sock.close()
                os.setsid()
                for i in range(3):
                    os.dup2(fds[i], i)
                for f in fds[:3]:
                    if f > 2:
                        os.close(f)
                os.set_inheritable(status_fd, False)
                cfg = marshal.loads(msg)
                if cfg["mode"] == "namespaces":
                    main_namespaces(cfg, status_fd)
                elif cfg["mode"] == "rlimit":
                    main_rlimit(cfg, status_fd)
                else:
                    write_status(status_fd, {"error": f"mode {cfg['mode']!r} not served by the zygote",
                                             "setup_failed": True})
            except BaseException as e:  # noqa: BLE001
                try:
                    write_status(status_fd, {"error": f"sandbox launcher failed: {e}", "setup_failed": True})
                except OSError:
                    pass
            os._exit(0)
        for f in fds:
            os.close(f)
        try:
            sock.send(str(pid).encode())
        except OSError:
            os._exit(0)


def main(argv):
    if "--zygote" in argv:
        return main_zygote(int(argv[argv.index("--zygote") + 1]))
    config_fd = int(argv[argv.index("--config-fd") + 1])
    status_fd = int(argv[argv.index("--status-fd") + 1])
    os.set_inheritable(status_fd, False)
    chunks = []
    while True:
        b = os.read(config_fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
    os.close(config_fd)
    cfg = marshal.loads(b"".join(chunks))
    if "--inside" in argv:
        return main_bwrap_inside(cfg, status_fd)
    mode = cfg["mode"]
    if mode == "namespaces":
        return main_namespaces(cfg, status_fd)
    if mode == "rlimit":
        return main_rlimit(cfg, status_fd)
    if mode == "bwrap":
        return main_bwrap(cfg, status_fd, config_fd)
    write_status(status_fd, {"error": f"unknown sandbox mode {mode!r}", "setup_failed": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
