"""`dsv doctor`: what is installed and what this machine can run.

Lists the dsv distributions, torch and triton versions, the compute device, and
whether dsv's Triton kernels are usable (and why not when they are not).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
from importlib import metadata

import typer
from rich.console import Console
from rich.table import Table


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, str]:
    """Facts about this environment as plain strings (also used by tests)."""
    from dsv.cli.main import installed_distributions

    facts: dict[str, str] = {"python": platform.python_version(), "platform": platform.platform()}
    for name, version in installed_distributions().items():
        facts[name] = version
    facts["torch"] = _version("torch") or "not installed"
    facts["triton"] = _version("triton") or "not installed"
    device = "cpu"
    if _version("torch"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
        facts["torch threads"] = str(torch.get_num_threads())
    facts["device"] = device
    facts["kernels"] = _kernels_status()
    facts["CPU DSA kernel"] = _kernels_status("dsv.kernels.cpu")
    facts["DSV_KERNELS"] = os.environ.get("DSV_KERNELS", "(unset: auto)")
    return facts


def _kernels_status(module: str = "dsv.kernels") -> str:
    """Whether ``module`` (dsv.kernels, or its CPU part dsv.kernels.cpu) can run here, and why."""
    if _version("dsv-kernels") is None:
        return "not installed (pip install dsv-kernels)"
    try:
        kernels = importlib.import_module(module)
    except ImportError as exc:
        return f"installed but not importable: {exc}"
    usable, why = kernels.availability()
    return f"usable ({why})" if usable else f"not usable: {why}"


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the facts as one JSON object."),
) -> None:
    """Show installed dsv distributions, torch/triton versions, the device and kernel status."""
    facts = collect()
    if as_json:
        print(json.dumps(facts, indent=1))
        return
    table = Table(title="dsv doctor", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in facts.items():
        table.add_row(key, value)
    Console().print(table)
