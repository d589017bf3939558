"""The tools `dsv chat` offers the model, and the policy that decides which calls need the user's word.

Built-ins (all paths are relative to one workspace folder; a path that resolves outside it, through
``..``, an absolute path or a symlink, is refused):

- ``python``: runs code in `dsv.synth.sandbox` (its own empty workdir, limits on time, memory, files
  and disk, no network). Read-only when the sandbox has its private filesystem view (root hosts);
  otherwise the code could touch the user's files, so it asks like ``shell`` does.
- ``read_file``, ``list_files``, ``search_files``: read-only.
- ``write_file``, ``edit_file``: the approval preview is the unified diff of the change; writes are
  atomic.
- ``shell``: ``bash -c`` in the workspace, in its own process group (killed whole on timeout or
  cancel), output capped.

User tools come from a Python file (`ToolRegistry.load_user_file`): its public functions, or the
list named ``TOOLS`` in it, described by `dsv.synth.tools.tool_schema` (type hints + docstring);
``READ_ONLY = {"name", ...}`` or a function attribute ``read_only = True`` marks the ones that need no
approval. Tools of MCP servers (stdio) come through `dsv.tui.mcp_tools`.

`ToolRegistry.call` never raises for what a tool did: bad arguments, an exception, a timeout
(``timeout_s``, default 60 s) all come back as a failed `ToolResult` with a message the model can
act on, and output over ``max_result_chars`` is cut (head and tail kept) with a note saying so.
Synchronous user tools run in a daemon thread: a timed-out one is abandoned, not killed (Python
cannot kill a thread), so the turn goes on while it finishes in the background.

Approval modes (`ApprovalPolicy`): ``ask`` (every call), ``auto-read-only`` (calls of read-only tools
run; others ask), ``auto-all`` (nothing asks); "always allow this tool" adds a name to
``always_allowed`` for the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import fnmatch
import importlib.util
import inspect
import json
import os
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsv.core.errors import DSVError
from dsv.synth.eval._io import atomic_write_text
from dsv.synth.tools import ToolArgumentError, tool_schema, validate_arguments

__all__ = [
    "Approval",
    "ApprovalMode",
    "ApprovalPolicy",
    "EditedArguments",
    "Tool",
    "ToolFailure",
    "ToolRegistry",
    "ToolResult",
    "truncate",
]

ApprovalMode = Literal["ask", "auto-read-only", "auto-all"]
APPROVAL_MODES: tuple[str, ...] = ("ask", "auto-read-only", "auto-all")
_SKIP_DIRS = frozenset({".git", "__pycache__", ".venv", "node_modules", ".mypy_cache", ".ruff_cache"})
_MAX_LIST = 1000
_MAX_MATCHES = 200


class ToolFailure(Exception):
    """Raised inside a tool to return a failed result with this message (not a crash)."""


@dataclass
class EditedArguments:
    """The user's answer to an approval: run the call, but with these arguments."""

    arguments: dict[str, Any]


Approval = Literal["once", "always", "deny"] | EditedArguments


@dataclass
class ToolResult:
    ok: bool
    content: str
    duration_s: float = 0.0
    truncated: bool = False


@dataclass
class Tool:
    """A callable the model may use. `run` takes validated arguments and returns the result text
    (or raises `ToolFailure`); `preview` renders what the approval dialog shows."""

    name: str
    description: str
    parameters: dict[str, Any]
    read_only: bool
    source: Literal["builtin", "user", "mcp"]
    run: Callable[[dict[str, Any]], Awaitable[str]] = field(repr=False)
    preview: Callable[[dict[str, Any]], str] | None = field(default=None, repr=False)
    validate: bool = True  # check arguments against `parameters` before `run` (MCP servers check their own)

    def schema(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:  # left out when empty, as OpenAI's own schemas do
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass
class ApprovalPolicy:
    """Which calls wait for the user (see the module docstring)."""

    mode: ApprovalMode = "auto-read-only"
    always_allowed: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.mode not in APPROVAL_MODES:
            raise DSVError(f"unknown approval mode `{self.mode}`; use one of {', '.join(APPROVAL_MODES)}")

    def needs_approval(self, tool: Tool) -> bool:
        if self.mode == "auto-all" or tool.name in self.always_allowed:
            return False
        if self.mode == "auto-read-only":
            return not tool.read_only
        return True


def truncate(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to about ``limit`` characters (three quarters head, a quarter tail) with a note."""
    if len(text) <= limit:
        return text, False
    head = limit * 3 // 4
    tail = limit - head
    cut = len(text) - head - tail
    note = (
        f"\n\n[... {cut} characters cut: the output was {len(text)} characters and only {limit} are kept; "
        "ask for a smaller part (a line range, a narrower search, less output) ...]\n\n"
    )
    return text[:head] + note + text[-tail:], True


async def run_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a daemon thread, awaited: a call that never returns cannot block the exit
    of the process (``asyncio.to_thread``'s pool threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    def target() -> None:
        try:
            value = fn(*args)
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(settle, None, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=target, name=f"dsv-tool-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await fut


def _obj(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


def unified_diff(path: str, old: str, new: str) -> str:
    """The change from ``old`` to ``new`` as a unified diff with ``a/`` and ``b/`` paths."""
    diff = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile=f"a/{path}" if old else "/dev/null",
        tofile=f"b/{path}",
    )
    text = "".join(
        line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in diff
    )
    return text or f"(no change to {path})\n"


class ToolRegistry:
    """The tools of one chat: built-ins on ``workspace``, user tools, MCP servers."""

    def __init__(
        self,
        workspace: Path | str | None = None,
        *,
        timeout_s: float = 60.0,
        max_result_chars: int = 16_000,
        builtins: bool = True,
        sandbox_limits: Any = None,
    ) -> None:
        self.workspace = Path(workspace or Path.cwd()).resolve()
        if not self.workspace.is_dir():
            raise DSVError(
                f"workspace {self.workspace} is not a folder; pass --workspace with an existing folder"
            )
        self.timeout_s = timeout_s
        self.max_result_chars = max_result_chars
        self.sandbox_limits = sandbox_limits
        self._tools: dict[str, Tool] = {}
        self._pending_mcp: list[list[str]] = []
        self.mcp_servers: list[Any] = []  # dsv.tui.mcp_tools.McpServer, connected
        if builtins:
            for tool in self._builtins():
                self.register(tool)

    # ------------------------------------------------------------------ registry
    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise DSVError(
                f"two tools are named `{tool.name}` ({self._tools[tool.name].source} and {tool.source})"
            )
        self._tools[tool.name] = tool

    def names(self) -> list[str]:
        return list(self._tools)

    def tools(self) -> list[Tool]:
        return list(self._tools.values())

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise KeyError(f"no tool named `{name}`; the tools are: {', '.join(self._tools)}") from None

    def schemas(self) -> list[dict[str, Any]]:
        """The ``tools`` list a request sends."""
        return [t.schema() for t in self._tools.values()]

    def preview(self, name: str, arguments: dict[str, Any]) -> str:
        """What the approval dialog shows for this call: a diff, a command, code, or the arguments."""
        tool = self.get(name)
        if tool.preview is not None:
            try:
                return tool.preview(arguments)
            except (ToolFailure, OSError, KeyError, TypeError, ValueError) as exc:
                return f"(no preview: {exc})\n{json.dumps(arguments, indent=2, ensure_ascii=False)}"
        return json.dumps(arguments, indent=2, ensure_ascii=False)

    async def call(self, name: str, arguments: dict[str, Any] | str) -> ToolResult:
        """Run one call; failures of any kind come back as ``ToolResult(ok=False)``."""
        start = time.monotonic()

        def done(ok: bool, text: str) -> ToolResult:
            text, cut = truncate(text, self.max_result_chars)
            return ToolResult(ok, text, time.monotonic() - start, cut)

        tool = self._tools.get(name)
        if tool is None:
            return done(False, f"error: no tool named `{name}`; the tools are: {', '.join(self._tools)}")
        try:
            args = validate_arguments(tool.schema(), arguments) if tool.validate else _as_dict(arguments)
        except (ToolArgumentError, ValueError) as exc:
            return done(False, f"error: bad arguments for `{name}`: {exc}")
        try:
            text = await asyncio.wait_for(tool.run(args), self.timeout_s)
        except TimeoutError:
            return done(False, f"error: `{name}` ran longer than {self.timeout_s:g} s and was stopped")
        except ToolFailure as exc:
            return done(False, f"error: {exc}")
        except Exception as exc:  # a tool's bug is the model's information, not the shell's crash
            return done(False, f"error: `{name}` raised {type(exc).__name__}: {exc}")
        return done(True, text)

    # ------------------------------------------------------------------ user tools and MCP
    def load_user_file(self, path: Path | str) -> list[Tool]:
        """Register the tools defined in a Python file (see the module docstring); returns them."""
        path = Path(path)
        if not path.is_file():
            raise DSVError(f"tools file {path} does not exist; pass --tools-file with a .py file")
        mod_name = f"dsv_user_tools_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise DSVError(f"tools file {path} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise DSVError(f"tools file {path} failed to load: {type(exc).__name__}: {exc}") from None
        fns = getattr(module, "TOOLS", None)
        if fns is None:
            fns = [
                obj
                for n, obj in vars(module).items()
                if inspect.isfunction(obj) and obj.__module__ == mod_name and not n.startswith("_")
            ]
        read_only = set(getattr(module, "READ_ONLY", ()) or ())
        added = []
        for fn in fns:
            try:
                schema = tool_schema(fn)["function"]
            except (TypeError, ValueError) as exc:
                raise DSVError(f"tools file {path}: cannot describe `{fn.__name__}`: {exc}") from None
            tool = Tool(
                name=schema["name"],
                description=schema.get("description", ""),
                parameters=schema["parameters"],
                read_only=fn.__name__ in read_only or bool(getattr(fn, "read_only", False)),
                source="user",
                run=_user_runner(fn),
            )
            self.register(tool)
            added.append(tool)
        if not added:
            raise DSVError(f"tools file {path} defines no public functions (or an empty TOOLS list)")
        return added

    async def add_mcp_server(self, command: list[str], *, cwd: Path | None = None) -> list[Tool]:
        """Start an MCP server over stdio, register its tools and return them (stays connected
        until `aclose`). Must run on the event loop that will call the tools."""
        from dsv.tui.mcp_tools import McpServer

        server = McpServer(command, cwd=cwd or self.workspace)
        tools = await server.start()
        taken = set(self._tools)
        for tool in tools:
            if tool.name in taken:  # two servers (or a built-in) with the same name: keep both, prefixed
                tool.name = f"{server.name}_{tool.name}"[:64]
            self.register(tool)
        self.mcp_servers.append(server)
        return tools

    def add_mcp_server_later(self, command: list[str]) -> None:
        """Remember an MCP server to start on the first `start()` (on the loop that runs the turns)."""
        self._pending_mcp.append(list(command))

    async def start(self) -> None:
        """Connect the MCP servers given to `add_mcp_server_later` (idempotent)."""
        while self._pending_mcp:
            await self.add_mcp_server(self._pending_mcp.pop(0))

    async def aclose(self) -> None:
        """Stop the MCP servers."""
        servers, self.mcp_servers = self.mcp_servers, []
        for server in servers:
            await server.close()
        for name in [n for n, t in self._tools.items() if t.source == "mcp"]:
            del self._tools[name]

    # ------------------------------------------------------------------ built-ins
    def resolve(self, path: str) -> Path:
        """``path`` inside the workspace (relative to it, or absolute under it); `ToolFailure` if outside."""
        p = Path(path).expanduser()
        full = (p if p.is_absolute() else self.workspace / p).resolve()
        if full != self.workspace and self.workspace not in full.parents:
            raise ToolFailure(f"`{path}` is outside the workspace {self.workspace}; use a path inside it")
        return full

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.workspace)) if path != self.workspace else "."

    def _builtins(self) -> list[Tool]:
        from dsv.synth.sandbox import isolation_report

        confined = bool(isolation_report()["private_filesystem"])
        text = {"type": "string"}
        flag = {"type": "boolean"}
        lines = {"type": "integer"}

        def tool(name: str, description: str, props: dict[str, Any], required: list[str], read_only: bool,
                 run: Callable[[dict[str, Any]], Awaitable[str]],
                 preview: Callable[[dict[str, Any]], str] | None = None) -> Tool:  # fmt: skip
            return Tool(name, description, _obj(props, required), read_only, "builtin", run, preview)

        return [
            tool("python", "Run Python code in a sandbox (no network, an empty private folder, time, memory "
                 "and disk limits) and return what it prints.", {"code": text}, ["code"], confined,
                 self._python, lambda a: str(a.get("code", ""))),
            tool("read_file", "Read a text file of the workspace, with line numbers.",
                 {"path": text, "offset": {**lines, "description": "first line (1-based)"},
                  "limit": {**lines, "description": "how many lines"}}, ["path"], True, self._read_file),
            tool("list_files", "List files and folders of the workspace (names ending in / are folders).",
                 {"path": {**text, "description": "folder, default ."},
                  "pattern": {**text, "description": "glob on names, e.g. *.py"}, "recursive": flag},
                 [], True, self._list_files),
            tool("search_files", "Search the workspace's text files for a regular expression; returns "
                 "path:line: text.", {"pattern": text, "path": {**text, "description": "folder or file, default ."},
                                      "glob": {**text, "description": "only files whose name matches"}},
                 ["pattern"], True, self._search_files),
            tool("write_file", "Create or overwrite a file of the workspace with the given content.",
                 {"path": text, "content": text}, ["path", "content"], False, self._write_file,
                 self._write_preview),
            tool("edit_file", "Replace an exact piece of text in a workspace file (it must occur once unless "
                 "replace_all).", {"path": text, "old_text": text, "new_text": text, "replace_all": flag},
                 ["path", "old_text", "new_text"], False, self._edit_file, self._edit_preview),
            tool("shell", "Run a shell command (bash -c) in the workspace folder; returns its output and exit "
                 "code.", {"command": text}, ["command"], False, self._shell,
                 lambda a: f"$ {a.get('command', '')}\n(in {self.workspace})"),
        ]  # fmt: skip

    async def _python(self, args: dict[str, Any]) -> str:
        from dsv.synth.sandbox import run_python

        r = await run_in_thread(lambda: run_python(args["code"], limits=self.sandbox_limits))
        parts = [r.stdout.rstrip("\n")] if r.stdout else []
        if r.stderr:
            parts.append(f"[stderr]\n{r.stderr.rstrip()}")
        if not r.ok:
            raise ToolFailure(
                "\n".join([*parts, f"[sandbox: {r.status}, exit {r.returncode}, {r.wall_s:.2f} s]"])
            )
        return "\n".join(parts) or "(no output)"

    async def _read_file(self, args: dict[str, Any]) -> str:
        path = self.resolve(args["path"])
        if not path.is_file():
            raise ToolFailure(f"`{args['path']}` is not a file; list_files shows what exists")
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            raise ToolFailure(f"`{args['path']}` is a binary file ({len(data)} bytes)")
        lines = data.decode("utf-8", errors="replace").splitlines()
        offset = max(1, int(args.get("offset") or 1))
        limit = max(1, int(args.get("limit") or 2000))
        chunk = lines[offset - 1 : offset - 1 + limit]
        body = "\n".join(f"{n:6d}\t{line}" for n, line in enumerate(chunk, start=offset))
        more = len(lines) - (offset - 1 + len(chunk))
        tail = f"\n[{more} more lines; read on with offset={offset + len(chunk)}]" if more > 0 else ""
        return (body or "(empty file)") + tail

    async def _list_files(self, args: dict[str, Any]) -> str:
        root = self.resolve(args.get("path") or ".")
        if not root.is_dir():
            raise ToolFailure(f"`{args.get('path')}` is not a folder")
        pattern = args.get("pattern") or "*"
        out: list[str] = []
        if args.get("recursive"):
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
                base = Path(dirpath)
                for name in [*(d + "/" for d in dirnames), *sorted(filenames)]:
                    if fnmatch.fnmatch(name.rstrip("/"), pattern):
                        out.append(self._rel(base / name.rstrip("/")) + ("/" if name.endswith("/") else ""))
                if len(out) >= _MAX_LIST:
                    break
            out.sort()
        else:
            for entry in sorted(root.iterdir(), key=lambda p: (not p.is_dir(), p.name)):
                if fnmatch.fnmatch(entry.name, pattern):
                    out.append(self._rel(entry) + ("/" if entry.is_dir() else ""))
        if not out:
            return "(nothing matches)"
        more = (
            f"\n[stopped at {_MAX_LIST} entries; narrow the path or pattern]" if len(out) >= _MAX_LIST else ""
        )
        return "\n".join(out[:_MAX_LIST]) + more

    async def _search_files(self, args: dict[str, Any]) -> str:
        try:
            rx = re.compile(args["pattern"])
        except re.error as exc:
            raise ToolFailure(f"bad regular expression {args['pattern']!r}: {exc}") from None
        root = self.resolve(args.get("path") or ".")
        glob = args.get("glob") or "*"

        def scan() -> list[str]:
            files = [root] if root.is_file() else []
            if root.is_dir():
                for dirpath, dirnames, filenames in os.walk(root):
                    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
                    files += [Path(dirpath) / f for f in sorted(filenames) if fnmatch.fnmatch(f, glob)]
            hits: list[str] = []
            for f in files:
                try:
                    data = f.read_bytes()
                except OSError:
                    continue
                if b"\0" in data[:8192]:
                    continue
                for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
                    if rx.search(line):
                        hits.append(f"{self._rel(f)}:{n}: {line[:300]}")
                        if len(hits) >= _MAX_MATCHES:
                            return hits
            return hits

        hits = await run_in_thread(scan)
        if not hits:
            return "(no matches)"
        more = (
            f"\n[stopped at {_MAX_MATCHES} matches; narrow the pattern or path]"
            if len(hits) >= _MAX_MATCHES
            else ""
        )
        return "\n".join(hits) + more

    def _current(self, path: Path) -> str:
        if path.is_dir():
            raise ToolFailure(f"`{self._rel(path)}` is a folder")
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def _write_preview(self, args: dict[str, Any]) -> str:
        path = self.resolve(args["path"])
        return unified_diff(self._rel(path), self._current(path), args["content"])

    async def _write_file(self, args: dict[str, Any]) -> str:
        path = self.resolve(args["path"])
        diff = unified_diff(self._rel(path), self._current(path), args["content"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, args["content"])
        return f"wrote {len(args['content'].encode())} bytes to {self._rel(path)}\n{diff}"

    def _edited(self, args: dict[str, Any]) -> tuple[Path, str, str]:
        path = self.resolve(args["path"])
        if not path.is_file():
            raise ToolFailure(f"`{args['path']}` is not a file; use write_file to create it")
        old = self._current(path)
        count = old.count(args["old_text"]) if args["old_text"] else 0
        if count == 0:
            raise ToolFailure(
                f"old_text does not occur in {args['path']}; read the file and copy the text exactly"
            )
        if count > 1 and not args.get("replace_all"):
            raise ToolFailure(
                f"old_text occurs {count} times in {args['path']}; give more context or set replace_all"
            )
        return path, old, old.replace(args["old_text"], args["new_text"])

    def _edit_preview(self, args: dict[str, Any]) -> str:
        path, old, new = self._edited(args)
        return unified_diff(self._rel(path), old, new)

    async def _edit_file(self, args: dict[str, Any]) -> str:
        path, old, new = self._edited(args)
        atomic_write_text(path, new)
        return f"edited {self._rel(path)}\n{unified_diff(self._rel(path), old, new)}"

    async def _shell(self, args: dict[str, Any]) -> str:
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", args["command"], cwd=self.workspace, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        cap = self.max_result_chars * 4
        out = bytearray()
        try:
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                if len(out) < cap:
                    out += chunk[: cap - len(out)]
            rc = await proc.wait()
        finally:
            # Timeout or cancel (Esc) arrive here as CancelledError: the whole group goes.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.wait())
        text = out.decode("utf-8", errors="replace").rstrip("\n")
        result = f"{text}\n[exit code {rc}]" if text else f"[exit code {rc}]"
        if rc != 0:
            raise ToolFailure(result)
        return result


def _as_dict(arguments: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments are not valid JSON ({exc.msg})") from None
    if not isinstance(arguments, dict):
        raise ValueError("arguments must be a JSON object")
    return arguments


def _user_runner(fn: Callable[..., Any]) -> Callable[[dict[str, Any]], Awaitable[str]]:
    async def run(args: dict[str, Any]) -> str:
        if inspect.iscoroutinefunction(fn):
            value = await fn(**args)
        else:
            value = await run_in_thread(lambda: fn(**args))
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)

    return run
