"""One rank of the 2-process gloo tests.

Usage: ``dist_worker.py OUT [MODE]``. MODE ``train`` (default): trains on rank-specific data
and saves its parameters. MODE ``failures``: round 1 first runs with a NaN in rank 1's
parameters, round 2 with rank 0 failing while aggregating; what each rank raised, and how
long it took, go to ``OUT`` + ``.json``; each round is then retried clean and the parameters
saved.
"""

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from sparseloco import DistributedExchange, ExchangeError, OuterLoop, SparseLoCo, leave_rank


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


def _inject(outer, model, rnd: int, rank: int):
    """Round 1: a NaN in rank 1's parameters; round 2: rank 0 runs out of memory while
    aggregating. Returns a context that undoes it."""
    weight = model[2].weight
    if rnd == 1 and rank == 1:
        kept = weight[0, 0].item()
        with torch.no_grad():
            weight[0, 0] = float("nan")
        return lambda: weight.data.__setitem__((0, 0), kept)
    if rnd == 2 and rank == 0:

        def oom(*args, **kwargs):
            raise RuntimeError("out of memory (injected)")

        outer._aggregate_tensor = oom
        return lambda: delattr(outer, "_aggregate_tensor")
    return lambda: None


def failures(out_path: str) -> None:
    rank = dist.get_rank()
    model = _model()
    outer = SparseLoCo(model.named_parameters(), DistributedExchange(), codec={"topk": 16})
    g = torch.Generator().manual_seed(1000 + rank)
    reports = []
    for rnd in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        if rnd in (1, 2):
            undo = _inject(outer, model, rnd, rank)
            start = time.monotonic()
            try:
                outer.step()
            except ExchangeError as exc:
                reports.append(
                    {
                        "type": type(exc).__name__,
                        "error": str(exc),
                        "cause": type(exc.__cause__).__name__,
                        "seconds": time.monotonic() - start,
                        "window": outer.window,
                    }
                )
            undo()
        outer.step()
    Path(out_path).with_suffix(".json").write_text(json.dumps(reports))
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    tensors["window"] = torch.tensor([outer.window])
    save_file(tensors, out_path)


def main(out_path: str, mode: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    {"train": train, "failures": failures}[mode](out_path)
    dist.barrier()  # tear down together: a rank leaving early can abort the other's gloo
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "train")
    leave_rank()
