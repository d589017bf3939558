"""Test setup for dsv-kernels: run every kernel in Triton's CPU interpreter.

Triton decides at decoration time whether a kernel is interpreted: every kernel is decorated here, at
collection, with ``TRITON_INTERPRET=1``, and the variable is then given back its old value, so it does not
leak into later tests of the process or their subprocesses; each kernel test sets it again (the checks of
``dsv.kernels`` read it at call time). ``nan_empty`` replaces ``torch.empty`` in the launchers with
NaN-filled buffers, so a kernel that leaves part of its output unwritten fails the comparison.

Run: ``pytest kernels/tests``.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    importlib.import_module("dsv.kernels._api")  # decorates every kernel, as interpreted functions
finally:
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The interpreter evaluates both sides of tl.where in numpy, whose discarded lanes may be inf/NaN.
    for item in items:
        item.add_marker(pytest.mark.filterwarnings("ignore::RuntimeWarning"))


def _nan_empty(real_empty):  # type: ignore[no-untyped-def]
    def empty(*size, **kwargs):  # type: ignore[no-untyped-def]
        t = real_empty(*size, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-7)  # never a valid index nor the -1 marker
        return t

    return empty


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh kernel output buffers start as NaN (floats) or -7 (ints)."""
    monkeypatch.setattr(torch, "empty", _nan_empty(torch.empty))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
