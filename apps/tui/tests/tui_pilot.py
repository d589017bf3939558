"""Shared helpers of the dsv chat app tests (imported by name: pytest puts this folder on sys.path).

Every app here is the real ``ChatApp`` with the real agent core (``Agent``, ``ChatClient`` over the
official openai client, ``ToolRegistry`` on a temporary workspace, ``SessionStore`` in a temporary
folder) talking HTTP to a server on 127.0.0.1: the scripted OpenAI-compatible endpoint of
packages/synth/tests or a real ``dsv serve``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console

from dsv.tui.agent import Agent
from dsv.tui.app import ChatApp
from dsv.tui.client import ChatClient
from dsv.tui.session import Session, SessionStore
from dsv.tui.tools import ApprovalPolicy, ToolRegistry

REPO = Path(__file__).resolve().parents[3]
FIXED_CREATED = "2026-12-07T14:02:00+00:00"


def load_scripted_endpoint() -> ModuleType:
    """packages/synth/tests/scripted_endpoint.py as a module (one instance per process)."""
    name = "dsv_synth_tests_scripted_endpoint"
    if name in sys.modules:
        return sys.modules[name]
    path = REPO / "packages" / "synth" / "tests" / "scripted_endpoint.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fixed_seconds(seconds: float) -> str:
    """Durations in snapshots: one fixed string, so screens are byte-stable."""
    return "0.5 s"


def build_app(
    base_url: str,
    root: Path,
    *,
    model: str = "scripted",
    approval: str = "auto-read-only",
    session: Session | None = None,
    show_context: bool = True,
    fixed_times: bool = False,
    timeout_s: float = 60.0,
    max_result_chars: int = 16_000,
    read_timeout_s: float = 30.0,
    tools_file: Path | None = None,
    api_key: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> ChatApp:
    """A ChatApp on ``root/workspace`` with sessions in ``root/sessions``."""
    workspace = root / "workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    store = SessionStore(root / "sessions")
    tools = ToolRegistry(workspace, timeout_s=timeout_s, max_result_chars=max_result_chars)
    if tools_file is not None:
        tools.load_user_file(tools_file)
    client = ChatClient(base_url, api_key, model, read_timeout_s=read_timeout_s, connect_timeout_s=2.0,
                        max_tokens=max_tokens, temperature=temperature)  # fmt: skip
    if session is None:
        session = store.new(endpoint=base_url, model=model)
        if fixed_times:
            session.created = session.updated = FIXED_CREATED
    agent = Agent(client, tools, ApprovalPolicy(mode=approval), session)
    kwargs: dict[str, Any] = {"format_seconds": fixed_seconds} if fixed_times else {}
    return ChatApp(agent=agent, store=store, show_context=show_context, export_dir=root, **kwargs)


def screen_text(app: ChatApp) -> str:
    """The screen as plain text (what a person sees, without colours)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)  # fmt: skip
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text(styles=False)


async def until(pilot: Any, condition: Callable[[], Any], *, timeout: float = 15.0, what: str = "") -> None:
    """Let the app run until ``condition()`` is true; fail with ``what`` and the screen after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}\n{screen_text(pilot.app)}")
        # not pilot.pause(): it first waits for the screen to settle, which a stream does not do
        await asyncio.sleep(0.02)


async def probed(pilot: Any) -> None:
    """Wait for the start-up probe of the endpoint (the header's connecting -> ready or error)."""
    await until(pilot, lambda: not any(w.group == "probe" and not w.is_finished for w in pilot.app.workers),
                what="the endpoint probe")  # fmt: skip


async def send(pilot: Any, text: str, *, type_it: bool = False) -> None:
    """Put ``text`` in the prompt (typed key by key when ``type_it``) and press enter."""
    app = pilot.app
    prompt = app.chat.prompt
    prompt.focus()
    if type_it:
        for ch in text:
            await pilot.press("space" if ch == " " else ch)
    else:
        prompt.value = text
    await pilot.press("enter")
    await pilot.pause()


async def turn_done(pilot: Any, *, timeout: float = 20.0) -> None:
    """Wait until the running turn (and the context panel refresh after it) has ended."""
    chat = pilot.app.chat
    await until(pilot, lambda: chat.turn_worker is not None and not chat.busy, timeout=timeout, what="the turn to end")
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def close(app: ChatApp) -> None:
    """Stop the agent's MCP servers and HTTP client (the CLI does this on exit)."""
    await asyncio.wait_for(app.agent.aclose(), 10)
