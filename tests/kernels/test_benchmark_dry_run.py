"""``benchmarks/kernels.py --dry-run``: the GPU benchmark's every step, on the CPU.

A lent GPU's time is short; this runs the script end to end under Triton's interpreter on
small tensors (in a child process, so TRITON_INTERPRET is set before triton is imported), so
a broken benchmark is found here rather than on the device.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernel_benchmark_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["device"] == "cpu (dry run)"
    assert results["backend"]["name"] == "triton"
    assert results["parity"] == {"tensors": 4, "mismatched": []}
    model = results["models"]["dry-run"]
    assert set(model["compress"]["paths"]) == {"triton", "torch_reference", "torch_templar_ops"}
    assert set(model["aggregate"]["paths"]) == {"triton", "torch_reference"}
    for block in (model["compress"], model["aggregate"]):
        assert block["numel"] == 256 * 128 + 128 * 128 + 100 * 70 + 128
        for path in block["paths"].values():
            assert path["seconds"] > 0 and path["effective_GBps"] > 0
    assert results["targets"] == {}  # interpreter timings judge nothing
    assert "parity on this device: 4 tensors, mismatched: []" in proc.stdout
