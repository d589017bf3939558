"""The sandbox: the one place in dsv where untrusted code runs.

`run_python(code, files=..., stdin=..., limits=...)` and `run_command(argv, ...)`
run a program in a separate process and report a `SandboxResult` whose `status`
is one of "ok", "timeout", "memory", "output_limit", "disk_limit", "error", "killed". The host
process never raises because of what the program did.

What is enforced (Linux):
- a separate process in its own session/process group, started with a scrubbed
  environment (PATH, HOME=TMPDIR=workdir, LANG; nothing inherited);
- a private working directory (mode 0700) created fresh per run and deleted after;
- rlimits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), written file size
  (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), no core dumps, and processes
  (RLIMIT_NPROC) against fork bombs;
- a wall-clock deadline and an output cap (stdout+stderr bytes), after which
  everything the run started is killed;
- a total disk quota for the working directory (`Limits.disk_mb`): RLIMIT_FSIZE bounds one
  file only, so the host measures the workdir while the run goes on (every entry costs at
  least one 4 KiB block, so many small or empty files count too) and kills the run once it
  is over; a run that ends over the quota is reported as "disk_limit" whatever its exit code.
  This is a watch, not a filesystem quota: between two measurements (about 50 ms apart) a
  run can overshoot by what it writes in that time, which it never gets to keep;
- when the host runs as root: the program runs under a fresh unprivileged uid/gid
  of its own (no supplementary groups), so it can read only world-readable files
  (it cannot read root's 0600 files or enter 0700 directories such as pytest's
  tmp dirs), RLIMIT_NPROC counts only its own processes, and cleanup kills every
  process of that uid (`kill(-1)` from that uid), which also catches processes that
  left the process group; without root the uid is not changed and only the
  process-group kill applies;
- no network: the child enters a new, empty network namespace (`unshare(CLONE_NEWNET)`,
  root, or a user namespace plus network namespace where unprivileged user namespaces
  are allowed). Only the loopback device exists there and it is down, so connecting
  even to 127.0.0.1 of the host fails. `SandboxResult.network_isolated` says whether
  that happened; `isolation_report()` says what this machine supports;
- when the host runs as root: a private filesystem view. The child enters a new mount
  namespace, makes every mount private, and builds a minimal root on a fresh tmpfs:
  read-only (nosuid, nodev) bind mounts of /usr (with /bin, /lib, /lib64, /sbin as on the
  host, bind-mounted or symlinked), the interpreter's installation prefix when it lies
  elsewhere, the device files null, zero, full, random and urandom, the workdir read-write
  at /work (HOME, TMPDIR and the current directory), and an empty tmpfs at /tmp. It then
  chroots into that root before dropping to the unprivileged uid. Host files outside those
  paths (/etc, /home, /root, the host's /tmp, source trees) do not exist for the program.
  A run may ask for a toolchain (`toolchains=("java",)`): the few host paths that toolchain
  cannot start without are bound read-only too (see `TOOLCHAINS`);
  `SandboxResult.filesystem_isolated` says whether that happened; if the machine does not
  allow it (probed once), runs go ahead without it.

Not enforced: cgroup memory/CPU accounting, seccomp system-call filtering, a private
/proc or PID namespace (there is no /proc inside the private root). Without root there is
no uid change and no private filesystem view.

When the host python is not runnable by the unprivileged uid (e.g. under /root),
`run_python` uses a system `python3` that is; programs get the standard library only.

Run the checks: `pytest packages/synth/tests/test_synth_sandbox.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import random
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

__all__ = [
    "SANDBOX_WORKDIR",
    "TOOLCHAINS",
    "Limits",
    "SandboxResult",
    "isolation_report",
    "run_command",
    "run_python",
    "sandbox_python",
]

Status = Literal["ok", "timeout", "memory", "output_limit", "disk_limit", "error", "killed"]

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
SANDBOX_WORKDIR = "/work"  # where the workdir appears inside the private filesystem view
_SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_UID_BASE = 2_000_000  # far above any uid a real account uses
_UID_SPAN = 1_000_000
_PREEXEC_FAILED = 97  # exit code the child uses when it could not be confined
_BLOCK = 4096  # the least an entry of the workdir is charged (one block on ext4, xfs and tmpfs)
_DISK_POLL_S = 0.05


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed run."""

    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mb: int = 512
    output_bytes: int = 1_000_000
    max_processes: int = 64
    file_size_mb: int = 16
    disk_mb: int = 64  # everything in the workdir together (files the run was given included)
    open_files: int = 256
    require_network_isolation: bool = False  # refuse to run (status "error") when no netns is possible


@dataclass
class SandboxResult:
    """What happened to a sandboxed run."""

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    network_isolated: bool
    user_isolated: bool = False
    filesystem_isolated: bool = False  # private root (see the module docstring) was in force
    files: dict[str, str] = field(default_factory=dict)  # files written by the run, when requested

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


def _is_root() -> bool:
    return os.geteuid() == 0


def _netns_flags() -> int:
    return _CLONE_NEWNET if _is_root() else (_CLONE_NEWUSER | _CLONE_NEWNET)


@functools.cache
def _network_isolation_available() -> bool:
    """Whether a child can enter a fresh network namespace here (probed once in a forked child)."""
    libc = _libc()
    if libc is None or not sys.platform.startswith("linux"):
        return False
    try:
        proc = subprocess.run(
            ["/bin/true"],
            preexec_fn=functools.partial(_unshare_or_exit, libc, _netns_flags()),
            timeout=10,
            env={},
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def _unshare_or_exit(libc: ctypes.CDLL, flags: int) -> None:
    if libc.unshare(flags) != 0:
        os._exit(_PREEXEC_FAILED)


def _world_executable(path: str) -> bool:
    """True if every directory on the way is o+x and the file is o+rx (runnable by an unrelated uid)."""
    p = Path(path).resolve()
    try:
        if not p.is_file() or (p.stat().st_mode & (stat.S_IXOTH | stat.S_IROTH)) != (
            stat.S_IXOTH | stat.S_IROTH
        ):
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in p.parents)
    except OSError:
        return False


@functools.cache
def sandbox_python() -> str:
    """The interpreter sandboxed Python runs under: this one if the sandbox uid can run it, else a system python3."""
    if not _is_root() or _world_executable(sys.executable):
        return sys.executable
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if cand and _world_executable(cand):
            return cand
    return sys.executable  # run will fail with "error"; reported, not hidden


def isolation_report() -> dict[str, object]:
    """What this machine's sandbox enforces (for docs, `dsv doctor`-style output and tests)."""
    return {
        "network_namespace": _network_isolation_available(),
        "unprivileged_uid": _is_root(),
        "private_filesystem": _filesystem_isolation_available(),
        "rlimits": ["cpu", "address_space", "file_size", "open_files", "processes", "core"],
        "wall_and_output_limits": True,
        "private_workdir": True,
        "python": sandbox_python(),
    }


@dataclass(frozen=True)
class _RootPlan:
    """What the child mounts into its private root (computed in the parent: the child only executes it)."""

    binds: tuple[str, ...]  # host directories bound read-only at the same path
    links: tuple[tuple[str, str], ...]  # (path, target): symlinked top-level dirs such as /bin -> usr/bin
    tmp_mb: int


def _under(path: str, parents: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


@functools.cache
def _interpreter_dirs() -> tuple[str, ...]:
    """Installation prefixes of the sandbox interpreter that lie outside the system directories."""
    exe = sandbox_python()
    if exe != sys.executable:
        candidates = {str(Path(exe).resolve().parent.parent)}
    else:
        candidates = {
            str(Path(sys.executable).resolve().parent.parent),
            os.path.realpath(sys.base_prefix),
            os.path.realpath(sys.prefix),
        }
    return tuple(sorted(c for c in candidates if c != "/" and not _under(c, _SYSTEM_DIRS)))


def _java_paths() -> tuple[str, ...]:
    """What a Debian-style JDK needs from /etc, read-only, to start inside the private root.

    ``/usr/bin/java`` and ``javac`` are links through ``/etc/alternatives``, and the JDK's own
    ``lib/jvm.cfg`` and ``conf/`` files (``security/java.security`` among them) are links into
    ``/etc/java-<N>-openjdk``: only the /etc directories those links point into are exposed.
    (Its launchers also find ``libjli.so`` through an ``$ORIGIN`` run path, which glibc resolves via
    /proc/self/exe; there is no /proc in the private root, so the caller names the JDK's lib
    directory in ``LD_LIBRARY_PATH``, as ``dsv.synth.repo_langs.JavaAdapter`` does.)
    """
    wanted: set[str] = set()
    if os.path.isdir("/etc/alternatives"):
        wanted.add("/etc/alternatives")
    jvm = Path("/usr/lib/jvm")
    jdks = [p for p in jvm.iterdir() if p.is_dir() and not p.is_symlink()] if jvm.is_dir() else []
    for jdk in jdks:
        links = [p for p in (jdk / "lib").glob("*") if p.is_symlink()]
        if (jdk / "conf").is_dir():
            links += [Path(d, n) for d, dirs, names in os.walk(jdk / "conf") for n in dirs + names]
        for link in links:
            if not link.is_symlink():
                continue
            target = PurePosixPath(os.path.realpath(link))
            if target.parts[:2] == ("/", "etc") and len(target.parts) > 2:
                top = str(PurePosixPath("/etc", target.parts[2]))
                if os.path.isdir(top):
                    wanted.add(top)
    return tuple(sorted(wanted))


# Toolchain name -> function returning the host paths (directories) a run asking for it gets read-only.
TOOLCHAINS: dict[str, Callable[[], tuple[str, ...]]] = {"java": _java_paths}


@functools.cache
def _toolchain_binds(names: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        if name not in TOOLCHAINS:
            raise ValueError(f"unknown sandbox toolchain {name!r}; known: {', '.join(TOOLCHAINS)}")
        out.extend(p for p in TOOLCHAINS[name]() if p not in out)
    return tuple(out)


def _root_plan(tmp_mb: int) -> _RootPlan:
    binds: list[str] = []
    links: list[tuple[str, str]] = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            links.append((d, os.readlink(d)))
        elif os.path.isdir(d):
            binds.append(d)
    binds.extend(_interpreter_dirs())
    return _RootPlan(tuple(binds), tuple(links), max(1, tmp_mb))


def _enter_private_root(libc: ctypes.CDLL, plan: _RootPlan, root: str, workdir: str) -> None:
    """In the child: new mount namespace, minimal root on a tmpfs at `root`, chroot into it.

    Raises OSError on any failed step; the caller then runs without a private view.
    """

    def mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        args = [None if x is None else x.encode() for x in (src, dst, fstype)]
        if libc.mount(args[0], args[1], args[2], flags, None if data is None else data.encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {dst}: {os.strerror(err)}")

    if libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    # Nothing mounted below may propagate back to the host's namespace.
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    ro = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    for d in plan.binds:
        target = root + d
        os.makedirs(target, exist_ok=True)
        mount(d, target, None, _MS_BIND | _MS_REC)
        mount(None, target, None, ro)
    for path, dest in plan.links:
        os.symlink(dest, root + path)
    os.mkdir(root + "/dev", 0o755)
    for dev in _DEVICES:
        if os.path.exists(f"/dev/{dev}"):
            with open(f"{root}/dev/{dev}", "w"):
                pass
            mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, _MS_BIND)
            mount(None, f"{root}/dev/{dev}", None, _MS_BIND | _MS_REMOUNT | _MS_NOSUID)
    work = root + SANDBOX_WORKDIR
    os.makedirs(work)
    mount(workdir, work, None, _MS_BIND)
    mount(None, work, None, _MS_BIND | _MS_REMOUNT | _MS_NOSUID | _MS_NODEV)
    os.mkdir(root + "/tmp")
    mount("tmpfs", root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={plan.tmp_mb}m")
    mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chroot(root)
    os.chdir(SANDBOX_WORKDIR)


@functools.cache
def _filesystem_isolation_available() -> bool:
    """Whether a child can build and enter a private root here (root only; probed once)."""
    libc = _libc()
    if libc is None or not _is_root() or not sys.platform.startswith("linux"):
        return False
    plan = _root_plan(1)
    root = tempfile.mkdtemp(prefix="dsv-sandbox-root-")
    workdir = tempfile.mkdtemp(prefix="dsv-sandbox-probe-")
    try:
        proc = subprocess.run(
            ["/bin/sh", "-c", "test -d /work && test ! -e /etc/passwd"],
            preexec_fn=functools.partial(_enter_private_root, libc, plan, root, workdir),
            timeout=10,
            env={},
        )
        return proc.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _uid_in_use(uid: int) -> bool:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry.path).st_uid == uid:
                    return True
    return False


def _fresh_uid() -> int:
    rng = random.SystemRandom()
    for _ in range(20):
        uid = _UID_BASE + rng.randrange(_UID_SPAN)
        if not _uid_in_use(uid):
            return uid
    return _UID_BASE + rng.randrange(_UID_SPAN)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by `uid`: a helper takes that uid and calls kill(-1)."""
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # child: no Python-level work beyond these calls
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        if not _uid_in_use(uid):
            return


def _safe_relpath(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"sandbox file name must be a relative path inside the workdir, got {name!r}")
    return rel


def _chown_tree(root: Path, uid: int) -> None:
    os.chown(root, uid, uid)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.chown(os.path.join(dirpath, n), uid, uid, follow_symlinks=False)


def run_command(
    argv: Sequence[str],
    *,
    files: Mapping[str, str] | None = None,
    stdin: str | None = None,
    limits: Limits | None = None,
    collect_files: Sequence[str] = (),
    toolchains: Sequence[str] = (),
) -> SandboxResult:
    """Run `argv` in the sandbox with `files` written into its private workdir (see the module docstring).

    `collect_files` names workdir files to read back after the run (e.g. a results file).
    `toolchains` names entries of `TOOLCHAINS` whose host paths the private root exposes read-only.
    """
    limits = limits or Limits()
    extra_binds = _toolchain_binds(tuple(toolchains))
    files = dict(files or {})
    libc = _libc()
    net = _network_isolation_available()
    if limits.require_network_isolation and not net:
        return SandboxResult(
            "error", None, "", "network isolation is not available on this machine", 0.0, 0.0, False
        )
    as_root = _is_root()
    uid = _fresh_uid() if as_root else None
    workdir = Path(tempfile.mkdtemp(prefix="dsv-sandbox-"))
    # The private root's mount point: empty on the host; the tmpfs on it lives only in the child's namespace.
    root = tempfile.mkdtemp(prefix="dsv-sandbox-root-") if _filesystem_isolation_available() else None
    try:
        for name, content in files.items():
            target = workdir / _safe_relpath(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
        if uid is not None:
            _chown_tree(workdir, uid)
        result = _run(argv, workdir, stdin, limits, libc, net, uid, collect_files, root, extra_binds)
        if result.returncode is None and root is not None and "preexec_fn" in result.stderr:
            # The private root could not be built for this run (e.g. a mount limit): run without it.
            result = _run(argv, workdir, stdin, limits, libc, net, uid, collect_files, None, ())
        return result
    finally:
        if uid is not None:
            _kill_uid(uid)
        shutil.rmtree(workdir, ignore_errors=True)
        if root is not None:
            with contextlib.suppress(OSError):
                os.rmdir(root)


def run_python(
    code: str,
    *,
    files: Mapping[str, str] | None = None,
    stdin: str | None = None,
    limits: Limits | None = None,
    args: Sequence[str] = (),
    collect_files: Sequence[str] = (),
) -> SandboxResult:
    """Run Python source `code` (as the script `main.py`, next to `files`) in the sandbox."""
    all_files = dict(files or {})
    script = "_sandbox_main.py"
    all_files[script] = code
    # -E -s: ignore PYTHON* variables and user site-packages; the script dir stays importable
    # so multi-file programs work.
    argv = [sandbox_python(), "-E", "-s", "-B", script, *args]
    return run_command(argv, files=all_files, stdin=stdin, limits=limits, collect_files=collect_files)


def _run(
    argv: Sequence[str],
    workdir: Path,
    stdin: str | None,
    limits: Limits,
    libc: ctypes.CDLL | None,
    net: bool,
    uid: int | None,
    collect_files: Sequence[str],
    root: str | None,
    extra_binds: tuple[str, ...],
) -> SandboxResult:
    cpu = max(1, int(limits.cpu_s + 0.999))
    mem = limits.memory_mb * 1024 * 1024
    fsize = limits.file_size_mb * 1024 * 1024
    netflags = _netns_flags()

    plan = _root_plan(limits.file_size_mb * 4) if root is not None else None
    if plan is not None and extra_binds:
        plan = _RootPlan((*plan.binds, *extra_binds), plan.links, plan.tmp_mb)
    workdir_str = str(workdir)

    def preexec() -> None:  # runs in the child between fork and exec
        if plan is not None and root is not None and libc is not None:
            # An exception here surfaces in the parent as a failed start; run_command retries without it.
            _enter_private_root(libc, plan, root, workdir_str)
        try:
            if net and libc is not None and libc.unshare(netflags) != 0:
                os._exit(_PREEXEC_FAILED)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
            if uid is not None:
                resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.umask(0o077)
        except BaseException:
            os._exit(_PREEXEC_FAILED)

    home = SANDBOX_WORKDIR if plan is not None else str(workdir)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
    }
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=preexec,
            start_new_session=True,
            close_fds=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return SandboxResult(
            "error",
            None,
            "",
            f"could not start: {exc}",
            time.monotonic() - start,
            0.0,
            net,
            uid is not None,
            filesystem_isolated=plan is not None,
        )
    if stdin is not None and proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.write(stdin.encode("utf-8"))
        with contextlib.suppress(OSError):
            proc.stdin.close()

    out = bytearray()
    err = bytearray()
    reason: Status | None = None
    deadline = start + limits.wall_s
    disk = _DiskWatch(workdir, limits.disk_mb)
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    open_streams = 2
    while open_streams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            reason = "timeout"
            break
        if disk.over():
            reason = "disk_limit"
            break
        for key, _ in sel.select(timeout=min(remaining, _DISK_POLL_S)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            key.data.extend(chunk)
            if len(out) + len(err) > limits.output_bytes:
                reason = "output_limit"
                break
        if reason:
            break
    sel.close()
    if reason is not None:
        _kill_group(proc.pid)
        if uid is not None:
            _kill_uid(uid)
    # The pipes close once the child and every descendant holding them are gone; now reap the child.
    if reason is not None:
        _, status, usage = os.wait4(proc.pid, 0)
    else:
        while True:
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done:
                break
            if disk.over():
                reason = "disk_limit"
                _kill_group(proc.pid)
                if uid is not None:
                    _kill_uid(uid)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            if time.monotonic() > deadline:
                reason = "timeout"
                _kill_group(proc.pid)
                if uid is not None:
                    _kill_uid(uid)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    proc.stderr.close()
    # Descendants that outlived the child (still in its group) are killed too.
    _kill_group(proc.pid)
    wall = time.monotonic() - start
    cpu_used = usage.ru_utime + usage.ru_stime
    rc = proc.returncode
    stdout = out[: limits.output_bytes].decode("utf-8", errors="replace")
    stderr = err[: max(0, limits.output_bytes - len(out))].decode("utf-8", errors="replace")
    if reason is None:
        # Writes between the last measurement and the exit: the last word on the quota.
        reason = "disk_limit" if disk.over(force=True) else _classify(rc, stderr, cpu_used, limits)
    if reason == "disk_limit":
        stderr = f"{stderr}\n{disk.message()}" if stderr else disk.message()
    collected: dict[str, str] = {}
    for name in collect_files:
        target = workdir / _safe_relpath(name)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if target.is_file() and not target.is_symlink():
                collected[name] = target.read_bytes()[: limits.output_bytes].decode("utf-8", errors="replace")
    if rc == _PREEXEC_FAILED and not stdout and not stderr:
        stderr = "sandbox: could not confine the child process (namespace, rlimit or uid change failed)"
    return SandboxResult(
        reason,
        rc,
        stdout,
        stderr,
        wall,
        cpu_used,
        net,
        uid is not None,
        filesystem_isolated=plan is not None,
        files=collected,
    )


def _disk_usage(root: Path, limit: int) -> int:
    """Bytes the tree under ``root`` takes, as the quota charges them; stops counting past ``limit``.

    Each entry costs the larger of its allocated and apparent size, and at least one block: an
    empty file still takes an inode and a directory entry, and a sparse file is charged as if
    written. Directories the run made unreadable are opened up again (the host owns or outranks
    the run's uid), so nothing can be hidden from the count.
    """
    total = 0
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except PermissionError:
            with contextlib.suppress(OSError):
                os.chmod(top, 0o700)
            try:
                entries = list(os.scandir(top))
            except OSError:
                return limit + 1  # cannot be measured: treated as over, never as empty
        except OSError:
            continue  # removed while we looked
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += max(_BLOCK, st.st_blocks * 512, st.st_size if stat.S_ISREG(st.st_mode) else 0)
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            if total > limit:
                return total
    return total


class _DiskWatch:
    """Measures the workdir at most every `_DISK_POLL_S` (or twice the last measurement's time)."""

    def __init__(self, workdir: Path, limit_mb: int) -> None:
        self.workdir = workdir
        self.limit = limit_mb * 1024 * 1024
        self.used = 0
        self._next = 0.0
        self._interval = _DISK_POLL_S

    def over(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now < self._next:
            return False
        self.used = _disk_usage(self.workdir, self.limit)
        spent = time.monotonic() - now
        self._interval = max(_DISK_POLL_S, 2 * spent)
        self._next = time.monotonic() + self._interval
        return self.used > self.limit

    def message(self) -> str:
        return (
            f"sandbox: the run wrote more than its disk quota of {self.limit // (1024 * 1024)} MB "
            "to its working directory (Limits.disk_mb) and was stopped"
        )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _classify(rc: int | None, stderr: str, cpu_used: float, limits: Limits) -> Status:
    if rc == 0:
        return "ok"
    if rc is not None and rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= limits.cpu_s):
            return "timeout"
        if sig in (signal.SIGSEGV, signal.SIGBUS) and "MemoryError" in stderr:
            return "memory"
        if sig == signal.SIGXFSZ:
            return "output_limit"
        return "killed"
    tail = stderr[-2000:]
    if "MemoryError" in tail or "Cannot allocate memory" in tail or "std::bad_alloc" in tail:
        return "memory"
    return "error"
