"""The registry of environment families.

Families register themselves with the `@register` decorator when their module
under `dsv.synth.families` is imported; `families()` imports them all. If
`reasoning_gym` is installed, `get("rg:<dataset_name>")` wraps one of its datasets
as an environment (see `dsv.synth.families._reasoning_gym`).

    from dsv.synth import registry
    env = registry.get("arithmetic")
    task = env.generate(seed=0)
    env = registry.get("vowel_count", library="runs/synth/library")  # accepted by `dsv synth build`

With `library=DIR`, names not built in are looked up among the environments that
`dsv synth build` accepted into DIR; those run only in the sandbox
(`dsv.synth.pipeline.library.SandboxedEnvironment`).
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil

from dsv.synth.env import Environment

__all__ = ["UnknownFamilyError", "families", "get", "library_names", "register", "task_file_families"]

_FAMILIES: dict[str, type[Environment]] = {}
_LOADED = False
# Families whose tasks exist only in the task files a pipeline writes (no seed-driven generator):
# `get` finds them for `dsv eval --tasks` and `dsv rl`, `families()` does not list them.
_TASK_FILE_FAMILIES: dict[str, tuple[str, str]] = {
    "repo_issue": ("dsv.synth.repo_env", "RepoIssueEnv"),  # dsv synth repo-envs
    "search_qa": ("dsv.synth.searchqa_env", "SearchQaEnv"),  # dsv synth search-qa
}


class UnknownFamilyError(KeyError):
    """No family has this name; the message lists close matches."""

    def __init__(self, name: str, close: list[str]) -> None:
        self.name = name
        self.close = close
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        super().__init__(f"unknown family {name!r}{hint} (`dsv synth list` shows all families)")

    def __str__(self) -> str:
        return str(self.args[0])


def register(cls: type[Environment]) -> type[Environment]:
    """Class decorator: make an Environment subclass available under `cls.name`."""
    name = getattr(cls, "name", None)
    assert isinstance(name, str) and name, f"{cls.__name__} needs a class attribute `name`"
    existing = _FAMILIES.get(name)
    assert existing is None or existing.__qualname__ == cls.__qualname__, f"family {name!r} registered twice"
    _FAMILIES[name] = cls
    return cls


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    import dsv.synth.families as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def families() -> dict[str, type[Environment]]:
    """All built-in families by name, sorted."""
    _load_builtin()
    return dict(sorted(_FAMILIES.items()))


def task_file_families() -> dict[str, type[Environment]]:
    """Families made by a pipeline into task files (no seed-driven generator), by name."""
    return {
        name: getattr(importlib.import_module(module), cls)
        for name, (module, cls) in sorted(_TASK_FILE_FAMILIES.items())
    }


def library_names(library: str | os.PathLike[str]) -> list[str]:
    """Names of the accepted environments in library directory ``library``; ValueError if it is not one."""
    from pathlib import Path

    from dsv.synth.pipeline.library import Library

    if not Path(library).is_dir():
        raise ValueError(
            f"no library directory at {library} (made by `dsv synth build`, default OUT/library)"
        )
    return Library(library).names()


def get(name: str, *, library: str | os.PathLike[str] | None = None) -> Environment:
    """An instance of family `name`, `rg:<dataset>` for reasoning_gym, or an entry of `library`."""
    if not isinstance(name, str):
        raise UnknownFamilyError(repr(name), [])
    if name.startswith("rg:"):
        from dsv.synth.families._reasoning_gym import reasoning_gym_env

        return reasoning_gym_env(name[3:])
    known = families()
    if name in known:
        return known[name]()
    if name in _TASK_FILE_FAMILIES:
        module, cls = _TASK_FILE_FAMILIES[name]
        return getattr(importlib.import_module(module), cls)()
    candidates = [*known, *_TASK_FILE_FAMILIES]
    if library is not None:
        from dsv.synth.pipeline.library import Library

        in_library = library_names(library)
        if name in in_library:
            return Library(library).environment(name)
        candidates += in_library
    raise UnknownFamilyError(name, difflib.get_close_matches(name, candidates, n=3, cutoff=0.5))
