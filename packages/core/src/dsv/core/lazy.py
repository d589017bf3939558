"""Lazy public names for dsv packages (PEP 562): ``import dsv.x`` stays cheap and torch-free until a
name that needs it is used.

Each package's ``__init__`` lists its public names and the submodule that defines each, then::

    __getattr__, __dir__ = lazy_exports(globals(), {"Engine": "dsv.serve.engine", ...})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    namespace: dict[str, Any], exports: dict[str, str], *, cache: bool = False
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` that import ``exports[name]`` on first access.

    A name resolves to the attribute of that module, or to the module itself when the name is the
    module's own (``"presets": "dsv.core.presets"``). ``cache`` stores the value in ``namespace`` so
    later accesses skip the lookup. ``__dir__`` adds the lazy names to what the package holds.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        path = exports.get(name)
        if path is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(path)
        value = (
            module if path.rsplit(".", 1)[-1] == name and not hasattr(module, name) else getattr(module, name)
        )
        if cache:
            namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
