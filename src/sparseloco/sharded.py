"""FSDP2 inside a peer: outer rounds over DTensor parameters, in global coordinates.

With ``fully_shard`` each rank of a peer holds a shard of every parameter (a ``DTensor``),
but what the peer publishes must not depend on how many ranks it has: a 1-, 2- or 4-rank peer
starting from the same state must send byte-identical payloads. The scheme is *owner ranks
with full tensors* (Templar's), not per-shard compression:

* Δ = θ₀ − θ is computed on the shards, then all-gathered (``full_tensor()``) one tensor at a
  time, so every rank briefly holds one full Δ;
* each parameter has one **owner** rank (greedy by size, the same on every rank) that holds its
  error buffer in the global chunk layout and encodes it exactly as an unsharded peer would;
  the compressed tensor is broadcast to the other ranks, so every rank has the whole payload;
* every rank aggregates each tensor in full (transient) and keeps its own shard of it; θ₀ and
  the momentum buffer stay sharded.

Why not compress each rank's shard: a shard boundary need not fall on a 64-row chunk boundary
(FSDP2 splits dim 0 in ``ceil(n/R)`` rows), the 2-bit quantisation statistics (mean, σ, bin
means) are per tensor, and the result would have to equal the unsharded one bit for bit; the
owner scheme gets that for free and needs no fallback for empty or misaligned shards. Its
cost: one all-gather of each tensor per round (the size of one FSDP forward all-gather), one
full tensor transient per rank, and error buffers summing to one model's worth per peer,
spread over the ranks. During a round each owner also keeps its new error buffers beside the
old ones until the commit (recomputing them from Δ would all-gather every tensor again), and
every rank its shard of every aggregate: with R ranks, 8/R bytes per parameter of transient
memory per rank where the unsharded peer needs 4 (``benchmarks/fsdp.py`` measures it).

Only 1-D device meshes are supported (``fully_shard`` over one process group).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from sparseloco.codec import CompressedTensor, CompressedUpdate
from sparseloco.config import CodecConfig
from sparseloco.errors import ConfigError
from sparseloco.ranks import broadcast_bytes
from sparseloco.serialization import dump_safetensors, load_safetensors


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter of a ``fully_shard``-ed module)."""
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t`` itself, or a DTensor's all-gathered value (a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` (equal on every rank) laid out like the DTensor ``like``; no communication.

    The shard is a copy, not a view, so ``whole`` is freed when the caller drops it (a view
    would keep every full aggregate alive until the round's commit)."""
    if not isinstance(like, DTensor):
        return whole
    mesh = like.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    local = replicated.redistribute(mesh, like.placements).to_local().clone()
    return DTensor.from_local(
        local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def to_layout(value: Any, like: Any) -> Any:
    """A saved full tensor as ``like`` holds it: its shard when ``like`` is a DTensor of the
    same global shape (``value`` equal on every rank); otherwise ``value`` unchanged."""
    if (
        isinstance(like, DTensor)
        and isinstance(value, torch.Tensor)
        and not isinstance(value, DTensor)
        and tuple(value.shape) == tuple(like.shape)
    ):
        return shard_like(value.to(like.device), like)
    return value


def mesh_group(params: list[tuple[str, torch.Tensor, Any]]) -> dist.ProcessGroup | None:
    """The process group of the sharded parameters (None when there are none)."""
    groups = set()
    for name, p, _ in params:
        if isinstance(p, DTensor):
            if p.device_mesh.ndim != 1:
                raise ConfigError(f"{name}: only 1-D device meshes are supported (fully_shard)")
            groups.add(p.device_mesh.get_group())
    if len(groups) > 1:
        raise ConfigError("sharded parameters must all live on one device mesh")
    return groups.pop() if groups else None


def owners(params: list[tuple[str, torch.Tensor, Any]], world: int) -> dict[str, int]:
    """Owner rank of each sharded parameter: largest first, each to the least-loaded rank."""
    load = [0] * world
    out = {}
    sharded = [(n, p) for n, p, _ in params if isinstance(p, DTensor)]
    for name, p in sorted(sharded, key=lambda np_: (-np_[1].numel(), np_[0])):
        rank = min(range(world), key=lambda r: (load[r], r))
        out[name] = rank
        load[rank] += p.numel()
    return out


def broadcast_compressed(
    name: str,
    ct: CompressedTensor | None,
    codec: CodecConfig,
    owner: int,
    group: dist.ProcessGroup,
    device: torch.device,
) -> bytes:
    """The owner's compressed tensor as canonical safetensors bytes, on every rank; ``b""``
    on every rank when the owner has none to send (its encoding failed)."""
    data = None
    if ct is not None:
        data = dump_safetensors(*CompressedUpdate(codec=codec, tensors={name: ct}).to_tensors())
    nccl = device if device.type == "cuda" else None
    return broadcast_bytes(data, dist.get_global_rank(group, owner), group, nccl)


def load_compressed(name: str, blob: bytes, device: torch.device) -> CompressedTensor:
    """The compressed tensor ``name`` of :func:`broadcast_compressed`'s bytes, on ``device``."""
    got = CompressedUpdate.from_tensors(*load_safetensors(bytearray(blob)))
    return got.tensors[name].to(device)


def whole_or_join(
    part: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`full` of ``part``; a rank that failed to compute ``part`` (``None``) joins the
    all-gather with zeros laid out like ``like`` and gets a result it must not use."""
    return full(part if part is not None else torch.zeros_like(like, dtype=dtype))
