"""One torchrun rank of a 2-rank peer (FSDP2 or DDP, through RankZeroExchange) that makes
one rank fail at every phase of a round, then retries the round clean.

Usage: ``lockstep_worker.py fsdp|ddp OUT``. OUT (``RANK`` replaced by the rank) gets JSON:
for each failure, the error this rank raised, its type and how long ``step()`` (or
``apply()``) took; and the SHA-256 of the full parameters before the last failure and at the
end.
"""

from __future__ import annotations

import faulthandler
import gc
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from sparseloco import (
    GatherResult,
    PeerStatus,
    RankZeroExchange,
    SparseLoCo,
    UpdateError,
    leave_rank,
    optim,
)
from sparseloco.sharded import full, shard_like


class EchoExchange:
    """Rank 0's exchange: gather hands back this peer's own payload as a second peer's
    ("echo"), so every rank has a gathered payload to check and aggregate."""

    peer_id = "solo"

    def __init__(self) -> None:
        self.sent: dict = {}

    def publish(self, window, payload):
        self.sent[window] = payload
        return payload.nbytes

    def gather(self, window):
        payload = self.sent[window]
        result = GatherResult(window=window, updates={"echo": payload})
        result.statuses["echo"] = PeerStatus("echo", "ok", nbytes=payload.nbytes)
        return result


def _oom(*args, **kwargs):
    raise RuntimeError("out of memory (injected)")


@contextmanager
def _nan_in_shard(model):
    """A NaN in this rank's part of the first layer's weight (its shard under FSDP2)."""
    weight = model[0].weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    kept = local[0, 0].item()
    with torch.no_grad():
        local[0, 0] = float("nan")
    try:
        yield
    finally:
        with torch.no_grad():
            local[0, 0] = kept


def _second_delta_fails(outer):
    """Δ of the second parameter fails (FSDP2: the ranks still have all-gathers to do)."""
    real, calls = outer._own_delta, []

    def delta(p):
        calls.append(p)
        if len(calls) == 2:
            raise RuntimeError("out of memory (injected)")
        return real(p)

    return mock.patch.object(outer, "_own_delta", delta)


def _rejected(*args, **kwargs):
    raise UpdateError("rejected on this rank only (injected)")


def injections(model, outer) -> dict[str, Callable]:
    """name -> a context manager factory making this rank fail there."""
    return {
        "check: NaN in this rank's shard": lambda: _nan_in_shard(model),
        "encode: Δ out of memory": lambda: _second_delta_fails(outer),
        "encode: the codec fails": lambda: mock.patch.object(optim, "encode_tensor", _oom),
        "gather: a payload check fails": lambda: mock.patch.object(outer, "_check", _rejected),
        "gather: aggregation out of memory": lambda: mock.patch.object(
            outer, "_aggregate_tensor", _oom
        ),
    }


def _perturb(model, rnd: int) -> None:
    """The same full-tensor change on every rank, whatever the sharding."""
    g = torch.Generator().manual_seed(rnd)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shard_like(0.05 * torch.randn(p.shape, generator=g), p))


def _digest(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(full(p.detach()).contiguous().numpy().tobytes())
    return h.hexdigest()


def _attempt(call, inject, fail_here: bool) -> dict:
    start = time.monotonic()
    try:
        if fail_here:
            with inject():
                call()
        else:
            call()
    except Exception as exc:
        return {"type": type(exc).__name__, "error": str(exc), "s": time.monotonic() - start}
    return {"type": None, "error": "no error", "s": time.monotonic() - start}


def main(kind: str, out: str) -> None:
    faulthandler.dump_traceback_later(60, exit=True)  # a hung rank shows where
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 70), torch.nn.Tanh(), torch.nn.Linear(70, 3))
    if kind == "fsdp":
        fully_shard(model[0])
        trained = fully_shard(model)
    else:
        trained = DDP(model)
    exchange = RankZeroExchange(EchoExchange() if rank == 0 else None)
    outer = SparseLoCo(
        trained.named_parameters(), exchange, codec={"topk": 8}, momentum=0.5, nesterov=True
    )
    report: dict = {"failures": {}}
    rnd = 0
    for name, inject in injections(model, outer).items():
        for target in (0, 1):
            _perturb(model, rnd := rnd + 1)
            got = _attempt(outer.step, inject, rank == target)
            report["failures"][f"{name} on rank {target}"] = got | {"window": outer.window}
            outer.step()  # the retry, clean
    window = outer.window - 1
    for target in (0, 1):  # apply(): a window's updates, as joining replays them
        updates = outer.exchange.gather(window).updates
        fails = mock.patch.object(outer, "_aggregate_tensor", _oom)
        got = _attempt(lambda u=updates: outer.apply(u), lambda f=fails: f, rank == target)
        report["failures"][f"apply: aggregation out of memory on rank {target}"] = got
        outer.apply(updates)
    report["digest"] = _digest(model)
    commit = mock.patch.object(outer, "_outer_update", _oom)
    _perturb(model, rnd + 1)
    got = _attempt(outer.step, lambda: commit, rank == 1)
    report["failures"]["commit: the outer step fails on rank 1"] = got
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].replace("RANK", os.environ.get("RANK", "0")))
    gc.collect()  # the DDP/FSDP2 module and optimizers go before the process group
    dist.barrier()
    dist.destroy_process_group()
    leave_rank()
