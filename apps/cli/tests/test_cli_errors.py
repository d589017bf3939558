"""dsv.cli.errors: the exit codes, the one-line messages, install hints, the output-folder check.

Run: ``pytest apps/cli/tests/test_cli_errors.py``.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from dsv.cli import errors
from dsv.cli.errors import ExitCode, MissingExtra, UserError, describe, install_hint, writable_dir


def test_public_api() -> None:
    assert errors.__all__ == ["ExitCode", "MissingExtra", "UserError", "click_classes", "describe", "exit_for", "fail",
                              "install_hint", "print_error", "run", "user_errors", "writable_dir"]  # fmt: skip
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 130, 143]


@pytest.mark.parametrize(
    ("exc", "code", "needle"),
    [
        (UserError("bad --x"), 1, "bad --x"),
        (UserError("no such flag", exit_code=ExitCode.USAGE), 2, "no such flag"),
        (MissingExtra("rg:<dataset> families need reasoning_gym: pip install ..."), 2, "need reasoning_gym"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/f"), 1, "/ro/f: permission denied"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/x"), 1, "/x: no such file or directory"),
        (OSError(errno.ENOSPC, "No space left on device", "/full"), 1, "no space left"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), 3, "endpoint error"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (RuntimeError("a bug"), None, None),
        (typer.Exit(2), None, None),
    ],
    ids=["user", "usage", "missing-extra", "permission", "missing", "disk-full", "network", "sigint", "bug", "typer-exit"],
)
def test_describe(exc: BaseException, code: int | None, needle: str | None) -> None:
    got = describe(exc)
    if code is None:
        assert got is None
    else:
        assert got is not None and got[0] == code and needle in got[1]


def test_dsv_error_is_a_user_error() -> None:
    pytest.importorskip("dsv.core")
    from dsv.core.errors import CheckpointError, DSVError, UsageError

    assert issubclass(DSVError, UserError) and describe(CheckpointError("x"))[0] == 1  # type: ignore[index]
    assert describe(UsageError("y"))[0] == 2  # type: ignore[index]


def test_install_hint_keeps_the_extra_and_works_from_a_checkout() -> None:
    hint = install_hint("dsv-synth", "eval")
    assert "pip install -e 'packages/synth[eval]'" in hint and "pip install 'dsv-synth[eval]'" in hint
    assert install_hint("dsv-kernels") == "pip install -e 'kernels' (in the dsv repository; or pip install 'dsv-kernels')"


def test_error_line_keeps_brackets() -> None:
    # rich would read [eval] as markup and print `dsv-synth`
    code = "from dsv.cli.errors import fail\nfail(\"install 'dsv-synth[eval]' then [bold]x\", 2)"
    app = f"import typer\napp = typer.Typer()\n@app.command()\ndef c() -> None:\n    {code.replace(chr(10), chr(10) + '    ')}\n"
    r = subprocess.run([sys.executable, "-c", app + "from dsv.cli.errors import run\nrun(app, [])"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr == "error: install 'dsv-synth[eval]' then [bold]x\n"


def test_writable_dir(tmp_path: Path) -> None:
    assert writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == [], "the probe file is removed"
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"--out .*f is a file; pass a folder"):
        writable_dir(tmp_path / "f")
    with pytest.raises(UserError, match=r"--data .*cannot create the folder"):
        writable_dir(tmp_path / "f" / "sub", "--data")


def test_a_missing_extra_is_still_an_import_error() -> None:
    """Code that probes for an optional package with ``except ImportError`` keeps working."""
    with pytest.raises(ImportError):
        raise MissingExtra("x needs y: pip install -e 'packages/synth[rg]'")
