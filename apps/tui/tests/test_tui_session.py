"""Sessions on disk: atomic saves, load, list, fork, Markdown export, and corrupt files that are
reported instead of taking the store down.

Run: pytest apps/tui/tests/test_tui_session.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dsv.tui.session import Session, SessionError, SessionStore

CALL = {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a"}'}}
TURN = [
    {"role": "user", "content": "What is in a?"},
    {"role": "assistant", "content": "", "reasoning_content": "read it", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "```fenced```"},
    {"role": "assistant", "content": "It holds a fence.", "reasoning_content": "easy"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "Welcome."},
]


def test_save_load_list_roundtrip(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    s = store.new(endpoint="http://127.0.0.1:1/v1", model="tiny", thinking=False, system="Be brief.")
    assert not s.path.exists()  # an empty session is not written until its first save
    s.messages.extend(TURN)
    s.turn_stats.append({"user_message": 0, "end_message": 4, "usage": {"prompt_tokens": 3}})
    path = s.save()
    assert path == tmp_path / f"{s.id}.json" and json.loads(path.read_text())["format"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    back = store.load(s.id)
    assert back == s  # every field, reasoning included
    assert back.title == "What is in a?" and back.thinking is False and back.system == "Be brief."
    other = store.new(model="tiny")
    other.messages.append({"role": "user", "content": "second session"})
    other.save()
    os.utime(other.path, None)
    infos = store.list()
    assert {i.id for i in infos} == {s.id, other.id}
    info = next(i for i in infos if i.id == s.id)
    assert (info.title, info.n_messages, info.n_turns, info.model, info.error) == (
        "What is in a?",
        6,
        1,
        "tiny",
        None,
    )
    assert store.load(s.id[:-2]).id == s.id  # a unique prefix is enough
    assert store.load("last").id in {s.id, other.id}


def test_save_is_atomic_even_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SessionStore(tmp_path)
    s = store.new()
    s.messages.append({"role": "user", "content": "first"})
    s.save()
    before = s.path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    s.messages.append({"role": "assistant", "content": "second"})
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        s.save()
    monkeypatch.undo()
    assert s.path.read_bytes() == before  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == [s.path.name]


def test_fork_keeps_a_prefix_and_records_the_parent(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    s = store.new(model="tiny", system="sys")
    s.messages.extend(TURN)
    s.turn_stats = [{"end_message": 4}, {"end_message": 6}]
    s.save()
    f = s.fork(4)  # branch before "Thanks"
    assert f.id != s.id and f.parent_id == s.id and f.forked_at == 4
    assert f.messages == TURN[:4] and f.system == "sys" and f.model == "tiny"
    assert f.turn_stats == [{"end_message": 4}]
    f.messages.append({"role": "user", "content": "Another question"})
    f.save()
    assert store.load(s.id).messages == TURN  # the parent is untouched
    assert store.load(f.id).messages[-1]["content"] == "Another question"
    assert f.title == "What is in a? (fork)"
    # A fork point inside a tool step drops the dangling call so the next request stays valid.
    assert s.fork(2).messages == TURN[:1]
    with pytest.raises(SessionError, match="cannot fork at message 9"):
        s.fork(9)


def test_markdown_export(tmp_path: Path) -> None:
    s = SessionStore(tmp_path).new(model="tiny", system="Be brief.")
    s.messages.extend(TURN)
    md = s.to_markdown()
    assert md.startswith("# What is in a?\n") or md.startswith("# dsv chat\n")
    assert "## System\n\nBe brief." in md
    assert "<details><summary>Thinking</summary>\n\nread it\n\n</details>" in md
    assert '**Tool call** `read_file` (call_1)\n\n```json\n{"path": "a"}\n```' in md
    assert "````\n```fenced```\n````" in md  # a longer fence than the output's own backticks
    assert md.count("## You") == 2 and md.count("## Assistant") == 3


def test_corrupt_files_are_reported_not_fatal(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    good = store.new()
    good.messages.append({"role": "user", "content": "fine"})
    good.save()
    (tmp_path / "torn.json").write_text('{"id": "torn", "messages": [{"role": "us')
    (tmp_path / "alien.json").write_text('{"hello": 1}')
    (tmp_path / "badrole.json").write_text('{"id": "badrole", "messages": [{"role": "wizard"}]}')
    infos = store.list()
    assert len(infos) == 4
    errors = {i.id: i.error for i in infos if i.error}
    assert set(errors) == {"torn", "alien", "badrole"}
    assert "not readable JSON" in errors["torn"] and "move it away or delete it" in errors["torn"]
    assert "not a dsv chat session" in errors["alien"]
    assert "message 0 has no valid role" in errors["badrole"]
    assert store.load("last").id == good.id  # corrupt files never win "last"
    with pytest.raises(SessionError, match="not readable JSON"):
        store.load("torn")
    with pytest.raises(SessionError, match="no session `nope`"):
        store.load("nope")


def test_newer_format_is_refused_with_advice(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"format": 99, "id": "x", "messages": []}))
    with pytest.raises(SessionError, match="newer dsv-tui"):
        SessionStore(tmp_path).load("x")
    assert Session.from_dict({"id": "y", "messages": []}).id == "y"


def test_public_api_and_cheap_import() -> None:
    import subprocess
    import sys

    import dsv.tui

    assert dsv.tui.__all__ == sorted(dsv.tui.__all__)
    assert {"Agent", "ChatApp", "ChatClient", "SessionStore", "ToolRegistry", "ApprovalPolicy"} <= set(
        dsv.tui.__all__
    )
    for name in dsv.tui.__all__:
        assert getattr(dsv.tui, name).__name__ == name
    code = "import sys, dsv.tui; print(sorted(m for m in ('textual', 'openai', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
