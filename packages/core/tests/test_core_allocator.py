"""The CPU allocator settings: on glibc they stop repeated mid-sized tensors from being mapped
fresh (and page-faulted in) on every allocation."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_PROBE = """
import resource, sys, torch
from dsv.core.allocator import tune_cpu_allocator
if sys.argv[1] == "tuned":
    assert tune_cpu_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm up: the first allocations map their pages in any case
    torch.ones(1 << 20)
before = faults()
for i in range(100):
    # Each a little larger than the last, like a decode step's tensors as the context grows: glibc
    # raises its mmap threshold only to the size last freed, so every one of these is mapped fresh.
    torch.ones((1 << 20) + 1024 * i)
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc mallopt calls")
def test_tuned_allocator_reuses_heap_pages_instead_of_mapping_fresh_ones() -> None:
    default, tuned = _faults("default"), _faults("tuned")
    # Default glibc: each 4 MiB tensor maps about a thousand fresh pages.
    assert default > 50_000
    assert tuned < default / 10


def test_tuning_is_idempotent_and_reports_whether_it_applied() -> None:
    from dsv.core.allocator import tune_cpu_allocator

    first = tune_cpu_allocator()
    assert tune_cpu_allocator() is first
    assert first is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
