"""Two real processes over torch.distributed (gloo) on loopback: in sync, and no hang when
one rank fails."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path: Path, mode: str = "train", timeout: float = 240) -> bool:
    """Run both ranks to the end; ``False`` when the port was taken before rank 0 bound it."""
    port = _free_port()  # free now; another process may still take it before rank 0 binds it
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE="2",
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(tmp_path / f"rank{rank}.safetensors"), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        for rank, p in enumerate(procs):  # rank 0 first: it serves the rendezvous store
            out, _ = p.communicate(timeout=timeout)
            if rank == 0 and p.returncode != 0 and b"EADDRINUSE" in out:
                return False
            assert p.returncode == 0, out.decode()
    finally:
        for p in procs:  # a failed rank leaves the other waiting for it
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return True


def test_two_gloo_ranks_with_different_data_end_bit_identical(tmp_path):
    assert any(_run_ranks(tmp_path) for _ in range(3)), "no free rendezvous port in 3 tries"
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert torch.equal(r0["peers"], torch.full((6,), 2))
    assert not torch.equal(r0["losses"], r1["losses"])  # the data differed
    for name in r0:
        if name not in ("losses", "peers"):
            assert torch.equal(r0[name], r1[name]), name
    for r in (r0, r1):
        assert float(r["losses"][-4:].mean()) < 0.7 * float(r["losses"][:4].mean())


def test_a_rank_failing_alone_makes_every_rank_raise_the_same_error_at_once(tmp_path):
    """Rank 1 holds a NaN in round 1, rank 0 runs out of memory while aggregating round 2:
    both ranks raise the same RankError from the phase's agreement (not the 60 s
    process-group timeout), nothing changes, and the retries work."""
    assert any(_run_ranks(tmp_path, "failures", timeout=90) for _ in range(3)), "no free port"
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for (first, second), (where, cause) in zip(
        zip(*reports, strict=True),
        [
            (
                "window 1, check failed on rank 1 (NonFiniteError: 2.weight:",
                ["NoneType", "NonFiniteError"],
            ),
            (
                "window 2, gather failed on rank 0 (RuntimeError: out of memory",
                ["RuntimeError", "NoneType"],
            ),
        ],
        strict=True,
    ):
        assert first["error"] == second["error"] and first["type"] == "RankError"
        assert where in first["error"], first["error"]
        assert [first["cause"], second["cause"]] == cause
        assert first["window"] == second["window"] == int(where.split()[1].rstrip(","))
        assert max(first["seconds"], second["seconds"]) < 10
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert r0["window"].item() == r1["window"].item() == 4
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
