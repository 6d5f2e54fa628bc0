"""One SparseLoCo peer trained by N processes with FSDP2: the recipe of a multi-GPU miner.

    torchrun --nproc-per-node 8 examples/torchrun_miner.py --storage /shared/bucket \\
        --peer miner-0 --peers miner-0,miner-1 --steps 3000 --sync-every 30

Each rank holds a shard of every parameter (``fully_shard`` on each block and the root) and
trains on its own slice of each global batch; the batches depend on the peer and the step,
not on the number of ranks. Every ``--sync-every`` inner steps the peer takes one outer round
through :mod:`sparseloco.sharded`'s owner ranks: each parameter's owner encodes the full
pseudo-gradient, so the payload is byte for byte what an unsharded peer would send. Rank 0
alone publishes it to storage (netcomm's signed envelopes, one prefix per peer) and gathers
the other peers' updates; :class:`~sparseloco.ranks.RankZeroExchange` hands its gather to
every rank, so all of them take the same outer step.

With CUDA: NCCL, one GPU per rank (``LOCAL_RANK``). Without: gloo on the CPU, e.g. in CI::

    torchrun --nproc-per-node 2 examples/torchrun_miner.py --steps 12 --sync-every 4

Without ``torchrun`` it runs as a single unsharded process. Rank 0 prints one line per
window and, at the end, the SHA-256 of the full parameters. Signing keys are derived from
the peer ids, which is fit for a local demo only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from netcomm import (
    Ed25519Signer,
    ExchangeConfig,
    LocalStorage,
    ModelSpec,
    PeerRecord,
    StaticDirectory,
    StorageExchange,
)
from sparseloco import OuterLoop, RankZeroExchange, RoundReport, SparseLoCo, leave_rank
from sparseloco.data import TokenDataset, stdlib_corpus
from sparseloco.models import GPT, GPTConfig
from sparseloco.sharded import full


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storage", default=None, help="bucket folder (default: a temp folder)")
    ap.add_argument("--peer", default="miner-0", help="this peer's id")
    ap.add_argument("--peers", default=None, help="comma-separated peer ids (default: --peer)")
    ap.add_argument("--steps", type=int, default=60, help="inner steps")
    ap.add_argument("--sync-every", type=int, default=30, help="inner steps per outer round (H)")
    ap.add_argument("--batch", type=int, default=8, help="samples per global batch")
    ap.add_argument("--block", type=int, default=64, help="tokens per sample")
    ap.add_argument("--lr", type=float, default=3e-3, help="inner AdamW learning rate")
    ap.add_argument("--preset", default="covenant-72b", help="SparseLoCo preset")
    ap.add_argument("--deadline", type=float, default=30.0, help="gather deadline, seconds")
    return ap.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); a process group only under torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def storage_exchange(args: argparse.Namespace, spec: ModelSpec) -> StorageExchange:
    """This peer's netcomm exchange: every peer under its own prefix of one bucket."""
    storage = LocalStorage(args.storage)
    peers = args.peers.split(",") if args.peers else [args.peer]
    signers = {p: Ed25519Signer.from_seed(hashlib.sha256(p.encode()).digest()) for p in peers}
    directory = StaticDirectory(
        PeerRecord(p, storage, signers[p].public_key, prefix=p) for p in peers
    )
    config = ExchangeConfig(deadline_s=args.deadline, poll_interval_s=0.05)
    return StorageExchange(
        args.peer, storage, directory, signers[args.peer], spec, config, prefix=args.peer
    )


def shard(model: GPT, world: int, device: torch.device) -> None:
    """FSDP2: each block, then the root (embeddings, tied head, final norm)."""
    if world == 1 and not dist.is_initialized():
        return
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def seed(peer: str, step: int) -> int:
    """The data seed of ``peer``'s ``step``: the same on every rank and every machine."""
    return int.from_bytes(hashlib.sha256(f"{peer}/{step}".encode()).digest()[:7], "little")


def digest(model: torch.nn.Module) -> str:
    """SHA-256 of the full parameters (a collective under FSDP2: call it on every rank)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(full(p.detach()).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = setup()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} ranks")
    if args.storage is None:
        args.storage = tempfile.mkdtemp(prefix="torchrun-miner-") if rank == 0 else ""
        if world > 1:
            box = [args.storage]
            dist.broadcast_object_list(box, src=0)
            args.storage = box[0]
    data = TokenDataset(stdlib_corpus(1_000_000), args.block)
    torch.manual_seed(0)  # every peer and rank starts from the same model
    model = GPT(GPTConfig(block_size=args.block, n_layer=2, n_head=2, n_embd=64)).to(device)
    spec = ModelSpec.from_module(model)
    shard(model, world, device)
    leader = storage_exchange(args, spec) if rank == 0 else None
    exchange = RankZeroExchange(leader) if dist.is_initialized() else leader
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    outer = SparseLoCo(model.named_parameters(), exchange, args.preset)
    losses: list[float] = []
    started = time.monotonic()

    def on_round(report: RoundReport) -> None:
        loss = torch.tensor(sum(losses) / len(losses), device=device)
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= world
        losses.clear()
        if rank == 0:
            print(
                f"window {report.window:3d}  loss {loss.item():.4f}  sent {report.bytes_sent} B  "
                f"peers {','.join(report.peers)}  ranks {world}  "
                f"{time.monotonic() - started:.1f} s",
                flush=True,
            )

    per_rank = args.batch // world
    with OuterLoop(inner, outer, sync_every=args.sync_every, on_round=on_round):
        for step in range(args.steps):
            g = torch.Generator().manual_seed(seed(args.peer, step))
            ids = torch.randint(data.num_train, (args.batch,), generator=g).tolist()
            x, y = data.train_batch(ids[rank * per_rank : (rank + 1) * per_rank])
            _, loss = model(x.to(device), y.to(device))
            loss.backward()
            inner.step()
            inner.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    final = digest(model)
    if rank == 0:
        print(f"done: window {outer.window}, storage {args.storage}, params sha256 {final}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:
        leave_rank()  # see its docstring: gloo can abort a rank that finalizes
