"""``python -m dsv.synth.eval ...``: the same command as ``dsv eval``, without the dsv CLI installed."""

import typer

from dsv.cli.errors import run
from dsv.synth.eval.cli import eval_command


def main() -> None:
    """Run ``eval_command`` as a standalone Typer program, through the error path of ``dsv``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(eval_command)
    run(app, prog_name="dsv eval")


if __name__ == "__main__":
    main()
