"""The `dsv` command.

Commands are not hard-wired here: every installed dsv distribution registers its
Typer sub-apps or functions under the entry-point group ``dsv.commands`` and its
benchmarks under ``dsv.bench``. This module only discovers them, so installing
``dsv-serve`` is what makes ``dsv serve`` exist. Known commands whose
distribution is missing still appear in ``--help`` and, when run, say which
distribution to install (exit code 2). Every command, whichever distribution it comes
from, ends through :func:`dsv.cli.errors.run`: one ``error:`` line and a documented
exit code instead of a traceback.

Nothing heavy (torch, triton) is imported at start-up: ``dsv --help`` is instant.

Run: ``dsv --help``, ``dsv doctor``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any

import typer

from dsv.cli.errors import ExitCode, fail, install_hint, print_error, run

# Where each top-level command comes from, so a missing one can say what to install.
KNOWN_COMMANDS: dict[str, tuple[str, str]] = {
    "model": ("dsv-core", "init, inspect, download and convert checkpoints"),
    "generate": ("dsv-core", "generate text from a checkpoint, streaming tokens"),
    "train": ("dsv-train", "pretrain, DSA warm-up, sparse training and SFT"),
    "rl": ("dsv-rl", "GRPO with the V3.2 stabilisers"),
    "quickstart": ("dsv-rl", "the whole V3.2 recipe end to end on the embedded default, one report card"),
    "synth": ("dsv-synth", "agentic environments, tasks and the synthesis pipeline"),
    "eval": ("dsv-synth", "score a checkpoint or an endpoint on task sets"),
    "serve": ("dsv-serve", "OpenAI-compatible server"),
    "chat": ("dsv-tui", "the Textual agent shell"),
}
KNOWN_BENCHES: dict[str, str] = {
    "core": "dsv-core",
    "kernels": "dsv-kernels",
    "serve": "dsv-serve",
    "synth": "dsv-synth",
    "train": "dsv-train",
}

def _version_callback(value: bool) -> None:
    if value:
        for name, version in installed_distributions().items():
            print(f"{name} {version}")
        raise typer.Exit()


def installed_distributions() -> dict[str, str]:
    """Installed distributions whose name starts with ``dsv-``, sorted, with their versions."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name.startswith("dsv-") and name != "dsv-workspace":
            found[name] = dist.version
    return dict(sorted(found.items()))


def _missing(name: str, dist: str, what: str) -> Callable[..., None]:
    def command(ctx: typer.Context) -> None:
        fail(
            f"`dsv {' '.join([ctx.info_name or name, *ctx.args]).strip()}` needs the {dist} distribution, "
            f"which is not installed; install it with: {install_hint(dist)}",
            ExitCode.USAGE,
        )

    command.__doc__ = f"(not installed: {dist}) {what}"
    return command


def _attach(app: typer.Typer, name: str, obj: Any) -> None:
    if isinstance(obj, typer.Typer):
        app.add_typer(obj, name=name)
    elif callable(obj):
        app.command(name=name)(obj)
    else:  # pragma: no cover - a packaging mistake, not a user error
        raise TypeError(f"entry point dsv.commands:{name} is neither a Typer app nor a function")


def _load_group(group: str) -> dict[str, Any]:
    loaded: dict[str, Any] = {}
    for ep in metadata.entry_points(group=group):
        try:
            loaded[ep.name] = ep.load()
        except ImportError as exc:  # a broken optional dependency must not take the whole CLI down
            loaded[ep.name] = exc
    return loaded


def _broken(name: str, exc: ImportError) -> Callable[..., None]:
    def command() -> None:
        fail(f"`dsv {name}` could not be loaded: {exc}", ExitCode.USAGE)

    command.__doc__ = f"(broken install) {exc}"
    return command


def build_app() -> typer.Typer:
    """Build the root Typer app from the installed distributions' entry points."""
    app = typer.Typer(
        name="dsv",
        help="dsv: the DeepSeek-V3.2 toolkit (model, DSA kernels, training, RL, synthesis, serving).",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.callback()
    def root(
        version: bool = typer.Option(
            False,
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="List installed dsv distributions.",
        ),
    ) -> None:
        """dsv: the DeepSeek-V3.2 toolkit."""

    from dsv.cli.doctor import doctor

    app.command(name="doctor")(doctor)

    commands = _load_group("dsv.commands")
    for name in sorted(set(commands) | set(KNOWN_COMMANDS)):
        obj = commands.get(name)
        if obj is None:
            dist, what = KNOWN_COMMANDS[name]
            app.command(
                name=name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
            )(_missing(name, dist, what))
        elif isinstance(obj, ImportError):
            app.command(name=name)(_broken(name, obj))
        else:
            _attach(app, name, obj)

    bench = typer.Typer(help="Benchmarks (results go to BENCHMARKS.md tables).", no_args_is_help=True)
    benches = _load_group("dsv.bench")
    for name in sorted(set(benches) | set(KNOWN_BENCHES)):
        obj = benches.get(name)
        if obj is None:
            bench.command(
                name=name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
            )(_missing(f"bench {name}", KNOWN_BENCHES[name], f"{name} benchmarks"))
        elif isinstance(obj, ImportError):
            bench.command(name=name)(_broken(f"bench {name}", obj))
        else:
            _attach(bench, name, obj)
    app.add_typer(bench, name="bench")
    return app


def plain_help(command: Any) -> Any:
    """Give ``command`` and every sub-command click's plain help layout; returns ``command``.

    Typer's rich panels put the longest option name's width in front of every description, so at
    80 columns options were cut (``--indexer-loss-wei…``) and help wrapped to a few words a line,
    with ``<bool>`` beside every flag. Click's layout wraps the description under its option.
    Required arguments read ``PATH`` in the usage line as in click, not ``{path}``.
    """
    import functools

    from dsv.cli.errors import click_classes

    def usage_name(param: Any) -> str:
        name = (param.metavar or param.name or "").upper()
        name = name if param.required else f"[{name}]"
        return name + ("..." if param.nargs != 1 else "")

    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None
    for param in getattr(command, "params", []):
        if isinstance(param, click_classes("Argument")) and hasattr(param, "_usage_display_name"):
            param._usage_display_name = functools.partial(usage_name, param)
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)
    return command


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every command ends through :func:`dsv.cli.errors.run`."""
    try:  # loading every distribution's entry points takes a moment: Ctrl-C may land here
        command = plain_help(typer.main.get_command(build_app()))
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(ExitCode.INTERRUPTED)
    run(command, argv if argv is not None else sys.argv[1:], prog_name="dsv")


if __name__ == "__main__":
    main()
