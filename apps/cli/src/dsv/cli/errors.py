"""The one error path of every ``dsv`` command: exit codes, one-line messages, install hints.

Every distribution's commands end the same way, so a script can tell failures apart and a person
reads one line naming the thing and the fix instead of a traceback:

====  =====================================================================================
code  meaning
====  =====================================================================================
0     success
1     input or data: a file, folder, checkpoint or record is missing, wrong or not writable
2     usage: a bad flag or combination, a missing distribution or extra
3     endpoint: an endpoint could not be reached or refused the request (unknown model, key)
4     the run finished but its result is under ``--fail-under``
130   interrupted (Ctrl-C, SIGINT)
143   terminated (SIGTERM)
====  =====================================================================================

:func:`run` is what ``dsv`` (and ``python -m dsv.train``) call around a Typer app: click's usage
errors keep their own message, :class:`UserError` (``dsv.core.errors.DSVError`` is one), file-system
and network errors become ``error: ...`` and their exit code, Ctrl-C becomes 130. Any other
exception is a bug and keeps its traceback. ``DSV_DEBUG=1`` shows the traceback of every error.

This module lives in dsv-cli because every command distribution can depend on it: dsv-synth is
torch-free, so it cannot import dsv-core, and dsv-cli needs only typer and rich, which every
distribution with commands already pulls in. Nothing here imports a dsv package.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "ExitCode",
    "MissingExtra",
    "UserError",
    "click_classes",
    "describe",
    "exit_for",
    "fail",
    "install_hint",
    "print_error",
    "run",
    "user_errors",
    "writable_dir",
]


class ExitCode(IntEnum):
    """The exit codes of every dsv command (the table in this module's docstring)."""

    OK = 0
    INPUT = 1
    USAGE = 2
    ENDPOINT = 3
    BELOW_THRESHOLD = 4
    INTERRUPTED = 130
    TERMINATED = 143


class UserError(Exception):
    """An error the user can fix; its message names what was wrong and what to do.

    ``exit_code`` (class attribute or constructor argument) is one of :class:`ExitCode`.
    """

    exit_code: int = ExitCode.INPUT

    def __init__(self, message: str = "", *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class MissingExtra(UserError, ImportError):
    """A feature needs a package that is not installed (usually an extra of a dsv distribution); the
    message says what to install. An ``ImportError`` too, so code that probes for the package with
    ``except ImportError`` keeps working, and a usage error (exit 2) when it reaches the command line."""

    exit_code = ExitCode.USAGE


# Where each distribution lives in the dsv repository: none is published yet, so a hint must also
# work from a checkout.
_FOLDERS = {
    "dsv-core": "packages/core",
    "dsv-kernels": "kernels",
    "dsv-train": "packages/train",
    "dsv-synth": "packages/synth",
    "dsv-serve": "packages/serve",
    "dsv-rl": "packages/rl",
    "dsv-cli": "apps/cli",
    "dsv-tui": "apps/tui",
}


def install_hint(dist: str, extra: str | None = None) -> str:
    """How to install ``dist`` (with ``extra``): from the dsv repository root, or from an index.

    >>> install_hint("dsv-synth", "eval")
    "pip install -e 'packages/synth[eval]' (in the dsv repository; or pip install 'dsv-synth[eval]')"
    """
    suffix = f"[{extra}]" if extra else ""
    folder = _FOLDERS.get(dist)
    indexed = f"pip install '{dist}{suffix}'"
    if folder is None:
        return indexed
    return f"pip install -e '{folder}{suffix}' (in the dsv repository; or {indexed})"


def print_error(message: str) -> None:
    """Print ``error: message`` to stderr, unwrapped and with no rich markup read from ``message``.

    Messages carry brackets (``dsv-synth[eval]``, ``[1, 2]``) that rich would take for markup.
    """
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = ExitCode.INPUT) -> NoReturn:
    """Print ``error: message`` and end the command with exit code ``code``."""
    import typer

    print_error(message)
    raise typer.Exit(int(code))


# Exceptions from these modules are about an endpoint or the network, not the user's files.
_NETWORK_MODULES = ("httpx", "httpcore", "openai", "urllib3", "requests", "aiohttp")


def _os_message(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    what = exc.strerror or str(exc)
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; choose a path you can write to, or change its permissions"
    if exc.errno == errno.EROFS:
        return f"{where}: read-only file system; choose a path on a writable disk"
    if exc.errno == errno.ENOSPC:
        return f"{where}: no space left on the device; free some space or write elsewhere"
    if isinstance(exc, FileNotFoundError):
        return f"{where}: no such file or directory"
    return f"{where}: {what}" if where else what


def describe(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, one-line message)`` for an error a user can act on; None for a bug."""
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED, "interrupted"
    if isinstance(exc, click_classes("Exit") + click_classes("ClickException")):
        return None  # click's own exits and usage errors are not errors of ours
    code = getattr(exc, "exit_code", None)
    if isinstance(exc, UserError) or (isinstance(code, int) and isinstance(exc, Exception)):
        return int(code if isinstance(code, int) else ExitCode.INPUT), str(exc) or type(exc).__name__
    module = type(exc).__module__.split(".")[0]
    if module in _NETWORK_MODULES or isinstance(exc, ConnectionError):
        detail = str(exc) or type(exc).__name__
        return ExitCode.ENDPOINT, f"endpoint error: {detail}"
    if isinstance(exc, OSError):
        return ExitCode.INPUT, _os_message(exc)
    return None


# Where each class lives: click, and recent Typer releases, which carry their own Exit and Abort
# (typer.exceptions) and their own copy of click's core (typer._click) instead of using click's.
_CLICK_HOMES = {
    "Exit": ("click.exceptions", "typer.exceptions"),
    "Abort": ("click.exceptions", "typer.exceptions"),
    "ClickException": ("click.exceptions", "typer._click.exceptions"),
    "Command": ("click.core", "typer._click.core"),
    "Argument": ("click.core", "typer.core:TyperArgument"),
}


def click_classes(name: str) -> tuple[type, ...]:
    """Click's ``name`` (``Exit``, ``Abort``, ``ClickException``, ``Command``, ``Argument``) as click
    and the installed Typer define it: a Typer command raises and is built of Typer's."""
    import importlib

    found: list[type] = []
    for home in _CLICK_HOMES[name]:
        module, _, attr = home.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr or name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def exit_for(exc: BaseException, *, value_error: int | None = ExitCode.INPUT) -> NoReturn:
    """End the command because of ``exc``: one ``error:`` line and its exit code.

    A ``ValueError`` (a setting a library check refused) exits with ``value_error``; an exception
    :func:`describe` does not know is a bug and is raised again, traceback and all.
    """
    described = describe(exc)
    if described is None and value_error is not None and isinstance(exc, ValueError):
        described = (value_error, str(exc))
    if described is None or os.environ.get("DSV_DEBUG", "") not in ("", "0"):
        raise exc
    fail(described[1], described[0])


def user_errors(fn: F) -> F:
    """Decorate a command so that its errors end through :func:`exit_for` (Typer's exits pass)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click_classes("Exit") + click_classes("ClickException"):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            exit_for(exc)

    return wrapper  # type: ignore[return-value]


def run(app: Any, args: Sequence[str] | None = None, prog_name: str | None = None) -> NoReturn:
    """Run a Typer app (or click command) as a command-line program; exit with a documented code."""
    import typer

    command: Callable[..., Any] = app if isinstance(app, click_classes("Command")) else typer.main.get_command(app)
    debug = os.environ.get("DSV_DEBUG", "") not in ("", "0")
    try:
        result = command.main(  # type: ignore[attr-defined]
            args=list(args) if args is not None else sys.argv[1:], prog_name=prog_name, standalone_mode=False
        )
        code = result if isinstance(result, int) else ExitCode.OK
    except click_classes("Exit") as exc:
        code = exc.exit_code
        if isinstance(exc.__cause__, KeyboardInterrupt):  # Typer turns Ctrl-C into a silent Exit(130)
            print_error("interrupted")
    except click_classes("ClickException") as exc:  # usage errors: click's own message and code 2
        exc.show()
        code = exc.exit_code
    except click_classes("Abort") as exc:
        # click turns Ctrl-C (and EOF at a prompt) into Abort
        interrupted = isinstance(exc.__context__, KeyboardInterrupt) or isinstance(exc.__cause__, KeyboardInterrupt)
        print_error("interrupted" if interrupted else "aborted")
        code = ExitCode.INTERRUPTED if interrupted else ExitCode.INPUT
    except SystemExit:
        raise
    except BaseException as exc:
        described = describe(exc)
        if described is None or debug:
            raise
        code, message = described
        print_error(message)
    sys.stdout.flush()
    sys.exit(int(code))


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create the folder ``path`` if needed and check that files can be written in it.

    Raises :class:`UserError` naming ``flag``, the folder and the fix, so a command fails at once
    instead of after minutes of work (or with a traceback).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocked = _nearest_existing(path)
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise UserError(
            f"{flag} {path}: cannot create the folder in {blocked} ({reason}); "
            "choose a folder you can write to"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".dsv-write-check-", dir=path)
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise UserError(f"{flag} {path} is not writable ({reason}); choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)
    return path
