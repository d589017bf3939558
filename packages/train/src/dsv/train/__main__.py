"""``python -m dsv.train STAGE ...`` -- the same commands as ``dsv train``; the form
``accelerate launch -m dsv.train ...`` uses for multi-process runs."""

import typer

from dsv.cli.errors import run
from dsv.cli.main import plain_help
from dsv.train.cli import train_app

if __name__ == "__main__":
    run(plain_help(typer.main.get_command(train_app)), prog_name="dsv train")
