"""A rank failing alone, at any phase of a round, never hangs its peer's other ranks: real
torchrun (2 gloo ranks) for an FSDP2 and a DDP peer, a failure injected on each rank in turn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("lockstep_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_every_rank_raises_the_same_error_at_once_wherever_one_rank_fails(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {
        kind: subprocess.Popen(
            [*TORCHRUN, str(WORKER), kind, str(tmp_path / f"{kind}-RANK.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: a kill reaches torchrun's ranks too
        )
        for kind in ("fsdp", "ddp")
    }
    try:
        for p in procs.values():
            out, _ = p.communicate(timeout=150)
            assert p.returncode == 0, out.decode()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for kind in procs:
        ranks = [json.loads((tmp_path / f"{kind}-{r}.json").read_text()) for r in range(2)]
        failures = [r["failures"] for r in ranks]
        assert len(failures[0]) == 13
        for case, mine in failures[0].items():
            theirs = failures[1][case]
            assert mine["type"] == theirs["type"] == "RankError", (kind, case, mine, theirs)
            assert mine["error"] == theirs["error"], (kind, case)
            assert max(mine["s"], theirs["s"]) < 5, (kind, case)  # not the 60 s timeout
            phase, target = case.split(":")[0], case[-1]
            if "payload check" in case:  # the ranks would aggregate different peers
                assert "peers aggregated (a payload usable" in mine["error"], mine["error"]
            else:
                assert f"on rank {target} (" in mine["error"], mine["error"]
                assert f", {phase} failed" in mine["error"] or phase == "commit", mine["error"]
            if phase != "commit":  # nothing changed: the clean retry took the same window
                assert mine.get("window", 0) == theirs.get("window", 0)
        commit = failures[0]["commit: the outer step fails on rank 1"]["error"]
        assert "the ranks' states may now differ" in commit
        assert ranks[0]["digest"] == ranks[1]["digest"], kind  # identical after the retries
