"""One rank of the 2-process gloo test: trains on rank-specific data, saves its parameters."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from sparseloco import DistributedExchange, OuterLoop, SparseLoCo


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
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
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
