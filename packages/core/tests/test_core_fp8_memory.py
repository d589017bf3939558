"""Loading a multi-shard checkpoint keeps the process's peak RSS under the model's own size plus
its largest shard plus a stated margin, for a plain fp32 checkpoint and for its FP8 copy
(dequantised on the way in). Reading every shard first and copying afterwards, as dsv did before,
needs the model twice over and fails the bound.

Run: ``pytest packages/core/tests/test_core_fp8_memory.py`` (Linux: reads /proc/self/status).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv.core.checkpoint import save_pretrained
from dsv.core.convert import quantize
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

# Allocator slack and the per-tensor temporaries of dequantisation (the weight in fp32 twice).
MARGIN = 32 * 2**20

# The peak is measured from just before load_pretrained: building a meta model of the same config
# first imports what the model's modules import (~150 MB of libraries, not checkpoint data).
PROBE = """
import json, sys
from pathlib import Path
import torch
from dsv.core.checkpoint import load_config, load_pretrained
from dsv.core.model import DSVForCausalLM
import dsv.core.fp8, dsv.core.tokenizer

def status():
    d = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024

with torch.device("meta"):
    DSVForCausalLM(load_config(Path(sys.argv[1])))
before, _ = status()
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
model, _ = load_pretrained(sys.argv[1], dtype=torch.float32, with_tokenizer=False, probe=False)
after, peak = status()
print(json.dumps({"before": before, "peak": peak, "model": sum(t.numel() * t.element_size() for t in model.state_dict().values())}))
"""


def _peak(folder: Path) -> dict[str, int]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_is_model_plus_one_shard(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny(vocab_size=8192, hidden_size=384, intermediate_size=1024, moe_intermediate_size=256,
               n_routed_experts=16, num_hidden_layers=4, q_lora_rank=192, kv_lora_rank=128)  # fmt: skip
    src = save_pretrained(DSVForCausalLM(cfg), None, tmp_path / "fp32", max_shard_bytes=16 << 20)
    fp8 = quantize(src, tmp_path / "fp8").out
    for folder in (src, fp8):
        shards = [f.stat().st_size for f in folder.glob("*.safetensors")]
        assert len(shards) >= 5, folder
        r = _peak(folder)
        grew = r["peak"] - r["before"]
        bound = r["model"] + max(shards) + MARGIN
        assert r["model"] <= grew <= bound, (folder.name, grew / 2**20, bound / 2**20)
        # what reading every shard before copying would need; the bound must tell the two apart
        assert bound < r["model"] + sum(shards) or folder == fp8
