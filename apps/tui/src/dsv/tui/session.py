"""Chat sessions on disk: one JSON file per session, rewritten atomically after every agent step.

A `Session` is the conversation in the OpenAI message shape the endpoint sees (assistant messages
may carry ``reasoning_content`` and ``tool_calls``; tool results are ``role: tool`` messages) plus
what the shell needs to resume it: endpoint, model, the thinking switch, the system prompt and one
stats record per finished turn. The full reasoning of every turn is stored even though the
thinking-with-tools rule drops old reasoning from requests: the file is the record, the rule is
applied when a request is built (`Agent.next_request_messages`).

`Session.save()` writes through a temporary file, fsync and rename, so a terminal killed at any
moment leaves the previous or the new file, never half of one. `SessionStore` lists, loads and
creates sessions under ``platformdirs.user_data_dir("dsv")/sessions``; a file that does not parse
is listed with its error instead of taking the list (or the shell) down.

Example::

    store = SessionStore()
    s = store.new(endpoint="http://127.0.0.1:8000/v1", model="tiny")
    s.messages.append({"role": "user", "content": "hi"})
    s.save()
    store.load(s.id).to_markdown()
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dsv.core.errors import DSVError
from dsv.synth.eval._io import atomic_write_json

__all__ = ["Session", "SessionError", "SessionInfo", "SessionStore", "default_sessions_dir"]

FORMAT = 1
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class SessionError(DSVError):
    """A session file is missing, unreadable or not a dsv chat session."""


def default_sessions_dir() -> Path:
    """Where sessions live unless told otherwise: the user's data folder for dsv, ``sessions/``."""
    import platformdirs

    return Path(platformdirs.user_data_dir("dsv")) / "sessions"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _new_id() -> str:
    # Sortable by creation time, unique across processes started in the same second.
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _title_from(messages: list[dict[str, Any]]) -> str:
    for m in messages:
        if m.get("role") == "user" and isinstance(m.get("content"), str) and m["content"].strip():
            line = m["content"].strip().splitlines()[0]
            return line if len(line) <= 60 else line[:59] + "…"
    return ""


@dataclass
class Session:
    """One conversation and its settings; `save()` after each change (the agent does, every step)."""

    id: str = field(default_factory=_new_id)
    title: str = ""
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    endpoint: str = ""
    model: str = ""
    thinking: bool = True
    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    turn_stats: list[dict[str, Any]] = field(default_factory=list)
    parent_id: str | None = None  # the session this one was forked from
    forked_at: int | None = None  # how many of the parent's messages it kept
    root: Path | None = field(default=None, repr=False, compare=False)  # the store's folder

    @property
    def path(self) -> Path:
        return (self.root or default_sessions_dir()) / f"{self.id}.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "id": self.id,
            "title": self.title,
            "created": self.created,
            "updated": self.updated,
            "endpoint": self.endpoint,
            "model": self.model,
            "thinking": self.thinking,
            "system": self.system,
            "parent_id": self.parent_id,
            "forked_at": self.forked_at,
            "messages": self.messages,
            "turn_stats": self.turn_stats,
        }

    @classmethod
    def from_dict(cls, data: Any, *, root: Path | None = None, where: str = "session") -> Session:
        """A session from its JSON form; `SessionError` naming the first thing that is wrong."""
        if not isinstance(data, dict) or "id" not in data or not isinstance(data.get("messages"), list):
            raise SessionError(f"{where} is not a dsv chat session (no id or messages)")
        if data.get("format", FORMAT) > FORMAT:
            raise SessionError(
                f"{where} was written by a newer dsv-tui (format {data['format']}); upgrade dsv-tui"
            )
        for i, m in enumerate(data["messages"]):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                raise SessionError(f"{where}: message {i} has no valid role")
        return cls(
            id=str(data["id"]),
            title=str(data.get("title") or ""),
            created=str(data.get("created") or _now()),
            updated=str(data.get("updated") or data.get("created") or _now()),
            endpoint=str(data.get("endpoint") or ""),
            model=str(data.get("model") or ""),
            thinking=bool(data.get("thinking", True)),
            system=data.get("system"),
            messages=list(data["messages"]),
            turn_stats=list(data.get("turn_stats") or []),
            parent_id=data.get("parent_id"),
            forked_at=data.get("forked_at"),
            root=root,
        )

    def save(self, *, pending: list[dict[str, Any]] | None = None) -> Path:
        """Write the session atomically (temp file, fsync, rename) into its store's folder.

        ``pending`` messages (an answer still streaming) are written after ``messages`` without
        becoming part of them: if the process dies now, the file keeps what was shown; the next
        save writes the finished message instead."""
        self.updated = _now()
        if not self.title:
            self.title = _title_from(self.messages)
        path = self.path
        data = self.to_dict()
        if pending:
            data["messages"] = [*self.messages, *pending]
        atomic_write_json(path, data)
        return path

    def fork(self, upto_message: int) -> Session:
        """A new session holding ``messages[:upto_message]`` (and the same settings), parent recorded.

        To branch before a user turn, pass that user message's index: the fork ends just before
        it, ready for a different question. Not saved yet: call ``save()``."""
        if not 0 <= upto_message <= len(self.messages):
            raise SessionError(
                f"cannot fork at message {upto_message}: the session has {len(self.messages)} messages"
            )
        kept = [json.loads(json.dumps(m)) for m in self.messages[:upto_message]]
        # A fork must not end with tool calls whose results it cut off (the next request would be
        # refused): drop such a dangling assistant step.
        while kept and kept[-1].get("role") == "assistant" and kept[-1].get("tool_calls"):
            kept.pop()
        title = self.title or _title_from(self.messages)
        return Session(
            title=f"{title} (fork)" if title else "",
            endpoint=self.endpoint,
            model=self.model,
            thinking=self.thinking,
            system=self.system,
            messages=kept,
            turn_stats=[s for s in self.turn_stats if int(s.get("end_message", 0)) <= len(kept)],
            parent_id=self.id,
            forked_at=upto_message,
            root=self.root,
        )

    def to_markdown(self) -> str:
        """The conversation as Markdown: reasoning in ``<details>``, tool calls and results fenced."""
        lines = [f"# {self.title or 'dsv chat'}", ""]
        meta = [f"session `{self.id}`", f"created {self.created}"]
        if self.model:
            meta.append(f"model `{self.model}`")
        if self.endpoint:
            meta.append(f"endpoint `{self.endpoint}`")
        meta.append(f"thinking {'on' if self.thinking else 'off'}")
        if self.parent_id:
            meta.append(f"forked from `{self.parent_id}` at message {self.forked_at}")
        lines += [" · ".join(meta), ""]
        if self.system:
            lines += ["## System", "", self.system, ""]
        for m in self.messages:
            role = m.get("role")
            if role in ("user", "developer"):
                lines += ["## You" if role == "user" else "## Developer", "", str(m.get("content") or ""), ""]
            elif role == "assistant":
                lines += ["## Assistant", ""]
                if m.get("reasoning_content"):
                    lines += ["<details><summary>Thinking</summary>", "", str(m["reasoning_content"]), "",
                              "</details>", ""]  # fmt: skip
                if m.get("content"):
                    lines += [str(m["content"]), ""]
                for call in m.get("tool_calls") or []:
                    fn = call.get("function", {})
                    lines += [f"**Tool call** `{fn.get('name')}` ({call.get('id')})", "", "```json",
                              str(fn.get("arguments") or ""), "```", ""]  # fmt: skip
            elif role == "tool":
                lines += [
                    f"**Tool result** ({m.get('tool_call_id')})",
                    "",
                    _fence(str(m.get("content") or "")),
                    "",
                ]
            elif role == "system":
                lines += ["## System", "", str(m.get("content") or ""), ""]
        return "\n".join(lines).rstrip() + "\n"


def _fence(text: str) -> str:
    # A fence longer than any backtick run inside, so tool output cannot close it early.
    ticks, run = 3, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        ticks = max(ticks, run + 1)
    return f"{'`' * ticks}\n{text}\n{'`' * ticks}"


@dataclass
class SessionInfo:
    """A line of the session list; `error` is set (and the rest mostly empty) for a corrupt file."""

    id: str
    title: str
    created: str
    updated: str
    model: str
    endpoint: str
    n_messages: int
    n_turns: int
    path: Path
    parent_id: str | None = None
    error: str | None = None


class SessionStore:
    """The folder of saved sessions (default: `default_sessions_dir()`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_sessions_dir()

    def new(
        self,
        *,
        endpoint: str = "",
        model: str = "",
        thinking: bool = True,
        system: str | None = None,
    ) -> Session:
        """A fresh, empty session in this store (written on its first ``save()``)."""
        return Session(endpoint=endpoint, model=model, thinking=thinking, system=system, root=self.root)

    def _read(self, path: Path) -> Session:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SessionError(f"no session file {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SessionError(
                f"session file {path} is not readable JSON ({exc}); move it away or delete it"
            ) from None
        return Session.from_dict(data, root=self.root, where=f"session file {path}")

    def list(self) -> list[SessionInfo]:
        """Every session file, most recently updated first; corrupt ones carry their `error`."""
        out: list[SessionInfo] = []
        if not self.root.is_dir():
            return out
        for path in self.root.glob("*.json"):
            try:
                s = self._read(path)
            except SessionError as exc:
                out.append(SessionInfo(path.stem, "", "", "", "", "", 0, 0, path, error=str(exc)))
                continue
            out.append(SessionInfo(s.id, s.title, s.created, s.updated, s.model, s.endpoint, len(s.messages),
                                   len(s.turn_stats), path, s.parent_id))  # fmt: skip
        out.sort(key=lambda i: (i.error is None, i.updated, i.id), reverse=True)
        return out

    def load(self, session_id: str) -> Session:
        """The session with this id, a unique prefix of one, or ``last`` (most recently updated)."""
        if session_id == "last":
            good = [i for i in self.list() if i.error is None]
            if not good:
                raise SessionError(f"no saved sessions in {self.root}")
            return self._read(good[0].path)
        path = self.root / f"{session_id}.json"
        if path.is_file():
            return self._read(path)
        matches = sorted(self.root.glob(f"{session_id}*.json")) if self.root.is_dir() else []
        if len(matches) == 1:
            return self._read(matches[0])
        if matches:
            raise SessionError(
                f"session id `{session_id}` is ambiguous ({len(matches)} match); give more of it"
            )
        raise SessionError(
            f"no session `{session_id}` in {self.root}; `dsv chat --resume last` picks the latest"
        )

    def delete(self, session_id: str) -> None:
        (self.root / f"{session_id}.json").unlink(missing_ok=True)
