"""Suite-wide guard: a test must leave the process's signal handling as it found it.

A pytest worker runs many tests, and the subprocesses they start inherit its ignored signals and its
blocked-signal mask. One test that leaves SIGINT ignored makes every later Ctrl-C test in that worker
fail (the child never sees the signal), and only in the orders where it runs first. This fixture names
the test that changed the state instead.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

_WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD)


def _signal_state() -> tuple[object, ...]:
    handlers = tuple(signal.getsignal(s) for s in _WATCHED)
    return (*handlers, frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, [])))


@pytest.fixture(autouse=True)
def _signals_restored() -> Iterator[None]:
    before = _signal_state()
    yield
    after = _signal_state()
    if after != before:
        changed = [f"{s.name}: {b!r} -> {a!r}" for s, b, a in zip(_WATCHED, before, after, strict=False) if a != b]
        if after[-1] != before[-1]:
            changed.append(f"blocked signals: {sorted(before[-1])} -> {sorted(after[-1])}")
        for s, handler in zip(_WATCHED, before, strict=False):  # restore, so later tests run as designed
            signal.signal(s, handler)  # type: ignore[arg-type]
        signal.pthread_sigmask(signal.SIG_SETMASK, before[-1])  # type: ignore[arg-type]
        pytest.fail("the test left the process's signal handling changed: " + "; ".join(changed), pytrace=False)
