"""Plots for benchmarks and training runs: matplotlib on its Agg backend (files, no display).

matplotlib is optional everywhere in dsv: :func:`pyplot` returns None when it is not installed,
and callers write their tables without the picture.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pyplot"]


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` with the Agg backend selected, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
