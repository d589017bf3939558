"""The `dsv` root command: entry-point discovery, install hints for missing distributions, --version, doctor."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dsv.cli import main as cli


def test_version_lists_installed_dsv_distributions() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dsv.cli.main", "--version"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0
    assert "dsv-cli" in r.stdout
    assert set(cli.installed_distributions()) <= {line.split()[0] for line in r.stdout.splitlines()}


def test_missing_distribution_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate an environment where only dsv-cli is installed: no entry points at all.
    monkeypatch.setattr(cli, "_load_group", lambda group: {})
    app = cli.build_app()
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "some/model", "--port", "1"])
    assert r.exit_code == 2
    assert "pip install -e 'packages/serve'" in r.output and "dsv-serve" in r.output
    r = runner.invoke(app, ["bench", "kernels"])
    assert r.exit_code == 2 and "pip install -e 'kernels'" in r.output
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "not installed" in r.output


def test_broken_entry_point_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        cli,
        "_load_group",
        lambda group: {"model": ImportError("No module named 'torch'")} if group == "dsv.commands" else {},
    )
    r = CliRunner().invoke(cli.build_app(), ["model"])
    assert r.exit_code == 2 and "torch" in r.output


def test_doctor_reports_versions_and_kernels() -> None:
    from dsv.cli.doctor import collect

    facts = collect()
    for key in ("python", "torch", "triton", "device", "kernels", "CPU DSA kernel", "dsv-cli"):
        assert key in facts
    r = subprocess.run(
        [sys.executable, "-m", "dsv.cli.main", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "kernels" in r.stdout
