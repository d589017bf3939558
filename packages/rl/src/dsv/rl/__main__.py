"""``python -m dsv.rl grpo ...`` -- the same command as ``dsv rl grpo``; the form
``accelerate launch -m dsv.rl ...`` uses for multi-process runs."""

from dsv.rl.cli import rl_app

if __name__ == "__main__":
    rl_app(prog_name="dsv rl")
