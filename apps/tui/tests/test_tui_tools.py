"""The tools of dsv chat on a temporary workspace: each built-in, path escapes, diff previews, the
approval modes, user tools from a .py file, an MCP stdio server (a real subprocess written with the
``mcp`` SDK), and tools that hang, raise or flood.

Run: pytest apps/tui/tests/test_tui_tools.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dsv.core.errors import DSVError
from dsv.tui.tools import ApprovalPolicy, ToolRegistry, truncate


def call(reg: ToolRegistry, name: str, args: dict[str, Any] | str) -> Any:
    return asyncio.run(reg.call(name, args))


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text("def main():\n    print('hi')\n\nmain()\n")
    (root / "README.md").write_text("# demo\nline two\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: main\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    return root


def test_read_list_search(ws: Path) -> None:
    reg = ToolRegistry(ws)
    r = call(reg, "read_file", {"path": "src/app.py"})
    assert r.ok and r.content.splitlines()[0] == "     1\tdef main():"
    part = call(reg, "read_file", {"path": "src/app.py", "offset": 2, "limit": 1})
    assert part.content == "     2\t    print('hi')\n[2 more lines; read on with offset=3]"
    assert call(reg, "list_files", {}).content == ".git/\nsrc/\nREADME.md"
    assert (
        call(reg, "list_files", {"recursive": True}).content == "README.md\nsrc/\nsrc/app.py"
    )  # .git skipped
    assert call(reg, "list_files", {"path": "src", "pattern": "*.py"}).content == "src/app.py"
    hits = call(reg, "search_files", {"pattern": r"print\("})
    assert hits.ok and hits.content == "src/app.py:2:     print('hi')"
    assert call(reg, "search_files", {"pattern": "zzz"}).content == "(no matches)"
    bad = call(reg, "search_files", {"pattern": "("})
    assert not bad.ok and "bad regular expression" in bad.content
    missing = call(reg, "read_file", {"path": "nope.txt"})
    assert not missing.ok and "is not a file" in missing.content


@pytest.mark.parametrize(
    "path", ["../secret.txt", "/etc/hostname", "src/../../secret.txt", "link/secret.txt"]
)
def test_paths_outside_the_workspace_are_refused(ws: Path, path: str) -> None:
    os.symlink(ws.parent, ws / "link")  # a symlink out of the workspace does not get out either
    reg = ToolRegistry(ws)
    for name, args in [("read_file", {"path": path}), ("list_files", {"path": path}),
                       ("write_file", {"path": path, "content": "x"}),
                       ("edit_file", {"path": path, "old_text": "outside", "new_text": "pwned"})]:  # fmt: skip
        r = call(reg, name, args)
        assert not r.ok and "outside the workspace" in r.content, (name, r)
    assert (ws.parent / "secret.txt").read_text() == "outside\n"


def test_write_and_edit_show_a_unified_diff_and_write_atomically(ws: Path) -> None:
    reg = ToolRegistry(ws)
    new = {"path": "docs/new.md", "content": "hello\n"}
    assert reg.preview("write_file", new) == "--- /dev/null\n+++ b/docs/new.md\n@@ -0,0 +1 @@\n+hello\n"
    r = call(reg, "write_file", new)
    assert r.ok and (ws / "docs" / "new.md").read_text() == "hello\n"
    edit = {"path": "README.md", "old_text": "line two", "new_text": "line 2"}
    assert reg.preview("edit_file", edit) == (
        "--- a/README.md\n+++ b/README.md\n@@ -1,2 +1,2 @@\n # demo\n-line two\n+line 2\n"
    )
    assert call(reg, "edit_file", edit).ok
    assert (ws / "README.md").read_text() == "# demo\nline 2\n"
    assert not [p for p in ws.rglob("*.tmp")]  # no temporary files left behind
    again = call(reg, "edit_file", edit)
    assert not again.ok and "does not occur" in again.content
    (ws / "twice.txt").write_text("a a\n")
    twice = call(reg, "edit_file", {"path": "twice.txt", "old_text": "a", "new_text": "b"})
    assert not twice.ok and "occurs 2 times" in twice.content
    assert call(
        reg, "edit_file", {"path": "twice.txt", "old_text": "a", "new_text": "b", "replace_all": True}
    ).ok
    assert (ws / "twice.txt").read_text() == "b b\n"
    # A preview of an edit that cannot apply says why instead of failing.
    assert "no preview" in reg.preview("edit_file", {"path": "twice.txt", "old_text": "zz", "new_text": "y"})


def test_shell_and_python(ws: Path) -> None:
    reg = ToolRegistry(ws, timeout_s=2)
    r = call(reg, "shell", {"command": "ls src && echo err >&2"})
    assert r.ok and r.content == "app.py\nerr\n[exit code 0]"
    fail = call(reg, "shell", {"command": "exit 3"})
    assert not fail.ok and fail.content == "error: [exit code 3]"
    t0 = time.monotonic()
    hung = call(reg, "shell", {"command": "sleep 30"})
    assert not hung.ok and "ran longer than 2 s" in hung.content and time.monotonic() - t0 < 5
    py = call(reg, "python", {"code": "print(sum(range(10)))"})
    assert py.ok and py.content == "45"
    err = call(reg, "python", {"code": "raise ValueError('no')"})
    assert not err.ok and "ValueError: no" in err.content and "[sandbox: error" in err.content
    assert "python" in reg.preview("python", {"code": "print('python')"})


def test_huge_output_is_truncated_with_a_note() -> None:
    text, cut = truncate("a" * 10_000 + "TAIL", 1000)
    assert cut and text.startswith("a" * 750) and text.endswith("TAIL") and "characters cut" in text
    assert truncate("short", 1000) == ("short", False)


def test_bad_arguments_are_results_not_exceptions(ws: Path) -> None:
    reg = ToolRegistry(ws)
    assert "missing required argument" in call(reg, "read_file", {}).content
    assert "unknown argument" in call(reg, "read_file", {"path": "a", "colour": 1}).content
    assert "not valid JSON" in call(reg, "read_file", "{oops").content
    assert "no tool named" in call(reg, "fly", {}).content


def test_approval_modes() -> None:
    reg = ToolRegistry(Path.cwd())
    shell, write, read = reg.get("shell"), reg.get("write_file"), reg.get("read_file")
    ask, auto_ro, auto_all = (
        ApprovalPolicy("ask"),
        ApprovalPolicy("auto-read-only"),
        ApprovalPolicy("auto-all"),
    )
    assert [ask.needs_approval(t) for t in (shell, write, read)] == [True, True, True]
    assert [auto_ro.needs_approval(t) for t in (shell, write, read)] == [True, True, False]
    assert [auto_all.needs_approval(t) for t in (shell, write, read)] == [False, False, False]
    auto_ro.always_allowed.add("shell")  # "always allow this tool for this session"
    assert not auto_ro.needs_approval(shell) and auto_ro.needs_approval(write)
    with pytest.raises(DSVError, match="unknown approval mode `yolo`"):
        ApprovalPolicy("yolo")  # type: ignore[arg-type]


def test_user_tools_from_a_python_file(tmp_path: Path, ws: Path) -> None:
    f = tmp_path / "mine.py"
    f.write_text(
        "import time\nfrom typing import Literal\n\n"
        "READ_ONLY = {'weather'}\n\n"
        "def weather(city: str, unit: Literal['C', 'F'] = 'C') -> dict:\n"
        "    '''Forecast for a city.\n\n    Args:\n        city: where.\n        unit: C or F.\n    '''\n"
        "    return {'city': city, 'high': 52 if unit == 'F' else 11}\n\n"
        "async def slow(seconds: float) -> str:\n    '''Wait.'''\n"
        "    import asyncio\n    await asyncio.sleep(seconds)\n    return 'done'\n\n"
        "def boom() -> str:\n    '''Break.'''\n    return 1 / 0\n\n"
        "def _private() -> None:\n    pass\n"
    )
    reg = ToolRegistry(ws, timeout_s=0.5)
    added = reg.load_user_file(f)
    assert [t.name for t in added] == ["weather", "slow", "boom"]
    w = reg.get("weather")
    assert w.source == "user" and w.read_only and not reg.get("boom").read_only
    params = w.parameters
    assert params["required"] == ["city"] and params["properties"]["unit"]["enum"] == ["C", "F"]
    assert w.description == "Forecast for a city."
    assert call(reg, "weather", {"city": "Paris", "unit": "F"}).content == '{"city": "Paris", "high": 52}'
    assert "must be one of" in call(reg, "weather", {"city": "Paris", "unit": "K"}).content
    assert call(reg, "slow", {"seconds": 0.01}).content == "done"
    assert "ran longer than 0.5 s" in call(reg, "slow", {"seconds": 5}).content
    assert "ZeroDivisionError" in call(reg, "boom", {}).content
    assert any(s["function"]["name"] == "weather" for s in reg.schemas())
    with pytest.raises(DSVError, match="two tools are named `weather`"):
        reg.load_user_file(f)
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(DSVError, match="failed to load: ModuleNotFoundError"):
        ToolRegistry(ws).load_user_file(broken)
    with pytest.raises(DSVError, match="does not exist"):
        ToolRegistry(ws).load_user_file(tmp_path / "none.py")


MCP_SERVER = """
import sys, time
try:
    from mcp.server.mcpserver import MCPServer as Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as Server

try:
    from mcp.types import ToolAnnotations
    ro = {"annotations": ToolAnnotations(readOnlyHint=True)}
except Exception:
    ro = {}

server = Server("demo")

@server.tool(**ro)
def add(a: int, b: int) -> str:
    '''Add two numbers.'''
    return str(a + b)

@server.tool()
def fail(reason: str) -> str:
    '''Always fails.'''
    raise ValueError(reason)

@server.tool()
def nap(seconds: float) -> str:
    '''Sleep.'''
    time.sleep(seconds)
    return "awake"

server.run()
"""


def test_mcp_stdio_server_lists_and_calls_tools(tmp_path: Path, ws: Path) -> None:
    script = tmp_path / "demo_server.py"
    script.write_text(MCP_SERVER)

    async def go() -> dict[str, Any]:
        reg = ToolRegistry(ws, timeout_s=2)
        reg.add_mcp_server_later([sys.executable, str(script)])
        assert "add" not in reg.names()
        await reg.start()
        out: dict[str, Any] = {"names": reg.names(), "read_only": reg.get("add").read_only,
                               "source": reg.get("add").source, "schema": reg.get("add").parameters}  # fmt: skip
        out["add"] = await reg.call("add", {"a": 2, "b": 40})
        out["fail"] = await reg.call("fail", {"reason": "on purpose"})
        out["nap"] = await reg.call("nap", {"seconds": 10})
        out["after"] = await reg.call("add", {"a": 1, "b": 1})  # a timed-out call does not break the session
        pid_alive = [s for s in reg.mcp_servers]
        await reg.aclose()
        out["closed_names"] = reg.names()
        out["servers"] = pid_alive
        return out

    t0 = time.monotonic()
    out = asyncio.run(go())
    assert {"add", "fail", "nap"} <= set(out["names"])
    assert out["source"] == "mcp" and out["read_only"] is True
    assert set(out["schema"]["properties"]) == {"a", "b"}
    assert out["add"].ok and out["add"].content == "42"
    assert not out["fail"].ok and "fail" in out["fail"].content  # the SDK reports the error, not its text
    assert not out["nap"].ok and "ran longer than 2 s" in out["nap"].content
    assert out["after"].ok and out["after"].content == "2"
    assert "add" not in out["closed_names"]
    assert time.monotonic() - t0 < 30


def test_mcp_server_that_fails_to_start_is_a_clear_error(tmp_path: Path, ws: Path) -> None:
    bad = tmp_path / "bad_server.py"
    bad.write_text("import sys\nsys.exit(3)\n")

    async def go() -> None:
        await ToolRegistry(ws).add_mcp_server([sys.executable, str(bad)])

    with pytest.raises(DSVError, match=r"MCP server .* failed to start"):
        asyncio.run(go())


def test_workspace_must_exist(tmp_path: Path) -> None:
    with pytest.raises(DSVError, match="is not a folder"):
        ToolRegistry(tmp_path / "missing")
