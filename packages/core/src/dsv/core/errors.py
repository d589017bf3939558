"""User-facing errors.

Everything a user can get wrong (a config field, a checkpoint folder, a repo id
that is not cached while offline) raises a subclass of :class:`DSVError` whose
message says what was wrong and what to do. The CLI prints that one line and
exits non-zero; library callers can catch the class.

:class:`DSVError` is a :class:`dsv.cli.errors.UserError`, the type every dsv command turns into
one ``error:`` line and its ``exit_code`` (1 unless a subclass says otherwise; the codes are
documented in :mod:`dsv.cli.errors`).
"""

from __future__ import annotations

from dsv.cli.errors import ExitCode, UserError

__all__ = ["CheckpointError", "ConfigError", "DSVError", "ExitCode", "UsageError"]


class DSVError(UserError):
    """Base class of errors caused by user input (not by bugs)."""


class UsageError(DSVError):
    """A flag or a combination of flags is wrong (exit code 2)."""

    exit_code = ExitCode.USAGE


class ConfigError(DSVError, ValueError):
    """A model config field is unknown, missing or invalid."""


class CheckpointError(DSVError):
    """A checkpoint folder is incomplete, corrupt or does not match its config."""
