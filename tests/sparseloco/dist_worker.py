"""One rank of the 2-process gloo tests.

Usage: ``dist_worker.py OUT [MODE]``. MODE ``train`` (default): trains on rank-specific data
and saves its parameters. MODE ``nonfinite``: round 1 first runs with a NaN in rank 1's
parameters; what each rank raised, and how long it took, go to ``OUT`` + ``.json``; then the
round is retried clean and the parameters saved.
"""

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from sparseloco import DistributedExchange, ExchangeError, OuterLoop, SparseLoCo


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def train(out_path: str) -> None:
    rank = dist.get_rank()
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = SparseLoCo(model.named_parameters(), DistributedExchange(), codec={"topk": 16})
    g = torch.Generator().manual_seed(1000 + rank)
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(7))
    losses = []
    with OuterLoop(inner, outer, sync_every=4) as loop:
        for _ in range(24):
            x = torch.randn(32, 16, generator=g)
            loss = ((model(x) - x @ w) ** 2).mean()
            loss.backward()
            inner.step()
            inner.zero_grad()
            losses.append(float(loss.detach()))
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    tensors["losses"] = torch.tensor(losses)
    tensors["peers"] = torch.tensor([len(r.peers) for r in loop.reports])
    save_file(tensors, out_path)


def nonfinite(out_path: str) -> None:
    rank = dist.get_rank()
    model = _model()
    outer = SparseLoCo(model.named_parameters(), DistributedExchange(), codec={"topk": 16})
    g = torch.Generator().manual_seed(1000 + rank)
    report = {}
    for rnd in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        if rnd == 1:
            weight = model[2].weight
            kept = weight[0, 0].item()
            if rank == 1:
                with torch.no_grad():
                    weight[0, 0] = float("nan")
            start = time.monotonic()
            try:
                outer.step()
            except ExchangeError as exc:
                report = {
                    "error": str(exc),
                    "cause": type(exc.__cause__).__name__,
                    "seconds": time.monotonic() - start,
                    "window": outer.window,
                }
            with torch.no_grad():
                weight[0, 0] = kept
        outer.step()
    Path(out_path).with_suffix(".json").write_text(json.dumps(report))
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    tensors["window"] = torch.tensor([outer.window])
    save_file(tensors, out_path)


def main(out_path: str, mode: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    {"train": train, "nonfinite": nonfinite}[mode](out_path)
    dist.barrier()  # tear down together: a rank leaving early can abort the other's gloo
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "train")
