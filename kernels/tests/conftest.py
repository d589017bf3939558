"""Test setup for dsv-kernels: run every kernel in Triton's CPU interpreter.

Triton decides at decoration time whether a kernel is interpreted: every kernel is decorated here, at
collection, with ``TRITON_INTERPRET=1``, and the variable is then given back its old value, so it does not
leak into later tests of the process or their subprocesses; each kernel test sets it again (the checks of
``dsv.kernels`` read it at call time). ``nan_empty`` replaces ``torch.empty`` in the launchers with
NaN-filled buffers, so a kernel that leaves part of its output unwritten fails the comparison.

``DSV_KERNELS_TEST_DEVICE=cuda`` runs the same tests natively on a GPU instead: no interpreter, and
torch's default device is CUDA during each test, so the tensors the tests build land there (tools/
gpu_check.sh does this). Tests that only make sense on the CPU skip themselves via ``ON_CUDA``.

Run: ``pytest kernels/tests``; on a GPU ``DSV_KERNELS_TEST_DEVICE=cuda pytest kernels/tests/test_kernels_*.py``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

import pytest
import torch

ON_CUDA = os.environ.get("DSV_KERNELS_TEST_DEVICE", "cpu") == "cuda"

if ON_CUDA:
    if not torch.cuda.is_available():
        raise pytest.UsageError("DSV_KERNELS_TEST_DEVICE=cuda, but torch sees no CUDA device")
    os.environ.pop("TRITON_INTERPRET", None)
    importlib.import_module("dsv.kernels._api")  # compiled kernels
else:
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
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        yield
        return
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)


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
