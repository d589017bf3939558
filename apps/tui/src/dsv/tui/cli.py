"""``dsv chat``: the agent shell (thin Typer command).

Run: ``dsv chat`` (no endpoint: serves the embedded tiny model locally), ``dsv chat --endpoint
https://api.deepseek.com/v1 --model deepseek-reasoner``, ``dsv chat --serve ./ckpt``, or one turn
with no UI for scripts: ``dsv chat --print "Summarise README.md" --endpoint ...`` (``--print -``
reads the prompt from stdin). The answer goes to stdout; tool activity and errors to stderr.

Exit codes (those of every dsv command, `dsv.cli.errors`): 0 an answer; 1 bad input (a file, a
session); 2 usage (flags); 3 the endpoint failed (unreachable, refused the key, rate limited, broke
the stream, an error status); 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from dsv.cli.errors import ExitCode, UserError, user_errors

__all__ = ["chat"]


def _fail(message: str, code: int) -> NoReturn:
    raise UserError(message, exit_code=code)


def _print_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _print_turn(agent: Any, text: str) -> int:
    """One turn without a UI: answer on stdout, progress on stderr; the exit code."""
    from dsv.tui.events import AgentError, ApprovalNeeded, ToolCallFinished, ToolCallStarted, TurnFinished

    async def no_one_to_ask(event: ApprovalNeeded) -> str:
        _print_line(f"dsv chat: denied {event.name} (no one to approve with --print; pass --approval auto-all "
                    "to let it run)")  # fmt: skip
        return "deny"

    code = int(ExitCode.ENDPOINT)
    try:
        async for event in agent.run_turn(text, no_one_to_ask):
            if isinstance(event, ToolCallStarted):
                _print_line(f"dsv chat: tool {event.name} {event.arguments}")
            elif isinstance(event, ToolCallFinished):
                _print_line(
                    f"dsv chat: tool {event.name} {'ok' if event.ok else 'failed'} in {event.duration_s:.2f} s"
                )
            elif isinstance(event, TurnFinished):
                print(event.answer, flush=True)
                u = event.usage
                _print_line(f"dsv chat: {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens in "
                            f"{event.latency_s:.2f} s (session {agent.session.id})")  # fmt: skip
                code = int(ExitCode.OK)
            elif isinstance(event, AgentError):
                after = f" (retry after {event.retry_after_s:g} s)" if event.retry_after_s is not None else ""
                from dsv.cli.errors import print_error

                print_error(f"{event.message}{after}")
                code = int(ExitCode.INPUT) if event.kind == "tool" else int(ExitCode.ENDPOINT)
    finally:
        await agent.aclose()
    return code


async def _run_app(agent: Any, store: Any) -> None:
    """The Textual app on this loop; MCP servers started during the chat are stopped on the same loop."""
    from dsv.tui.app import ChatApp

    try:
        await ChatApp(agent=agent, store=store).run_async()
    finally:
        await agent.aclose()


def _model_of(client: Any) -> str:
    """The first model the endpoint lists; '' when it lists none or cannot be asked."""

    async def ask() -> list[str]:
        try:
            return await client.list_models()
        finally:
            await client.aclose()

    return next(iter(asyncio.run(ask())), "")


@user_errors
def chat(
    endpoint: str = typer.Option(None, "--endpoint", "-e", envvar="DSV_ENDPOINT",
                                 help="OpenAI-compatible base URL ending in /v1 (default: a local dsv serve)"),
    model: str = typer.Option(None, "--model", "-m", help="model name (default: the endpoint's first)"),
    serve: Path = typer.Option(None, "--serve", help="start dsv serve for this checkpoint folder on a free local "
                               "port (stopped on exit)"),
    print_prompt: str = typer.Option(None, "--print", "-p", help="run one turn with no UI and print the answer "
                                     "('-' reads stdin)"),
    api_key: str = typer.Option(None, "--api-key", envvar=["DSV_API_KEY", "OPENAI_API_KEY"],
                                help="bearer key (or DSV_API_KEY / OPENAI_API_KEY)", show_envvar=True),
    workspace: Path = typer.Option(None, "--workspace", "-w", help="folder the file and shell tools work in "
                                   "(default: the current folder)"),
    approval: str = typer.Option("auto-read-only", "--approval", help="ask | auto-read-only | auto-all"),
    tools_file: list[Path] = typer.Option([], "--tools-file", help="Python file of user tools (repeatable)"),
    mcp: list[str] = typer.Option([], "--mcp", help="command of an MCP stdio server, e.g. 'python srv.py' "
                                  "(repeatable)"),
    resume: str = typer.Option(None, "--resume", help="session id (or a prefix of one, or 'last') to continue, "
                               "on its endpoint while that answers"),
    no_think: bool = typer.Option(False, "--no-think", help="start with thinking mode off"),
    system: str = typer.Option(None, "--system", help="system prompt"),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1, help="max_tokens of each request"),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds without a token before a stream counts as "
                                  "stalled"),
    sessions_dir: Path = typer.Option(None, "--sessions-dir", envvar="DSV_SESSIONS_DIR",
                                      help="where sessions are saved (default: the user data folder)"),
) -> None:  # fmt: skip
    """Chat with a model that thinks with tools (Textual UI), or run one turn with --print."""
    from dsv.tui.agent import Agent
    from dsv.tui.client import ChatClient, ClientError
    from dsv.tui.local_serve import LocalServer
    from dsv.tui.session import SessionStore
    from dsv.tui.tools import APPROVAL_MODES, ApprovalPolicy, ToolRegistry

    if endpoint and serve:
        _fail("give --endpoint or --serve, not both", ExitCode.USAGE)
    if approval not in APPROVAL_MODES:
        _fail(
            f"--approval {approval!r} is not a mode; use one of {', '.join(APPROVAL_MODES)}", ExitCode.USAGE
        )
    if not timeout > 0:
        _fail(f"--timeout must be positive, got {timeout}", ExitCode.USAGE)
    if print_prompt == "-":
        print_prompt = sys.stdin.read()
    if print_prompt is not None and not print_prompt.strip():
        _fail("--print needs a prompt (or '-' with the prompt on stdin)", ExitCode.USAGE)
    commands = []
    for spec in mcp:
        try:
            commands.append(shlex.split(spec))
        except ValueError as exc:
            _fail(f"--mcp {spec!r}: {exc}; quote the command as one argument", ExitCode.USAGE)
    store = SessionStore(sessions_dir)
    session = store.load(resume) if resume else None
    tools = ToolRegistry(workspace or Path.cwd(), timeout_s=max(timeout, 60.0))
    for f in tools_file:
        tools.load_user_file(f)
    for command in commands:
        tools.add_mcp_server_later(command)

    if session is not None and not endpoint and serve is None and session.endpoint:
        # A resumed session goes back to its endpoint (and model) while that still answers; a local
        # server it had is gone with its port, so then a new one starts.
        try:
            found = _model_of(
                ChatClient(session.endpoint, api_key, "", read_timeout_s=5.0, connect_timeout_s=2.0)
            )
        except ClientError:
            found = None
        if found is not None:
            endpoint, model = session.endpoint, model or session.model or found
            _print_line(f"dsv chat: resuming on {endpoint} (model {model})")

    with contextlib.ExitStack() as stack:
        if not endpoint:
            local = LocalServer(serve)
            if serve is None:
                _print_line(
                    "dsv chat: no --endpoint: serving the embedded tiny model (random weights) locally"
                )
            _print_line("dsv chat: starting dsv serve ...")
            stack.enter_context(local)
            endpoint, model = local.base_url, model or local.model_name
            _print_line(f"dsv chat: dsv serve on {endpoint} (model {model})")
        if not model:
            try:
                model = _model_of(ChatClient(endpoint, api_key, "", read_timeout_s=timeout))
            except ClientError as exc:
                if print_prompt is not None:
                    _fail(exc.message, ExitCode.ENDPOINT)
                # The UI shows the endpoint's error on the first turn.
                model = session.model if session is not None else ""
        client = ChatClient(endpoint, api_key, model or "", read_timeout_s=timeout, max_tokens=max_tokens)
        if session is None:
            session = store.new(endpoint=endpoint, model=model or "", thinking=not no_think, system=system)
        else:
            session.endpoint, session.model = endpoint, model or session.model
            if no_think:
                session.thinking = False
            if system is not None:
                session.system = system
        agent = Agent(client, tools, ApprovalPolicy(mode=approval), session)  # type: ignore[arg-type]
        if print_prompt is not None:
            code = asyncio.run(_print_turn(agent, print_prompt))
            if code:
                # SystemExit, not typer.Exit: the error line is printed already, only the code is left.
                raise SystemExit(code)
            return
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            _fail('dsv chat needs a terminal; use --print "..." in scripts and pipes', ExitCode.USAGE)
        asyncio.run(_run_app(agent, store))
