"""A peer for tests/sparseloco/test_ddp_peer.py: a DDP peer (one torchrun rank) or a plain one.

Usage: ``ddp_worker.py ROLE FOLDER OUT`` with ROLE ``ddp`` (run under torchrun), ``plain``
or ``ddp-fail`` (rank 0's gather raises in window 1). Peers exchange through FOLDER; OUT
gets this process's parameters and per-round bytes sent (or the error it raised).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from sparseloco import ExchangeError, GatherResult, OuterLoop, PeerStatus, SparseLoCo
from sparseloco.payload import payload_from_tensors
from sparseloco.ranks import RankZeroExchange
from sparseloco.serialization import dump_safetensors, load_safetensors

PEERS = ["ddp", "plain"]
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
    m = torch.nn.Sequential(torch.nn.Linear(12, 70), torch.nn.Tanh(), torch.nn.Linear(70, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def main(role: str, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    model = _model()
    if role == "plain":
        rank, trained, exchange = 0, model, FolderExchange(folder, "plain", PEERS)
    else:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        trained = DDP(model)
        fail = 1 if role == "ddp-fail" else None
        peers = ["ddp"] if role == "ddp-fail" else PEERS
        leader = FolderExchange(folder, "ddp", peers, fail_window=fail) if rank == 0 else None
        exchange = RankZeroExchange(leader)
    inner = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    outer = SparseLoCo(trained.named_parameters(), exchange, codec={"topk": 8})
    g = torch.Generator().manual_seed(100 + rank + (10 if role == "plain" else 0))
    tensors = {}
    try:
        with OuterLoop(inner, outer, sync_every=SYNC_EVERY) as loop:
            for _ in range(STEPS):
                x = torch.randn(16, 12, generator=g)
                loss = ((trained(x) - x[:, :3]) ** 2).mean()
                loss.backward()
                inner.step()
                inner.zero_grad()
    except ExchangeError as exc:
        Path(out).with_suffix(".err").write_text(str(exc))
    else:
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        tensors["bytes_sent"] = torch.tensor([r.bytes_sent for r in loop.reports])
        save_file(tensors, out)
    if role != "plain":
        dist.barrier()  # tear down together: a rank leaving early can abort the other's gloo
        dist.destroy_process_group()


if __name__ == "__main__":
    role, folder, out = sys.argv[1:4]
    main(role, folder, out.replace("RANK", os.environ.get("RANK", "0")))
