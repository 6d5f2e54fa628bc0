"""Every Triton kernel variant the codec launches compiles for sm_90, without spills or FMAs.

Needs no GPU: ``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` and the ptxas bundled
with triton. Runs ``sm90_build.py`` in a child process so TRITON_INTERPRET (which would turn
the kernels into interpreted functions) is unset there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _skip_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        get_ptxas(90)
    except Exception as exc:  # the wheel's ptxas is missing or unusable on this platform
        return f"no usable ptxas for sm_90: {exc}"
    return None


@pytest.mark.slow
def test_all_kernels_build_for_sm90_without_spills():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "sm90_build.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    kernels = {r["kernel"] for r in results}
    assert kernels == {"select_kernel", "codes_kernel", "scatter_pack_kernel", "aggregate_kernel"}
    for r in results:
        assert r["spill_bytes"] == 0 and not r["fma_in_ptx"], r
        assert 0 < r["registers"] <= 255, r
