"""``python -m dsv.rl grpo ...`` -- the same command as ``dsv rl grpo``; the form
``accelerate launch -m dsv.rl ...`` uses for multi-process runs."""

import typer

from dsv.cli.errors import run
from dsv.cli.main import plain_help
from dsv.rl.cli import rl_app

if __name__ == "__main__":
    run(plain_help(typer.main.get_command(rl_app)), prog_name="dsv rl")
