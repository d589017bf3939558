"""Nox sessions: each distribution installed alone (with only what it declares, plus its dsv
dependencies, which are not on PyPI) runs its own tests; `integration` runs the cross-package
tests with everything; `latest` runs the whole suite against the newest releases of every dependency
(the README test command installs the pinned versions of constraints.txt); `lint` runs ruff.

    nox -s core            # dsv-core alone
    nox -s kernels synth   # several
    nox                    # all
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"

# session name -> (folder, extras for its own tests, dsv folders it depends on)
PACKAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # apps/cli: every distribution with commands depends on dsv-cli for dsv.cli.errors
    "core": ("packages/core", "test", ("apps/cli",)),
    "cli": ("apps/cli", "test", ()),
    "kernels": ("kernels", "test,bench", ("apps/cli", "packages/core")),
    "synth": ("packages/synth", "test,hf,rg,eval", ("apps/cli",)),
    "serve": ("packages/serve", "test", ("apps/cli", "packages/core")),
    "train": ("packages/train", "test,plots", ("apps/cli", "packages/core")),
    "rl": ("packages/rl", "test", ("apps/cli", "packages/core", "packages/train", "packages/serve",
                                  "packages/synth")),
    "tui": ("apps/tui", "test", ("apps/cli", "packages/core", "packages/synth", "packages/serve")),
}


def _install(session: nox.Session, folder: str, extras: str, deps: tuple[str, ...]) -> None:
    session.install(TORCH, "pytest-timeout")
    for dep in deps:
        session.install("-e", dep)
    session.install("-e", f"{folder}[{extras}]")


for _name, (_folder, _extras, _deps) in PACKAGES.items():

    def _session(
        session: nox.Session, folder: str = _folder, extras: str = _extras, deps: tuple[str, ...] = _deps
    ) -> None:
        _install(session, folder, extras, deps)
        session.run("python", "-m", "pytest", f"{folder}/tests", *session.posargs)

    nox.session(name=_name)(_session)


@nox.session
def integration(session: nox.Session) -> None:
    """Cross-package tests with every distribution installed."""
    session.install("-r", "requirements-dev.txt")
    session.run("python", "-m", "pytest", "tests", *session.posargs)


@nox.session
def latest(session: nox.Session) -> None:
    """The whole suite against the newest releases of every dependency, ignoring constraints.txt: run
    it on purpose to see upstream breakage before it reaches the lock (then update it: tools/lock.sh)."""
    session.install("--upgrade", "--upgrade-strategy", "eager", "-r", "requirements-dev.txt")
    session.run("python", "-m", "pytest", "-n", "2", "--dist", "loadgroup", *session.posargs,
                env={"OMP_NUM_THREADS": "1"})  # fmt: skip


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session(default=False)
def mutants(session: nox.Session) -> None:
    """Mutation testing (not in CI; minutes per target): cosmic-ray mutants of the sampling, answer
    verification and attention-reference functions against the tests that should catch them, in a copy
    of the committed tree; survivors go to tools/mutants/REPORT.md. ``nox -s mutants -- --target sampling``
    runs one target."""
    session.install(TORCH, "pytest-timeout", "cosmic-ray>=8.4")
    for folder in ("apps/cli", "packages/core", "packages/synth"):
        session.install("-e", folder)
    session.install("-e", "packages/core[test]", "-e", "packages/synth[test]", "-e", "packages/serve[test]")
    session.run("python", "tools/mutants/run.py", *session.posargs, env={"OMP_NUM_THREADS": "1"})
