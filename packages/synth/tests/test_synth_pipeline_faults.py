"""`dsv synth build` under faults: a timeout names the limit that stopped the run, a request in
flight is announced, and Ctrl-C still writes the report of what finished.

Run: ``pytest packages/synth/tests/test_synth_pipeline_faults.py``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dsv.synth.eval.client import EndpointClient
from dsv.synth.pipeline.build import BuildConfig, build
from dsv.synth.pipeline.harness import HarnessError, default_limits, run_worker


def _load_scripted():  # type: ignore[no-untyped-def]
    path = Path(__file__).with_name("scripted_endpoint.py")
    spec = importlib.util.spec_from_file_location("dsv_synth_tests_scripted_endpoint_faults", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


se = _load_scripted()


def test_timeout_reason_names_the_limit_that_stopped_the_run() -> None:
    with pytest.raises(HarnessError) as info:
        run_worker("while True:\n    pass\n", [{"mode": "meta"}], limits=default_limits(4.0))
    assert info.value.category == "timeout"
    # On an idle host the CPU limit (half the wall limit) ends a busy loop first; on a loaded one the
    # loop may get under half a core and meet the wall limit first. Either way the reason names the
    # limit that stopped it with the flag's own value (it used to say "3.0s wall" for --sandbox-wall 5).
    reason = str(info.value)
    assert (
        "CPU limit 2s (half of --sandbox-wall 4s, rounded up)" in reason
        or "wall limit 4s (--sandbox-wall)" in reason
    ), reason


def test_interrupt_writes_the_report_of_what_finished(tmp_path: Path) -> None:
    asked: list[int] = []

    def on_request(i: int) -> None:
        asked.append(i)
        if i == 1:  # Ctrl-C while the second proposal is about to be asked for
            raise KeyboardInterrupt

    with se.ScriptedEndpoint(lambda body: se.Reply(content="no code here")) as endpoint:
        client = EndpointClient(endpoint.base_url, "scripted", max_retries=0)
        with pytest.raises(KeyboardInterrupt):
            build(client, BuildConfig(out_dir=tmp_path, n=3, seeds=(0,)), on_request=on_request)
        client.close()
    assert asked == [0, 1]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["counts"] == {"total": 3, "accepted": 0, "rejected": 1, "error": 0, "pending": 2}
    assert (tmp_path / "report.md").exists()
