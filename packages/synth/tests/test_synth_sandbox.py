"""Sandbox containment: loops, fork bombs, allocations, output floods, host files, sockets.

As root, also the private filesystem view: host files (even world-readable ones) are absent,
the workdir is at /work, system directories are read-only, and a failed step falls back.

Run: pytest packages/synth/tests/test_synth_sandbox.py
Each hostile program must be stopped and reported with the right status while this
(host) process carries on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dsv.synth import sandbox
from dsv.synth.sandbox import SANDBOX_WORKDIR, Limits, isolation_report, run_command, run_python

IS_ROOT = os.geteuid() == 0
FAST = Limits(cpu_s=2, wall_s=4, memory_mb=256, output_bytes=20_000, max_processes=16)


def test_ok_with_files_stdin_and_collected_output() -> None:
    code = (
        "import helper, sys\nprint(helper.twice(int(sys.stdin.read())))\nopen('out.txt','w').write('done')\n"
    )
    r = run_python(
        code,
        files={"helper.py": "def twice(x):\n    return 2 * x\n"},
        stdin="21",
        limits=FAST,
        collect_files=["out.txt"],
    )
    assert r.status == "ok", r
    assert r.stdout.strip() == "42"
    assert r.files == {"out.txt": "done"}
    assert r.returncode == 0


def test_error_status_and_stderr() -> None:
    r = run_python("raise ValueError('boom')", limits=FAST)
    assert r.status == "error"
    assert r.returncode == 1
    assert "ValueError: boom" in r.stderr


def test_infinite_loop_is_stopped_by_cpu_limit() -> None:
    r = run_python("while True:\n    pass\n", limits=FAST)
    assert r.status == "timeout"
    # Stopped by a limit, not by anything slower: a loaded host may delay the kill by seconds, never
    # by the half minute this leaves.
    assert r.wall_s < FAST.wall_s + 30


def test_sleeping_program_is_stopped_by_wall_limit() -> None:
    r = run_python("import time\ntime.sleep(120)\n", limits=Limits(cpu_s=2, wall_s=1.0))
    assert r.status == "timeout"
    assert 1.0 <= r.wall_s < 60, "stopped at the wall limit, long before the sleep would end"


def test_huge_allocation_is_a_memory_failure() -> None:
    r = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')\n", limits=FAST)
    assert r.status == "memory", r
    assert "allocated" not in r.stdout


@pytest.mark.parametrize("memory_mb", [128, 256])
def test_allocations_just_under_the_memory_limit_succeed_and_just_over_fail(memory_mb: int) -> None:
    # The interpreter itself maps about 15 MB of address space: 48 MB under the limit leaves it room,
    # 1/16 over is past the limit whatever it maps. A limit off by any factor fails one of the two.
    limits = dataclasses.replace(FAST, memory_mb=memory_mb)
    program = "x = bytearray({mb} * 1024**2)\nx[-1] = 1\nprint('allocated', len(x) >> 20)\n"
    under = run_python(program.format(mb=memory_mb - 48), limits=limits)
    assert under.status == "ok" and under.stdout.split() == ["allocated", str(memory_mb - 48)], under
    over = run_python(program.format(mb=memory_mb + memory_mb // 16), limits=limits)
    assert over.status == "memory" and "allocated" not in over.stdout, over


def test_huge_output_is_cut_off() -> None:
    r = run_python("while True:\n    print('y' * 1000)\n", limits=FAST)
    assert r.status == "output_limit"
    assert len(r.stdout) <= FAST.output_bytes


@pytest.mark.skipif(not IS_ROOT, reason="process limits per sandbox need a private uid (root host)")
def test_fork_bomb_is_contained_and_cleaned_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # Note the uid this run is given, so the leftover check sees this bomb only (sandboxes of
    # tests running beside this one have their own uids).
    uids: list[int] = []
    fresh = sandbox._fresh_uid

    def noting_fresh_uid() -> int:
        uids.append(fresh())
        return uids[-1]

    monkeypatch.setattr(sandbox, "_fresh_uid", noting_fresh_uid)
    code = (
        "import os, time\n"
        "n = 0\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    r = run_python(code, limits=Limits(cpu_s=2, wall_s=3, memory_mb=256, max_processes=16))
    assert r.status in ("timeout", "killed")
    assert r.user_isolated
    assert len(uids) == 1
    # Nothing of the bomb survives: no live process runs under its uid. (Killed ones may linger a
    # moment as zombies, state Z, until init reaps them: they no longer run anything.)
    leftovers = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}").st_uid == uids[0]:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        leftovers.append((pid, state))
    assert leftovers == []


@pytest.mark.skipif(not IS_ROOT, reason="file isolation relies on running the program under another uid")
def test_secret_host_file_is_unreadable(tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    secret.chmod(0o600)
    code = f"print(open({str(secret)!r}).read())\n"
    r = run_python(code, limits=FAST)
    assert r.status == "error"
    assert "TOPSECRET" not in r.stdout
    # Denied by permissions, or absent altogether under the private filesystem view.
    assert "PermissionError" in r.stderr or "FileNotFoundError" in r.stderr
    # Reading the host's root-only home fails the same way.
    r2 = run_python("import os\nprint(os.listdir('/root'))\n", limits=FAST)
    assert r2.status == "error" and ("PermissionError" in r2.stderr or "FileNotFoundError" in r2.stderr)


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSV_SANDBOX_CANARY", "leak")
    r = run_python("import os\nprint(sorted(os.environ))\n", limits=FAST)
    assert r.status == "ok"
    assert "DSV_SANDBOX_CANARY" not in r.stdout


@pytest.mark.skipif(
    not isolation_report()["network_namespace"], reason="no network namespaces on this machine"
)
def test_socket_to_host_listener_fails() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        server.settimeout(5)
        with contextlib.suppress(OSError):
            accepted.append(server.accept())

    t = threading.Thread(target=accept)
    t.start()
    # The host itself can connect (the listener is real) ...
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    t.join()
    assert len(accepted) == 1
    # ... the sandbox cannot.
    code = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
    )
    r = run_python(code, limits=FAST)
    server.close()
    assert r.network_isolated
    assert r.status == "error"
    assert "connected" not in r.stdout
    assert "OSError" in r.stderr or "Network is unreachable" in r.stderr or "Error" in r.stderr


def test_run_command_and_bad_file_names() -> None:
    r = run_command(["/bin/sh", "-c", "cat data.txt; pwd"], files={"data.txt": "hello"}, limits=FAST)
    assert r.status == "ok"
    assert r.stdout.startswith("hello")
    with pytest.raises(ValueError):
        run_command(["/bin/true"], files={"../escape.txt": "x"}, limits=FAST)
    missing = run_command(["/nonexistent/program"], limits=FAST)
    assert missing.status == "error"


def test_workdir_is_private_and_removed() -> None:
    marker = f"marker-{os.getpid()}-{time.monotonic_ns()}.txt"
    code = f"import os\nopen({marker!r}, 'w').write('x')\nprint(os.getcwd())\nprint(oct(os.stat('.').st_mode & 0o777))\n"
    r = run_python(code, limits=FAST)
    cwd, mode = r.stdout.split()
    assert mode == "0o700"
    if r.filesystem_isolated:
        assert cwd == SANDBOX_WORKDIR
    else:
        assert not os.path.exists(cwd)
    # The host-side workdir (and the private root's mount point) are gone: no marker survives.
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "dsv-sandbox-*", marker))


ROOT_ONLY = pytest.mark.skipif(
    not (IS_ROOT and isolation_report()["private_filesystem"]),
    reason="the private filesystem view needs root and mount namespaces",
)


@ROOT_ONLY
def test_world_readable_host_files_are_invisible() -> None:
    # A world-readable file in the host's /tmp, this repository's own source, and /etc/passwd.
    fd, host_tmp = tempfile.mkstemp(prefix="dsv-visible-", suffix=".txt", dir="/tmp")
    os.write(fd, b"HOSTTMP-CANARY")
    os.close(fd)
    os.chmod(host_tmp, 0o644)
    repo_file = str(Path(__file__).resolve())
    try:
        for path in (host_tmp, repo_file, "/etc/passwd"):
            assert os.stat(path).st_mode & 0o004, f"{path} should be world-readable for this test"
            r = run_python(f"print(open({path!r}).read())\n", limits=FAST)
            assert r.filesystem_isolated and r.user_isolated
            assert r.status == "error", (path, r)
            assert "FileNotFoundError" in r.stderr
            assert "HOSTTMP-CANARY" not in r.stdout and "test_world_readable" not in r.stdout
        r = run_python("import os\nprint(sorted(os.listdir('/')))\nprint(os.listdir('/tmp'))\n", limits=FAST)
        assert r.status == "ok", r
        top, tmp = r.stdout.splitlines()
        assert "etc" not in top and "root" not in top and "home" not in top
        assert tmp == "[]"
    finally:
        os.unlink(host_tmp)


@ROOT_ONLY
def test_private_root_workdir_is_writable_and_system_dirs_are_read_only() -> None:
    code = (
        "import os, tempfile\n"
        "print(open('data.txt').read())\n"
        "open('/work/new.txt', 'w').write('written')\n"
        "with tempfile.NamedTemporaryFile(dir='/tmp') as f:\n    f.write(b'ok')\n"
        "for target in ('/usr/evil.txt', '/evil.txt'):\n"
        "    try:\n        open(target, 'w')\n        print('WROTE', target)\n"
        "    except OSError as exc:\n        print('denied', exc.errno)\n"
    )
    r = run_python(code, files={"data.txt": "from the host"}, limits=FAST, collect_files=["new.txt"])
    assert r.status == "ok", r
    assert r.stdout.splitlines()[0] == "from the host"
    assert "WROTE" not in r.stdout and r.stdout.count("denied") == 2
    assert r.files == {"new.txt": "written"}


@ROOT_ONLY
def test_private_root_falls_back_when_a_step_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sandbox._root_plan

    def broken(tmp_mb: int) -> object:
        plan = real(tmp_mb)
        return dataclasses.replace(plan, binds=(*plan.binds, "/nonexistent-dsv-dir"))

    monkeypatch.setattr(sandbox, "_root_plan", broken)
    r = run_python("print('ran')\n", limits=FAST)
    assert r.status == "ok", r
    assert r.stdout.strip() == "ran"
    assert not r.filesystem_isolated and r.user_isolated


def test_total_disk_quota_stops_big_writes() -> None:
    # Each file is under the per-file limit (RLIMIT_FSIZE); together they are 224 MB.
    code = (
        "import os\nchunk = os.urandom(1024 * 1024)\n"
        "for i in range(14):\n    with open(f'big{i}.bin', 'wb') as f:\n"
        "        for _ in range(16):\n            f.write(chunk[:-1] if _ == 15 else chunk)\n"
        "print('wrote all')\n"
    )
    r = run_python(code, limits=dataclasses.replace(FAST, wall_s=20, cpu_s=10))
    assert r.status == "disk_limit", r
    assert not r.ok
    assert "disk quota of 64 MB" in r.stderr


def test_total_disk_quota_counts_many_small_files() -> None:
    # 3000 one-byte files: 3 KB of data, but each takes a block and an inode.
    code = "for i in range(3000):\n    open(f'f{i}.txt', 'w').write('x')\nprint('done')\n"
    r = run_python(code, limits=dataclasses.replace(FAST, disk_mb=8))
    assert r.status == "disk_limit", r
    assert "disk quota of 8 MB" in r.stderr
    # Under the quota the same kind of run is fine, and the files it was given count too.
    small = run_python(
        "for i in range(100):\n    open(f'f{i}.txt', 'w').write('x')\nprint('done')\n",
        files={"given.txt": "y" * 1000},
        limits=dataclasses.replace(FAST, disk_mb=8),
    )
    assert small.status == "ok", small
    assert small.stdout.strip() == "done"


def test_disk_quota_sees_into_directories_the_run_locked() -> None:
    code = (
        "import os\nos.mkdir('hidden')\n"
        "for i in range(6):\n    open(f'hidden/{i}.bin', 'wb').write(b'z' * (2 * 1024 * 1024))\n"
        "os.chmod('hidden', 0)\nprint('done')\n"
    )
    r = run_python(code, limits=dataclasses.replace(FAST, disk_mb=8))
    assert r.status == "disk_limit", r
