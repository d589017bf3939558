"""``python -m dsv.train STAGE ...`` -- the same commands as ``dsv train``; the form
``accelerate launch -m dsv.train ...`` uses for multi-process runs."""

from dsv.cli.errors import run
from dsv.train.cli import train_app

if __name__ == "__main__":
    run(train_app, prog_name="dsv train")
