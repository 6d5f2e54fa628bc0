"""Smallest complete example: four SparseLoCo peers as threads, one in-process exchange.

Each peer trains the same small network on its own data with AdamW; every 10 inner steps
the peers exchange compressed pseudo-gradients and take one outer step. Prints the loss and
the bytes each round moved, compared with what a dense fp32 exchange would move.
"""

from __future__ import annotations

import threading

import torch

from sparseloco import InProcessHub, OuterLoop, SparseLoCo

PEERS, STEPS, SYNC_EVERY = 4, 100, 10


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))


def main() -> None:
    hub = InProcessHub([f"peer{i}" for i in range(PEERS)])
    models = [make_model() for _ in range(PEERS)]
    target = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) / 8
    log: dict[int, list[str]] = {}

    def peer(i: int) -> None:
        model = models[i]
        inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
        outer = SparseLoCo(model.named_parameters(), hub.connect(f"peer{i}"), "covenant-72b")
        g = torch.Generator().manual_seed(100 + i)
        dense_bytes = sum(p.numel() * 4 for p in model.parameters())
        with OuterLoop(inner, outer, sync_every=SYNC_EVERY) as loop:
            for step in range(STEPS):
                x = torch.randn(32, 64, generator=g)
                loss = ((model(x) - torch.tanh(x @ target)) ** 2).mean()
                loss.backward()
                inner.step()
                inner.zero_grad()
                if i == 0 and (step + 1) % SYNC_EVERY == 0:
                    r = loop.reports[-1]
                    log.setdefault(0, []).append(
                        f"window {r.window:2d}  loss {loss.item():.4f}  sent {r.bytes_sent:6d} B "
                        f"({dense_bytes / r.bytes_sent:5.1f}x less than fp32)  peers {len(r.peers)}"
                    )

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(PEERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\n".join(log[0]))
    same = all(
        torch.equal(a, b)
        for m in models[1:]
        for a, b in zip(models[0].parameters(), m.parameters(), strict=True)
    )
    print(f"all {PEERS} peers hold identical parameters: {same}")


if __name__ == "__main__":
    main()
