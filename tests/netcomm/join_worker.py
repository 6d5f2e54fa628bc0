"""One torchrun rank of peer "c", an FSDP2 peer of 2 ranks that joins the run of
tests/netcomm/test_join.py at window 5 and then runs window 5 with the others.

Usage: ``join_worker.py ROOT``: the bucket is ROOT/bucket, the checkpoints ROOT/ckpt (rank 0
alone opens either). Rank 0 writes ROOT/joined.safetensors and ROOT/final.safetensors: the
full parameters, θ₀, momentum and the inner optimizer's moments (``name/key``) and the window,
after joining and after window 5.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from test_join import WINDOWS, Net, model_of, outer_optimizer, train_window
from torch.distributed.fsdp import fully_shard

from netcomm import CheckpointStore, LocalStorage, join
from sparseloco import RankZeroExchange, leave_rank
from sparseloco.sharded import full


def dump(model, inner, outer, path: Path) -> None:
    """Full tensors of the peer's state (collectives: every rank calls it)."""
    out = {"window": torch.tensor([outer.window])}
    for name, p in model.named_parameters():
        out[name] = full(p.detach())
        for key, value in outer.state[p].items():
            if key != "error":
                out[f"{name}/{key}"] = full(value)
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}/inner.{key}"] = full(inner.state[p][key])
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in out.items()}, path)


def main(root: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    leader = dist.get_rank() == 0
    net = Net(root / "bucket")
    for name in ("a", "b"):
        net.record(name)
    exchange = net.record("c")
    model = model_of(seed=7)  # not the run's initial model: everything comes from the join
    fully_shard(model[0])
    fully_shard(model)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = outer_optimizer(model.named_parameters(), RankZeroExchange(exchange), 0.5)
    store = CheckpointStore(LocalStorage(root / "ckpt")) if leader else None
    report = join(model, outer, store, inner=inner, until=WINDOWS, deadline_s=0.3)
    assert (report.checkpoint, report.window) == (3, WINDOWS), report
    assert report.replayed == {3: ["a", "b"], 4: ["a", "b"]}, report
    dump(model, inner, outer, root / "joined.safetensors")
    train_window(model, inner, outer, seed=1000 * WINDOWS + ord("c"))
    assert outer.last_report.peers == ["a", "b", "c"], outer.last_report
    dump(model, inner, outer, root / "final.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    leave_rank()
