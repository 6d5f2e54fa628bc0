"""A peer for tests/sparseloco/test_ddp_peer.py: one torchrun rank of a DDP/FSDP2 peer, or a
plain single-process peer.

Usage: ``peer_worker.py ROLE FOLDER OUT``. ROLE, under torchrun: ``ddp`` and ``fsdp`` (train
beside a ``plain`` peer), ``ddp-fail`` (rank 0's gather raises in window 1), ``solo-fsdp``
(three rounds of fixed perturbations, no training, alone; round 1 first fails on rank 1);
without torchrun: ``plain`` and ``solo-plain``. Peers exchange through FOLDER; OUT (``RANK``
replaced by the rank) gets the full parameters and per-round bytes sent, or ``.err`` the
error raised.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from sparseloco import (
    ExchangeError,
    GatherResult,
    OuterLoop,
    PeerStatus,
    RankError,
    SparseLoCo,
    optim,
)
from sparseloco.payload import payload_from_tensors
from sparseloco.ranks import RankZeroExchange, leave_rank
from sparseloco.serialization import dump_safetensors, load_safetensors
from sparseloco.sharded import full, shard_like

PEERS = ["multi", "plain"]  # a DDP or FSDP2 peer of several ranks, and a plain one
STEPS, SYNC_EVERY = 9, 3


class FolderExchange:
    """Peers as processes sharing a folder: ``FOLDER/{window}/{peer}`` holds one payload."""

    def __init__(self, folder: str, peer_id: str, peers: list[str], fail_window=None):
        self.folder, self.peer_id, self.peers = Path(folder), peer_id, peers
        self.fail_window = fail_window

    def publish(self, window, payload):
        blob = dump_safetensors(*payload.to_tensors())
        path = self.folder / str(window) / self.peer_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_bytes(blob)
        path.with_suffix(".tmp").rename(path)
        return len(blob)

    def gather(self, window):
        if window == self.fail_window:
            raise ExchangeError("storage unreachable (injected)")
        others = [p for p in self.peers if p != self.peer_id]
        deadline = time.monotonic() + 60
        while not all((self.folder / str(window) / p).exists() for p in others):
            if time.monotonic() > deadline:
                raise ExchangeError(f"window {window}: peers missing")
            time.sleep(0.02)
        result = GatherResult(window=window)
        for p in others:
            blob = (self.folder / str(window) / p).read_bytes()
            result.updates[p] = payload_from_tensors(*load_safetensors(bytearray(blob)))
            result.statuses[p] = PeerStatus(p, "ok", nbytes=len(blob))
        return result


def _model():
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 70), torch.nn.Tanh(), torch.nn.Linear(70, 1))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def _peer(role: str, folder: str, model: torch.nn.Module):
    """(rank, the module trained, the exchange) for ``role``."""
    if role == "plain":
        return 0, model, FolderExchange(folder, "plain", PEERS)
    if role == "solo-plain":
        return 0, model, FolderExchange(folder, "solo", ["solo"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if role.startswith("ddp"):
        trained = DDP(model)
    else:  # FSDP2: DTensor parameters, names unchanged
        fully_shard(model[0])
        trained = fully_shard(model)
    peer_id = "solo" if role == "solo-fsdp" else "multi"
    peers = PEERS if role in ("ddp", "fsdp") else [peer_id]
    fail = 1 if role == "ddp-fail" else None
    leader = FolderExchange(folder, peer_id, peers, fail_window=fail) if rank == 0 else None
    return rank, trained, RankZeroExchange(leader)


def _train(trained, inner, outer, seed):
    g = torch.Generator().manual_seed(seed)
    with OuterLoop(inner, outer, sync_every=SYNC_EVERY) as loop:
        for _ in range(STEPS):
            x = torch.randn(16, 12, generator=g)
            loss = ((trained(x) - x[:, :1]) ** 2).mean()
            loss.backward()
            inner.step()
            inner.zero_grad()
    return loop.reports


def _perturbed_rounds(model, outer, out):
    """Rounds without training: the same full-tensor perturbations whatever the sharding.

    Under torchrun, round 1 is tried first with rank 1's encoder failing (as if out of
    memory); what each rank raised goes to ``out`` + ``.err``, then the round is retried.
    """
    reports = []
    for rnd in range(3):
        g = torch.Generator().manual_seed(rnd)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(shard_like(0.05 * torch.randn(p.shape, generator=g), p))
        if rnd == 1 and dist.is_initialized():
            Path(out).with_suffix(".err").write_text(_failed_round(outer, dist.get_rank() == 1))
        reports.append(outer.step())
    return reports


def _failed_round(outer, fail_here: bool) -> str:
    real = optim.encode_tensor

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    optim.encode_tensor = failing if fail_here else real
    try:
        outer.step()
    except RankError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        optim.encode_tensor = real
    return "no error"


def main(role: str, folder: str, out: str) -> None:
    faulthandler.dump_traceback_later(75, exit=True)  # a hung rank shows where (tests wait 90 s)
    torch.set_num_threads(1)
    model = _model()
    rank, trained, exchange = _peer(role, folder, model)
    solo = role.startswith("solo")
    inner = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    options = {"momentum": 0.5, "nesterov": True} if solo else {}
    outer = SparseLoCo(trained.named_parameters(), exchange, codec={"topk": 8}, **options)
    seed = 100 + rank + (10 if "plain" in role else 0)
    try:
        reports = (
            _perturbed_rounds(model, outer, out) if solo else _train(trained, inner, outer, seed)
        )
    except ExchangeError as exc:
        Path(out).with_suffix(".err").write_text(str(exc))
    else:
        tensors = {n: full(p).detach().contiguous() for n, p in model.named_parameters()}
        tensors["bytes_sent"] = torch.tensor([r.bytes_sent for r in reports])
        save_file(tensors, out)


if __name__ == "__main__":
    role, folder, out = sys.argv[1:4]
    main(role, folder, out.replace("RANK", os.environ.get("RANK", "0")))
    if dist.is_initialized():  # after main's DDP module and optimizers are gone
        gc.collect()
        dist.barrier()  # tear down together: a rank leaving early can abort the other's gloo
        dist.destroy_process_group()
    leave_rank()
