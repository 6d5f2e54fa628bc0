"""Run a workspace's tests with pytest and read each test's outcome from its JUnit report."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path


def run_tests(workdir: Path, paths: list[str], timeout_s: float) -> dict[str, bool]:
    """``{test id: passed}`` for the tests under ``paths`` (relative to ``workdir``).

    Test ids are ``module.path::name`` (JUnit's classname and name). A run that times out
    or cannot collect reports no tests, so every expected test counts as failing. Plugin
    autoloading is off: the mined repository's tests must not pick up whatever plugins the
    validator's environment has installed (it also makes each run several times faster).
    """
    with tempfile.TemporaryDirectory(prefix="swe-junit-") as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-o", "addopts=", "--rootdir", str(workdir), f"--junitxml={report}", *paths,
        ]  # fmt: skip
        try:
            subprocess.run(
                cmd,
                cwd=workdir,
                env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
                capture_output=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {}
        if not report.exists():
            return {}
        outcomes = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            outcomes[test_id] = not any(
                child.tag in ("failure", "error", "skipped") for child in case
            )
        return outcomes
