"""Durable file writes shared by the eval harness and the synthesis pipeline.

``atomic_write_*`` write a temp file in the destination directory, flush and fsync it,
then ``os.replace`` it over the target, so a reader (or a re-run after SIGKILL) sees
either the old file or the new one, never half of one. ``JsonlAppender`` keeps the file open for a stream of
records, writes each line with one ``write`` (so it is in the kernel, and survives a
SIGKILL of this process, the moment the call returns) and fsyncs at most every
``fsync_every_s`` seconds and on close: an fsync per record cost a quarter of the eval
loop's time against a fast endpoint, and only an OS crash can lose the unsynced tail.
``read_jsonl_tolerant`` drops a torn last line left by a kill in the middle of a write
(and truncates it away so later appends start clean).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "JsonlAppender",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "read_jsonl_tolerant",
]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file in the same dir, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with UTF-8 ``text`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Replace ``path`` with ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


class JsonlAppender:
    """Append JSON lines to one file; each line is written whole, fsync is batched (see the module doc)."""

    def __init__(self, path: str | os.PathLike[str], *, fsync_every_s: float = 0.5) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fsync_every_s = fsync_every_s
        self._last_sync = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # os.write may be partial for large records
            view = view[os.write(self._fd, view) :]
        now = time.monotonic()
        if now - self._last_sync >= self._fsync_every_s:
            os.fsync(self._fd)
            self._last_sync = now

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl_tolerant(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSONL file written by ``JsonlAppender``; a torn final line is dropped and cut off."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        # a kill mid-append left a partial line: cut it so the next append starts on a fresh line
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        data = data[:keep]
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records
