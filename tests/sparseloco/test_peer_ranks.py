"""Peers of several ranks under real torchrun (gloo on CPU): DDP and FSDP2 (DTensor params)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("peer_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV_THREADS = {"OMP_NUM_THREADS": "1"}


def _start(cmd):
    import os

    env = dict(os.environ, **ENV_THREADS)
    # its own process group: a kill reaches torchrun's ranks too
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def _finish(procs, timeout=120):
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                os.killpg(p.pid, signal.SIGKILL)  # ranks may still hold the pipe: read what came
                out = exc.output or b""
                raise AssertionError(f"timed out:\n{out.decode()[-6000:]}") from None
            assert p.returncode == 0, out.decode()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_ddp_peer_publishes_once_and_ends_identical_to_a_plain_peer(tmp_path):
    folder = tmp_path / "exchange"
    procs = [
        _start(
            [
                *TORCHRUN,
                "--nproc_per_node=2",
                str(WORKER),
                "ddp",
                str(folder),
                str(tmp_path / "ddpRANK.st"),
            ]
        ),
        _start([sys.executable, str(WORKER), "plain", str(folder), str(tmp_path / "plain.st")]),
    ]
    _finish(procs)
    rank0, rank1, plain = (load_file(tmp_path / f) for f in ("ddp0.st", "ddp1.st", "plain.st"))
    assert rank0["bytes_sent"].tolist() != [0, 0, 0] and rank1["bytes_sent"].tolist() == [0, 0, 0]
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == sorted(
        ["multi", "plain"] * 3
    )  # one payload per peer per window: rank 1 published nothing
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):  # DDP's module. prefix is gone
        assert torch.equal(rank0[name], rank1[name])
        assert torch.equal(rank0[name], plain[name])


def test_a_failing_rank_zero_gather_raises_the_same_error_on_every_rank(tmp_path):
    proc = _start(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            str(WORKER),
            "ddp-fail",
            str(tmp_path),
            str(tmp_path / "rRANK.st"),
        ]
    )
    _finish([proc], timeout=90)
    errors = [(tmp_path / f"r{r}.err").read_text() for r in range(2)]
    assert errors[0] == errors[1]
    assert "injected" in errors[0] and "rank 0 of peer multi" in errors[0]


def test_fsdp2_peer_trains_beside_a_plain_peer_and_they_end_identical(tmp_path):
    folder = tmp_path / "exchange"
    procs = [
        _start(
            [
                *TORCHRUN,
                "--nproc_per_node=2",
                str(WORKER),
                "fsdp",
                str(folder),
                str(tmp_path / "fRANK.st"),
            ]
        ),
        _start([sys.executable, str(WORKER), "plain", str(folder), str(tmp_path / "plain.st")]),
    ]
    _finish(procs)
    rank0, rank1, plain = (load_file(tmp_path / f) for f in ("f0.st", "f1.st", "plain.st"))
    assert rank1["bytes_sent"].tolist() == [0, 0, 0] and min(rank0["bytes_sent"].tolist()) > 0
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert torch.equal(rank0[name], rank1[name])
        assert torch.equal(rank0[name], plain[name])


def test_fsdp2_payloads_are_byte_identical_for_1_and_2_ranks(tmp_path):
    """Three rounds with momentum; 2 ranks split 70 rows 35/35 (not on 64-row chunk
    boundaries) and the 1-row output layer 1/0 (an empty shard). Round 1 first fails in the
    encoder of rank 1 (an owner): both ranks raise the same RankError, and the retry gives
    the same bytes."""
    runs = {
        "1": [sys.executable, str(WORKER), "solo-plain"],
        "2": [*TORCHRUN, "--nproc_per_node=2", str(WORKER), "solo-fsdp"],
    }
    _finish(
        [
            _start([*cmd, str(tmp_path / n), str(tmp_path / f"{n}-RANK.st")])
            for n, cmd in runs.items()
        ]
    )
    for window in range(3):
        blobs = {n: (tmp_path / n / str(window) / "solo").read_bytes() for n in runs}
        assert blobs["1"] == blobs["2"], window
    errors = [(tmp_path / f"2-{rank}.err").read_text() for rank in range(2)]
    assert errors[0] == errors[1]  # and no hang
    assert "encode failed on rank 1 (RuntimeError: out of memory (injected))" in errors[0]
    single = load_file(tmp_path / "1-0.st")  # and the retried round equals a clean one
    for rank in range(2):
        got = load_file(tmp_path / f"2-{rank}.st")
        assert all(torch.equal(got[k], single[k]) for k in single if k != "bytes_sent"), rank
