"""dsv.tui: ``dsv chat``, an agent shell whose model thinks with tools.

The agent core (no Textual) is usable on its own::

    from dsv.tui import Agent, ApprovalPolicy, ChatClient, SessionStore, ToolRegistry

    store = SessionStore()
    agent = Agent(ChatClient("http://127.0.0.1:8000/v1", None, "tiny"), ToolRegistry("."),
                  ApprovalPolicy("auto-read-only"), store.new())
    async for event in agent.run_turn("List the files here", approve):
        ...

- `dsv.tui.events`: what a turn yields (deltas, tool calls, approvals, usage, errors, states).
- `dsv.tui.agent`: the loop, with DeepSeek-V3.2's thinking-with-tools rule from `dsv.core.chat`.
- `dsv.tui.client`: the streaming endpoint client (official ``openai``), errors as kinds.
- `dsv.tui.tools` / `dsv.tui.mcp_tools`: built-in, user and MCP tools; approval modes.
- `dsv.tui.session`: sessions saved atomically after every step; fork, Markdown export.
- `dsv.tui.local_serve`: a local ``dsv serve`` for ``--serve`` and the embedded tiny model.
- `dsv.tui.app`: the Textual app (``ChatApp``); `dsv.tui.cli`: the ``dsv chat`` command.

Names resolve lazily: importing the package loads neither Textual nor the openai client.
"""

from __future__ import annotations

from dsv.core.lazy import lazy_exports

__all__ = [
    "Agent",
    "AgentError",
    "ApprovalNeeded",
    "ApprovalPolicy",
    "ChatApp",
    "ChatClient",
    "ContentDelta",
    "EditedArguments",
    "LocalServer",
    "ReasoningDelta",
    "Session",
    "SessionStore",
    "Status",
    "StepFinished",
    "Tool",
    "ToolCallFinished",
    "ToolCallStarted",
    "ToolRegistry",
    "ToolResult",
    "TurnFinished",
    "TurnStarted",
    "Usage",
]

_LAZY = {
    "Agent": "dsv.tui.agent",
    "ChatApp": "dsv.tui.app",
    "ChatClient": "dsv.tui.client",
    "LocalServer": "dsv.tui.local_serve",
    "Session": "dsv.tui.session",
    "SessionStore": "dsv.tui.session",
    **{name: "dsv.tui.events" for name in ("AgentError", "ApprovalNeeded", "ContentDelta", "ReasoningDelta",
                                            "Status", "StepFinished", "ToolCallFinished", "ToolCallStarted",
                                            "TurnFinished", "TurnStarted", "Usage")},
    **{name: "dsv.tui.tools" for name in ("ApprovalPolicy", "EditedArguments", "Tool", "ToolRegistry", "ToolResult")},
}  # fmt: skip

__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
