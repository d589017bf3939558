"""Plots for benchmarks and training runs: matplotlib on its Agg backend (files, no display).

matplotlib is optional everywhere in dsv: :func:`pyplot` returns None when it is not installed,
and callers write their tables without the picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save_png"]


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` with the Agg backend selected, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` as a PNG atomically (temp file, fsync, rename) and close it."""
    import io

    import matplotlib.pyplot as plt

    from dsv.core.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
