"""dsv-cli: the ``dsv`` command (:mod:`dsv.cli.main`) and the one error path every command of every
distribution ends through (:mod:`dsv.cli.errors`: one ``error:`` line and a documented exit code).

Light on purpose: typer and rich only, no dsv package, so every distribution can depend on it.
"""

from __future__ import annotations

from dsv.cli.errors import (
    ExitCode,
    MissingExtra,
    UserError,
    exit_for,
    fail,
    install_hint,
    run,
    user_errors,
    writable_dir,
)

__all__ = [
    "ExitCode",
    "MissingExtra",
    "UserError",
    "exit_for",
    "fail",
    "install_hint",
    "run",
    "user_errors",
    "writable_dir",
]
