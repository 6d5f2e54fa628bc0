"""Run a submitted generator in a subprocess with time, CPU, memory and output limits.

The generator is a Python file run as ``python -s -S -P gen.py --seed S --count N`` in an
empty temporary folder: ``-s`` skips the user's site folder, ``-S`` site-packages, ``-P`` the
script's folder on ``sys.path``, so only the standard library is importable. The environment is
replaced by ``PYTHONHASHSEED=0`` alone: hash randomization would make a generator that iterates
over a set of strings print a different order on every run, and validators must reproduce the
same data. (``-I`` would also ignore the environment, and with it the hash seed.) Limits (POSIX
``resource``, so Linux and macOS):

* RLIMIT_AS (memory) and RLIMIT_CPU (CPU seconds) are set in the child before ``exec``;
* stdout goes to a file capped by RLIMIT_FSIZE, so a flood ends the run (writes past the
  cap fail) instead of filling the validator's memory;
* a wall-clock timeout kills the child's whole process group (it runs in its own session),
  which also catches a generator that sleeps or waits instead of computing.

This is containment for a demo, not a security boundary: a real validator adds a container
or seccomp and no network.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from examples.data_fabrication.config import SandboxLimits

Status = Literal["ok", "timeout", "memory", "cpu", "output-limit", "crashed"]


@dataclass(frozen=True)
class RunOutcome:
    """What a generator run produced.

    Attributes:
        status: ``ok`` or why the run failed.
        lines: its stdout split into lines (empty unless ``ok``).
        seconds: wall time.
        detail: the last line of stderr, or the limit that was hit.
    """

    status: Status
    lines: list[str]
    seconds: float
    detail: str = ""


def _limit(limits: SandboxLimits) -> None:
    """Runs in the child between fork and exec."""
    memory = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_generator(source: str, seed: int, count: int, limits: SandboxLimits) -> RunOutcome:
    """Run ``source`` with ``--seed seed --count count`` under ``limits``."""
    with tempfile.TemporaryDirectory(prefix="fabrication-") as tmp:
        folder = Path(tmp)
        (folder / "generator.py").write_text(source)
        started = time.monotonic()
        with (folder / "stdout").open("wb") as out, (folder / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-s",
                    "-S",
                    "-P",
                    "generator.py",
                    "--seed",
                    str(seed),
                    "--count",
                    str(count),
                ],
                cwd=folder,
                env={"PYTHONHASHSEED": "0"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=lambda: _limit(limits),
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return RunOutcome(
                    "timeout", [], time.monotonic() - started, f"> {limits.timeout_s} s"
                )
        seconds = time.monotonic() - started
        stderr = (folder / "stderr").read_bytes().decode("utf-8", "replace").strip()
        last = stderr.splitlines()[-1] if stderr else ""
        # Python ignores SIGXFSZ, so hitting the cap surfaces as an OSError (EFBIG) in the child
        if (folder / "stdout").stat().st_size >= limits.output_bytes:
            return RunOutcome("output-limit", [], seconds, f"> {limits.output_bytes} bytes")
        if code in (-signal.SIGXCPU, -signal.SIGKILL) and not last:
            return RunOutcome("cpu", [], seconds, f"> {limits.cpu_s} CPU s")
        if "MemoryError" in last:
            return RunOutcome("memory", [], seconds, f"> {limits.memory_mb} MB")
        if code != 0:
            return RunOutcome("crashed", [], seconds, last or f"exit code {code}")
        text = (folder / "stdout").read_bytes().decode("utf-8", "replace")
        return RunOutcome("ok", text.splitlines(), seconds)
