"""The installed ``dsv chat`` in a real terminal: tmux runs it against the scripted server on
127.0.0.1, the test types a prompt with send-keys, reads the streamed answer with capture-pane and
quits with ctrl+q, then checks that the process exited with 0.

Needs tmux (tools/test.sh installs it when it can); without it the test skips and says so. Sessions,
caches and logs go to a temporary XDG folder, not the user's.

Run: ``pytest apps/tui/tests/test_tui_tmux.py``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tui_pilot

H = tui_pilot  # shared app-test helpers beside this file (on sys.path in prepend mode)
SE = H.load_scripted_endpoint()

TMUX = shutil.which("tmux")
DSV = shutil.which("dsv") or str(Path(sys.executable).with_name("dsv"))
pytestmark = [
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux; tools/test.sh does it as root)"),
    pytest.mark.skipif(not Path(DSV).is_file(), reason=f"the dsv console script is not installed ({DSV})"),
]


def script(body: dict[str, Any]) -> Any:
    text = str(body["messages"][-1].get("content"))
    return SE.Reply(content=f"Streamed **answer** to: {text}", reasoning_content="Answer the terminal.", chunk_delay_s=0.01)


class Tmux:
    """One private tmux server (its own socket), so the test never touches a user's sessions."""

    def __init__(self) -> None:
        self.socket = f"dsv-chat-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert TMUX is not None
        return subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True, check=check,
                              timeout=30)  # fmt: skip

    def screen(self) -> str:
        result = self("capture-pane", "-p", "-t", "chat", check=False)
        return result.stdout

    def wait(self, condition: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if condition(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the terminal shows:\n{text}")
            time.sleep(0.2)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    t = Tmux()
    yield t
    t("kill-server", check=False)


def test_installed_dsv_chat_in_tmux(tmux: Tmux, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    exit_file = tmp_path / "exit-code"
    env = {f"XDG_{kind}_HOME": str(tmp_path / kind.lower()) for kind in ("DATA", "CACHE", "STATE", "CONFIG")}
    with SE.ScriptedEndpoint(script) as endpoint:
        command = " ".join([
            "env", *(f"{k}={shlex.quote(v)}" for k, v in env.items()), "TERM=xterm-256color",
            shlex.quote(DSV), "chat", "--endpoint", endpoint.base_url, "--model", "scripted",
            "--workspace", shlex.quote(str(workspace)),
        ])  # fmt: skip
        tmux("new-session", "-d", "-s", "chat", "-x", "120", "-y", "36",
             f"{command}; echo $? > {shlex.quote(str(exit_file))}")  # fmt: skip
        tmux.wait(lambda s: "dsv chat" in s and "ready" in s, "the chat screen")

        tmux("send-keys", "-t", "chat", "-l", "hello from tmux")
        tmux.wait(lambda s: "hello from tmux" in s, "the typed prompt")
        tmux("send-keys", "-t", "chat", "Enter")
        shown = tmux.wait(lambda s: "Streamed answer to: hello from tmux" in s, "the streamed answer")
        assert "thinking" in shown and "Answer the terminal." in shown  # the reasoning block
        tmux.wait(lambda s: "last turn" in s, "the turn's usage in the header")
        assert len(endpoint.requests) == 1

        tmux("send-keys", "-t", "chat", "C-q")
        deadline = time.monotonic() + 30
        while not exit_file.exists():
            assert time.monotonic() < deadline, f"dsv chat did not exit after ctrl+q:\n{tmux.screen()}"
            time.sleep(0.2)
    assert exit_file.read_text().strip() == "0"
    # the shell that ran it has ended, and with it the tmux session
    deadline = time.monotonic() + 10
    while tmux("has-session", "-t", "chat", check=False).returncode == 0:
        assert time.monotonic() < deadline, "the tmux session outlived dsv chat"
        time.sleep(0.2)
    # the turn was saved in the (temporary) user data folder
    sessions = list((tmp_path / "data" / "dsv" / "sessions").glob("*.json"))
    assert len(sessions) == 1 and "hello from tmux" in sessions[0].read_text()
