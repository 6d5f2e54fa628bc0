"""Runs the ``interp_*.py`` parity modules in child processes under Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, and pytest runs every test folder
in one process, so each module gets a fresh interpreter process of its own.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["interp_compress.py", "interp_aggregate.py"])
def test_interpreter_parity(module):
    # importlib mode does not put the test folder on sys.path; the modules import _interp.
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "python_files=interp_*.py",
            # triton 3.6's interpreter turns runtime loop bounds into 1-element arrays.
            "-W",
            "ignore:Conversion of an array with ndim:DeprecationWarning",
            "--rootdir",
            str(HERE.parent.parent),
            str(HERE / module),
        ],
        env=env,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
