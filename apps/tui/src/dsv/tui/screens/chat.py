"""The main screen: header, transcript, context panel, prompt with slash commands, footer.

A turn runs as a Textual worker on the app's event loop: it iterates ``Agent.run_turn`` and draws
each event as it comes (the worker awaits the drawing, so a fast stream cannot outrun the screen;
Markdown fragments are batched by Textual's MarkdownStream). Approvals are awaited inside the
agent's ``approve`` callback by pushing :class:`ApprovalScreen` and waiting for its result. The
agent saves the session after every step; this screen only redraws from it.

Keys are screen bindings, so the footer and the command palette list them; slash commands typed
in the prompt do the same things (plus the ones that take an argument: /model, /endpoint, /system).
"""

from __future__ import annotations

import asyncio
import json
import math
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker

from dsv.tui.client import ClientError
from dsv.tui.events import (
    AgentError,
    ApprovalNeeded,
    ContentDelta,
    ReasoningDelta,
    Status,
    StepFinished,
    ToolCallFinished,
    ToolCallStarted,
    TurnFinished,
    TurnStarted,
    Usage,
)
from dsv.tui.messages import HistoryRequested, PromptSubmitted, SessionSwitched, TurnEnded
from dsv.tui.screens.approval import ApprovalScreen
from dsv.tui.screens.fork_picker import ForkPickerScreen
from dsv.tui.screens.help import HelpScreen
from dsv.tui.screens.session_picker import SessionPickerScreen
from dsv.tui.screens.tools import ToolsScreen
from dsv.tui.tools import APPROVAL_MODES
from dsv.tui.widgets import (
    CommandHints,
    ContextPanel,
    SlashCommand,
    StatusHeader,
    Transcript,
    context_view,
    describe_error,
    usage_line,
)
from dsv.tui.widgets.prompt_input import PromptInput
from dsv.tui.widgets.status_header import endpoint_label

if TYPE_CHECKING:
    from dsv.tui.app import ChatApp

RETRY_KEY = "F5"
PROBE_TIMEOUT_S = 10.0

SLASH_COMMANDS = [
    SlashCommand("think", "[on|off]", "thinking mode on/off (toggles without an argument)", "ctrl+t"),
    SlashCommand("model", "NAME", "the model the endpoint should use"),
    SlashCommand("endpoint", "URL", "talk to another OpenAI-compatible endpoint"),
    SlashCommand("system", "[TEXT]", "set the system prompt (no text: clear it)"),
    SlashCommand("tools", "", "the tools, their approval and the approval mode"),
    SlashCommand("approval", "ask|auto-read-only|auto-all", "when a tool call needs your approval"),
    SlashCommand("new", "", "start a new session", "ctrl+n"),
    SlashCommand("resume", "[ID]", "pick a saved session (or open ID)", "ctrl+r"),
    SlashCommand("fork", "[TURN]", "branch a new session before an earlier message", "ctrl+f"),
    SlashCommand("save", "", "save the session now (it is saved after every step anyway)", "ctrl+s"),
    SlashCommand("export", "[PATH]", "write the session as Markdown", "ctrl+e"),
    SlashCommand("help", "", "commands and keys", "f1"),
]


class ChatScreen(Screen[None]):
    """The conversation with the agent (``self.app.agent``) and its session."""

    CSS_PATH = "chat.tcss"
    # priority: the chat's keys win over whatever widget has focus
    BINDINGS = [
        Binding("ctrl+t", "toggle_thinking", "Thinking", priority=True),
        Binding("ctrl+k", "toggle_context", "Context", priority=True,
                tooltip="show/hide the context panel: what the next request sends"),
        Binding("ctrl+n", "new_session", "New", priority=True),
        Binding("ctrl+r", "resume", "Resume", priority=True),
        Binding("ctrl+f", "fork", "Fork", priority=True),
        Binding("ctrl+s", "save", "Save", show=False, priority=True),
        Binding("ctrl+e", "export", "Export", priority=True),
        Binding("escape", "stop", "Stop", priority=True, tooltip="stop the stream or the running tool"),
        Binding("f5", "retry", "Retry", priority=True, tooltip="retry the failed turn (or reach the endpoint again)"),
        Binding("f1", "help", "Help", priority=True),
    ]

    app: ChatApp

    def __init__(self) -> None:
        super().__init__()
        self.turn_worker: Worker[None] | None = None
        self.probe_error: str | None = None
        self.history_pos: int | None = None
        self.retryable = False
        self.retry_not_before = 0.0  # monotonic time: a rate limit's Retry-After
        self.last_error: AgentError | None = None

    # -- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusHeader(id="status")
        with Horizontal(id="main"):
            yield Transcript(fmt=self.app.format_seconds, id="transcript")
            yield ContextPanel(id="context")
        yield CommandHints(SLASH_COMMANDS, id="hints")
        yield PromptInput(placeholder="Ask, or / for commands  (enter: send, ctrl+j: new line, esc: stop)", id="prompt")
        yield Footer()

    @property
    def header(self) -> StatusHeader:
        return self.query_one(StatusHeader)

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def context_panel(self) -> ContextPanel:
        return self.query_one(ContextPanel)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    @property
    def busy(self) -> bool:
        """A turn is running (its worker has not ended)."""
        return self.turn_worker is not None and not self.turn_worker.is_finished

    async def on_mount(self) -> None:
        self.context_panel.display = self.app.show_context
        await self._redraw_session()
        self.prompt.focus()
        self.probe_endpoint()

    @work(exclusive=True, group="probe")
    async def probe_endpoint(self) -> None:
        """Connecting, then ready or why the endpoint cannot be used, before the first message
        (asks for the model list: every OpenAI-compatible server answers it)."""
        header = self.header
        client = self.app.agent.client
        header.state, header.detail = "connecting", endpoint_label(client.base_url)
        self.probe_error = None
        try:
            await asyncio.wait_for(client.list_models(), PROBE_TIMEOUT_S)
        except (ClientError, TimeoutError) as exc:
            if isinstance(exc, ClientError):
                self.probe_error = describe_error(exc.kind, exc.message, exc.retry_after_s)
            else:
                self.probe_error = f"no answer from {client.base_url} in {PROBE_TIMEOUT_S:g} s"
            if not self.busy:
                header.state, header.detail = "error", self.probe_error
            return
        if not self.busy and header.state == "connecting":
            header.state, header.detail = "idle", ""

    async def _redraw_session(self) -> None:
        session = self.app.agent.session
        await self.transcript.load(session.messages, session.turn_stats)
        if not session.messages:
            await self.transcript.mount(Static(self._welcome(), classes="welcome"))
        self._refresh_header()
        self.header.last_turn = self._last_turn_line(session)
        self.refresh_context()

    def _welcome(self) -> Text:
        """What an empty session shows: the tools, the approval mode, where to look."""
        agent = self.app.agent
        names = agent.tools.names()
        text = Text()
        text.append("dsv chat", style="bold")
        text.append(": the model thinks, calls tools, thinks again, then answers.\n\n")
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        text.append(f"{len(names)} tools: {shown}\n")
        text.append(f"approval: {agent.policy.mode}  (/approval, /tools)\n\n")
        text.append("ctrl+k shows exactly what the next request sends: this turn's reasoning is kept "
                    "across tool calls, and dropped once you send the next message.\n", style="italic")  # fmt: skip
        text.append("/ for commands · F1 help · ctrl+q quit", style="dim")
        return text

    def _refresh_header(self) -> None:
        agent = self.app.agent
        header = self.header
        header.model = agent.client.model or agent.session.model
        header.endpoint = agent.client.base_url
        header.thinking = agent.session.thinking
        header.session_label = self.app.session_label(agent.session)
        header.retry_key = RETRY_KEY

    def _last_turn_line(self, session: Any) -> str:
        if not session.turn_stats:
            return ""
        stats = session.turn_stats[-1]
        usage = stats.get("usage")
        usage = Usage(**usage) if isinstance(usage, dict) else None
        return usage_line(usage, stats.get("latency_s"), self.app.format_seconds)

    # -- the context panel ---------------------------------------------------------------------

    @work(exclusive=True, group="context")
    async def refresh_context(self, request: list[dict[str, Any]] | None = None) -> None:
        """Redraw the panel from ``request`` (what was just sent) or what the next request would send."""
        agent = self.app.agent
        history = list(agent.session.messages)
        if request is None:
            request = agent.next_request_messages()
        dropped_at = [
            j for j, m in enumerate(history) if m.get("role") == "assistant" and m.get("reasoning_content")
        ]
        # Each dropped reasoning is counted as the growth of the prompt by one more assistant turn that
        # carries it as reasoning (thinking mode refuses a trailing assistant turn without any).
        extra = [{"role": "assistant", "content": "", "reasoning_content": history[j]["reasoning_content"]}
                 for j in dropped_at]  # fmt: skip
        # count_tokens may ask the endpoint's tokenizer over HTTP: off the event loop
        counts = await asyncio.to_thread(agent.count_tokens, request + extra)
        view = context_view(
            request,
            history,
            counts[: len(request)],
            exact=bool(getattr(counts, "exact", False)),
            dropped_tokens=dict(zip(dropped_at, counts[len(request) :], strict=True)),
            tool_count=len(agent.tools.names()),
        )
        self.header.context_tokens = view.total_tokens
        self.header.context_exact = view.exact
        await self.context_panel.show(view)

    # -- sending -------------------------------------------------------------------------------

    @on(PromptInput.Changed, "#prompt")
    def _typed(self, event: PromptInput.Changed) -> None:
        self.query_one(CommandHints).filter(event.text_area.text)

    def on_history_requested(self, message: HistoryRequested) -> None:
        """Up/down at the prompt's edges: the session's earlier messages, as in a shell."""
        delta = message.delta
        sent = [str(m.get("content") or "") for m in self.app.agent.session.messages if m.get("role") == "user"]
        if not sent:
            return
        pos = len(sent) if self.history_pos is None else self.history_pos
        pos = max(0, pos + delta)
        if pos >= len(sent):
            self.history_pos, self.prompt.value = None, ""
            return
        self.history_pos = pos
        self.prompt.value = sent[pos]

    async def on_prompt_submitted(self, event: PromptSubmitted) -> None:
        self.history_pos = None
        text = event.text.strip()
        if not text:
            return
        if text.startswith("/"):
            self.prompt.value = ""
            await self.run_slash(text)
            return
        if self.busy:
            self.notify("The agent is still working: esc stops it.", severity="warning")
            return
        self.prompt.value = ""
        await self.send(text)

    async def send(self, text: str) -> None:
        """Send a user message: earlier reasoning moves to dropped, and a turn starts."""
        await self.transcript.add_user(text, message_index=len(self.app.agent.session.messages))
        self.turn_worker = self._run_turn(text)

    @work(exclusive=True, group="turn")
    async def _run_turn(self, text: str | None) -> None:
        """Run one turn (``text``) or retry the failed one (``None``), drawing every event."""
        agent = self.app.agent
        self.retryable = False
        self.last_error = None
        ok = False
        try:
            # the server asked for this much patience (Retry-After): count it down, then send
            while text is None and (wait := self.retry_not_before - time.monotonic()) > 0:
                self.header.state, self.header.detail = "waiting", f"rate limited: retrying in {math.ceil(wait)} s"
                await asyncio.sleep(min(wait, 1.0))
            events = agent.run_turn(text, self._approve) if text is not None else agent.retry_turn(self._approve)
            async for event in events:
                await self.draw(event)
                if isinstance(event, TurnFinished):
                    ok = True
        except Exception as exc:  # a bug here must not take the shell down; the agent saved the session
            self.log.error(f"turn failed: {exc!r}")
            await self.draw(AgentError("internal", f"{type(exc).__name__}: {exc}"))  # type: ignore[arg-type]
        finally:
            self.post_message(TurnEnded(ok=ok))

    async def draw(self, event: Any) -> None:
        """Show one agent event."""
        t = self.transcript
        header = self.header
        if isinstance(event, Status):
            header.state = event.state
            header.detail = event.detail
        elif isinstance(event, TurnStarted):
            self._refresh_header()
            self.refresh_context(event.request_messages)
        elif isinstance(event, ReasoningDelta):
            await t.on_reasoning(event.step, event.text)
        elif isinstance(event, ContentDelta):
            await t.on_content(event.step, event.text)
        elif isinstance(event, ToolCallStarted):
            await t.on_tool_started(event.call_id, event.name, event.arguments)
        elif isinstance(event, ApprovalNeeded):
            card = t.tool_card(event.call_id)
            if card is not None:
                card.status = "approval"
        elif isinstance(event, ToolCallFinished):
            card = t.tool_card(event.call_id)
            if card is not None:
                card.finish(ok=event.ok, result=event.result, duration_s=event.duration_s, truncated=event.truncated)
        elif isinstance(event, StepFinished):
            reasoning = event.usage.reasoning_tokens if event.usage is not None else None
            await t.finish_step(event.step, reasoning_tokens=reasoning, latency_s=event.latency_s)
        elif isinstance(event, TurnFinished):
            line = usage_line(event.usage, event.latency_s, self.app.format_seconds)
            await t.finish_turn(line)
            header.last_turn = line
        elif isinstance(event, AgentError):
            self.last_error = event
            self.retryable = event.retryable
            if event.retry_after_s:
                self.retry_not_before = time.monotonic() + event.retry_after_s
            await t.add_error(
                kind=event.kind,
                message=event.message,
                retry_after_s=event.retry_after_s,
                retryable=event.retryable,
                retry_key=RETRY_KEY,
            )
            header.state = "error"
            header.detail = event.message if event.kind != "cancelled" else "stopped"

    async def _approve(self, request: ApprovalNeeded) -> Any:
        """The agent's approval callback: the modal's answer ("once", "always", "deny" or edited)."""
        card = self.transcript.tool_card(request.call_id)
        if card is not None:
            card.status = "approval"
        previous = self.header.state
        self.header.state = "approval"
        self.header.detail = request.name
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.app.push_screen(
            ApprovalScreen(name=request.name, arguments=request.arguments, preview=request.preview),
            callback=lambda result: answer.done() or answer.set_result(result),
        )
        result = await answer
        self.header.state = previous
        if card is not None:
            if result == "deny":
                card.status = "denied"
            else:
                card.status = "running"
                edited = getattr(result, "arguments", None)
                if edited is not None:
                    card.set_arguments(json.dumps(edited, ensure_ascii=False))
        return result

    def on_turn_ended(self, message: TurnEnded) -> None:
        self._refresh_header()
        self.refresh_context()
        if not message.ok and self.header.state not in ("error",):
            self.header.state = "idle"
        self.prompt.focus()

    # -- actions (keys, palette, slash commands) -----------------------------------------------

    def action_toggle_thinking(self) -> None:
        self.set_thinking(not self.app.agent.session.thinking)

    def set_thinking(self, on: bool) -> None:
        session = self.app.agent.session
        session.thinking = on
        self._save_quietly()
        self.header.thinking = on
        self.notify(f"thinking {'on' if on else 'off'}")
        self.refresh_context()

    def action_toggle_context(self) -> None:
        panel = self.context_panel
        panel.display = not panel.display
        self.app.show_context = panel.display
        if panel.display:
            self.refresh_context()

    async def action_new_session(self) -> None:
        if self._refuse_while_busy("/new"):
            return
        agent = self.app.agent
        old = agent.session
        session = self.app.store.new(endpoint=agent.client.base_url, model=agent.client.model,
                                     thinking=old.thinking, system=old.system)  # fmt: skip
        self.post_message(SessionSwitched(session))

    def action_resume(self) -> None:
        if self._refuse_while_busy("/resume"):
            return
        # unreadable files are listed too (greyed out, with the reason), not silently left out
        self.app.push_screen(
            SessionPickerScreen(self.app.store.list(), current_id=self.app.agent.session.id),
            callback=self._resume_chosen,
        )

    def _resume_chosen(self, session_id: str | None) -> None:
        if session_id:
            self.resume(session_id)

    def resume(self, session_id: str) -> None:
        try:
            session = self.app.store.load(session_id)
        except Exception as exc:  # a SessionError says which file and why
            self.notify(str(exc), severity="error", timeout=8)
            return
        self.post_message(SessionSwitched(session))

    def action_fork(self) -> None:
        if self._refuse_while_busy("/fork"):
            return
        self.app.push_screen(ForkPickerScreen(self.app.agent.session.messages), callback=self._fork_chosen)

    def _fork_chosen(self, index: int | None) -> None:
        if index is not None:
            self.fork(index)

    def fork(self, index: int) -> None:
        """Branch a new session before message ``index``; that message's text goes back to the prompt."""
        session = self.app.agent.session
        text = str(session.messages[index].get("content") or "") if index < len(session.messages) else ""
        forked = session.fork(index)
        forked.save()
        self.post_message(SessionSwitched(forked, prompt_text=text))

    async def on_session_switched(self, message: SessionSwitched) -> None:
        agent = self.app.agent
        agent.session = message.session
        self.retryable = False
        self.header.state = "idle"
        self.header.detail = ""
        await self._redraw_session()
        self.prompt.value = message.prompt_text
        self.prompt.focus()
        self.notify(f"session {self.app.session_label(message.session)}")

    def action_save(self) -> None:
        path = self.app.agent.session.save()
        self.notify(f"saved {path}")

    def action_export(self, path: str | None = None) -> None:
        from dsv.synth.eval._io import atomic_write_text

        session = self.app.agent.session
        target = Path(path).expanduser() if path else self.app.export_dir / f"dsv-chat-{session.id}.md"
        try:
            atomic_write_text(target, session.to_markdown())
        except OSError as exc:
            self.notify(f"cannot write {target}: {exc.strerror}; give another path: /export PATH", severity="error")
            return
        self.notify(f"exported {target}")

    def action_stop(self) -> None:
        if not self.busy:
            return
        if self.app.agent.running:
            self.app.agent.cancel()
            self.header.detail = "stopping"
        elif self.turn_worker is not None:  # still waiting out a Retry-After: nothing was sent
            self.turn_worker.cancel()
            self.header.state, self.header.detail = "idle", ""

    def action_retry(self) -> None:
        if not self.busy and not self.retryable and self.probe_error and self.last_error is None:
            self.probe_endpoint()  # nothing was sent yet: try the endpoint again
            return
        if self.busy or not self.retryable:
            self.notify("Nothing to retry.", severity="warning")
            return
        self.transcript.new_attempt()
        self.turn_worker = self._run_turn(None)

    def action_help(self) -> None:
        # the keys no slash command lists already
        listed = {c.key for c in SLASH_COMMANDS if c.key}
        keys = [(b.key, b.tooltip or b.description) for b in self.BINDINGS
                if isinstance(b, Binding) and b.key not in listed]  # fmt: skip
        keys += [("up / down", "earlier messages in the prompt"), ("ctrl+j", "a new line in the prompt"),
                 ("ctrl+p", "command palette: every command"), ("ctrl+q", "quit")]  # fmt: skip
        self.app.push_screen(HelpScreen(SLASH_COMMANDS, keys))

    def action_tools(self) -> None:
        self.app.push_screen(ToolsScreen(self.app.agent.tools, self.app.agent.policy))

    # -- slash commands ------------------------------------------------------------------------

    async def run_slash(self, line: str) -> None:
        """Run ``/name args``; an unknown or malformed command says what is accepted."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        agent = self.app.agent
        if name == "think":
            if arg not in ("", "on", "off"):
                self.notify("usage: /think [on|off]", severity="error")
                return
            self.set_thinking(not agent.session.thinking if not arg else arg == "on")
        elif name == "model":
            if not arg:
                self.notify(f"model: {agent.client.model}  (change: /model NAME)")
                return
            if self._refuse_while_busy("/model"):
                return
            await self.app.set_client(model=arg)
            self._refresh_header()
            self.notify(f"model {arg}")
        elif name == "endpoint":
            if not arg:
                self.notify(f"endpoint: {agent.client.base_url}  (change: /endpoint URL)")
                return
            if not arg.startswith(("http://", "https://")):
                self.notify(f"/endpoint needs an http(s) URL such as http://127.0.0.1:8000/v1, not {arg!r}",
                            severity="error")  # fmt: skip
                return
            if self._refuse_while_busy("/endpoint"):
                return
            await self.app.set_client(base_url=arg)
            self._refresh_header()
            self.probe_endpoint()
            self.notify(f"endpoint {arg}")
        elif name == "system":
            agent.session.system = arg or None
            self._save_quietly()
            self.notify("system prompt set" if arg else "system prompt cleared")
            self.refresh_context()
        elif name == "tools":
            self.action_tools()
        elif name == "approval":
            if arg not in APPROVAL_MODES:
                self.notify(f"usage: /approval {'|'.join(APPROVAL_MODES)}", severity="error")
                return
            agent.policy.mode = arg
            self.notify(f"approval: {arg}")
        elif name == "new":
            await self.action_new_session()
        elif name == "resume":
            if arg:
                if not self._refuse_while_busy("/resume"):
                    self.resume(arg)
            else:
                self.action_resume()
        elif name == "fork":
            if not arg:
                self.action_fork()
                return
            turns = [i for i, m in enumerate(agent.session.messages) if m.get("role") == "user"]
            if not arg.isdigit() or not 1 <= int(arg) <= len(turns):
                self.notify(f"usage: /fork TURN with TURN from 1 to {len(turns)}", severity="error")
                return
            if not self._refuse_while_busy("/fork"):
                self.fork(turns[int(arg) - 1])
        elif name == "save":
            self.action_save()
        elif name == "export":
            self.action_export(shlex.split(arg)[0] if arg else None)
        elif name == "help":
            self.action_help()
        else:
            known = " ".join(f"/{c.name}" for c in SLASH_COMMANDS)
            self.notify(f"unknown command /{name}; known: {known}", severity="error", timeout=8)

    def _refuse_while_busy(self, what: str) -> bool:
        if self.busy:
            self.notify(f"{what} waits until the turn ends (esc stops it)", severity="warning")
            return True
        return False

    def _save_quietly(self) -> None:
        # settings changes are saved too, so a restart resumes with them; an empty session stays unsaved
        session = self.app.agent.session
        if session.messages:
            session.save()

