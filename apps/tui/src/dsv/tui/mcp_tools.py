"""Tools from MCP servers over stdio, through the official ``mcp`` SDK's client.

`McpServer(command).start()` launches the server as a child process, runs the MCP handshake, lists
its tools and returns them as `dsv.tui.tools.Tool` objects whose ``run`` calls the server. The
SDK's transports are anyio context managers that must be entered and left by the same task, so one
background task owns the connection for its whole life; calls from any task of the same event
loop go through the shared `ClientSession`, and `close()` asks the owner task to leave.

A tool is read-only when the server says so (``annotations.readOnlyHint``); everything else asks
for approval under ``auto-read-only``. The server's stderr goes to a log file in the user's log
folder (``mcp-<name>.log``), not to the terminal the UI draws on.

Works with mcp 1.x and 2.x (field names differ: ``inputSchema``/``input_schema``, ``isError``/
``is_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Any

from dsv.core.errors import DSVError
from dsv.tui.tools import Tool, ToolFailure

__all__ = ["McpServer"]


def _field(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return default


def _log_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_log_dir("dsv"))


class McpServer:
    """One MCP server process and its client session (see the module docstring)."""

    def __init__(
        self, command: list[str], *, cwd: Path | None = None, startup_timeout_s: float = 30.0
    ) -> None:
        if not command:
            raise DSVError("--mcp needs a command, e.g. --mcp 'python my_server.py'")
        self.command = list(command)
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self.name = re.sub(
            r"[^A-Za-z0-9_-]", "_", Path(command[-1]).stem if len(command) > 1 else Path(command[0]).name
        )
        self.session: Any = None
        self.tools: list[Tool] = []
        self.log_path = _log_dir() / f"mcp-{self.name}.log"
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> list[Tool]:
        """Launch, handshake and list the tools; `DSVError` with the reason if that fails."""
        self._task = asyncio.create_task(self._own(), name=f"mcp-{self.name}")
        try:
            await asyncio.wait_for(self._ready.wait(), self.startup_timeout_s)
        except TimeoutError:
            await self.close()
            raise DSVError(
                f"MCP server `{' '.join(self.command)}` did not answer within {self.startup_timeout_s:g} s "
                f"(its log: {self.log_path})"
            ) from None
        if self._error is not None:
            await self.close()
            raise DSVError(
                f"MCP server `{' '.join(self.command)}` failed to start: {_describe(self._error)} (its log: {self.log_path})"
            )
        return self.tools

    async def _own(self) -> None:
        from mcp import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(command=self.command[0], args=self.command[1:], cwd=self.cwd)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_path, "a", encoding="utf-8") as errlog:
                async with (
                    stdio_client(params, errlog=errlog) as (read, write),
                    ClientSession(read, write) as session,
                ):
                    init = await session.initialize()
                    info = _field(init, "server_info", "serverInfo")
                    if info is not None and getattr(info, "name", None):
                        self.name = re.sub(r"[^A-Za-z0-9_-]", "_", info.name)[:32]
                    listed = await session.list_tools()
                    self.session = session
                    self.tools = [self._tool(t) for t in listed.tools]
                    self._ready.set()
                    await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.session = None
            self._ready.set()

    def _tool(self, spec: Any) -> Tool:
        name = spec.name
        annotations = _field(spec, "annotations")
        read_only = (
            bool(_field(annotations, "read_only_hint", "readOnlyHint", default=False))
            if annotations
            else False
        )
        schema = _field(spec, "input_schema", "inputSchema", default=None) or {
            "type": "object",
            "properties": {},
        }

        async def run(args: dict[str, Any]) -> str:
            return await self.call(name, args)

        return Tool(
            name=name[:64],
            description=_field(spec, "description", default="") or "",
            parameters=dict(schema),
            read_only=read_only,
            source="mcp",
            run=run,
            validate=False,
        )

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Call a tool of this server; its text content, or `ToolFailure` when it reports an error."""
        session = self.session
        if session is None:
            raise ToolFailure(
                f"MCP server {self.name} is not connected ({_describe(self._error) or 'stopped'})"
            )
        result = await session.call_tool(name, arguments)
        parts: list[str] = []
        for item in _field(result, "content", default=[]) or []:
            text = getattr(item, "text", None)
            parts.append(text if text is not None else f"[{getattr(item, 'type', 'content')} content]")
        structured = _field(result, "structured_content", "structuredContent")
        if not parts and structured is not None:
            parts.append(str(structured))
        text = "\n".join(parts) or "(no content)"
        if _field(result, "is_error", "isError", default=False):
            raise ToolFailure(text)
        return text

    async def close(self) -> None:
        """Leave the session and stop the server process."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), 5.0)
        except (TimeoutError, Exception):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    # anyio wraps failures of the transport's task group; the first leaf says what happened.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
