"""User-facing errors.

Everything a user can get wrong (a config field, a checkpoint folder, a repo id
that is not cached while offline) raises a subclass of :class:`DSVError` whose
message says what was wrong and what to do. The CLI prints that one line and
exits non-zero; library callers can catch the class.
"""

from __future__ import annotations


class DSVError(Exception):
    """Base class of errors caused by user input (not by bugs)."""


class ConfigError(DSVError, ValueError):
    """A model config field is unknown, missing or invalid."""


class CheckpointError(DSVError):
    """A checkpoint folder is incomplete, corrupt or does not match its config."""
