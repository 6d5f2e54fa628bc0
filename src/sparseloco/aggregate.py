"""Aggregation of many peers' updates into one dense update per tensor (REFERENCE §1 step 10).

With peers sorted by id (so the result does not depend on arrival order) and decoded values
vᵢ of one tensor:

* median-norm clipping (optional): vᵢ ← vᵢ · min(1, median_j ‖v_j‖ / ‖vᵢ‖);
* ``"mean_selected"``: each coordinate is Σᵢ vᵢ / (number of peers that sent it);
* ``"mean"``: Σᵢ vᵢ / R over all R peers (the paper's (1/R)·Σ).

Dense updates (DiLoCo, data-parallel) are averaged the same way, as plain means.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from sparseloco.codec import CompressedUpdate, decode_sparse
from sparseloco.errors import CodecMismatchError, ShapeMismatchError, UpdateError
from sparseloco.kernels import aggregate_sparse
from sparseloco.kernels.reference import clip_factors
from sparseloco.payload import DenseUpdate


def _sorted_peers(updates: Mapping[str, object]) -> list[str]:
    if not updates:
        raise UpdateError("nothing to aggregate: no updates")
    return sorted(updates)


def iter_aggregate(
    updates: Mapping[str, CompressedUpdate],
    *,
    reducer: str = "mean_selected",
    clip_to_median: bool = True,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, dense float32 aggregate) per tensor, in sorted name order."""
    peers = _sorted_peers(updates)
    first = updates[peers[0]]
    for peer in peers[1:]:
        other = updates[peer]
        if other.codec.wire_fields() != first.codec.wire_fields():
            raise CodecMismatchError(f"peer {peer} used a different codec config")
        if {n: t.shape for n, t in other.tensors.items()} != {
            n: t.shape for n, t in first.tensors.items()
        }:
            raise ShapeMismatchError(f"peer {peer} sent different tensor names or shapes")
    for name in sorted(first.tensors):
        records = []
        layout = None
        for peer in peers:
            ct = updates[peer].tensors[name]
            if device is not None:
                ct = ct.to(device)
            layout, idx, values = decode_sparse(name, ct, first.codec)
            records.append((idx, values))
        assert layout is not None
        yield (
            name,
            aggregate_sparse(
                layout, records, reducer=reducer, clip_to_median=clip_to_median, backend=backend
            ),
        )


def aggregate(
    updates: Mapping[str, CompressedUpdate],
    *,
    reducer: str = "mean_selected",
    clip_to_median: bool = True,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """All tensors of :func:`iter_aggregate` as a dict."""
    return dict(
        iter_aggregate(
            updates, reducer=reducer, clip_to_median=clip_to_median, device=device, backend=backend
        )
    )


def iter_aggregate_dense(
    updates: Mapping[str, DenseUpdate],
    *,
    clip_to_median: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 mean over peers) per tensor, peers summed in sorted id order."""
    peers = _sorted_peers(updates)
    names = sorted(updates[peers[0]].tensors)
    for name in names:
        values = []
        for peer in peers:
            t = updates[peer].tensors.get(name)
            if t is None:
                raise ShapeMismatchError(f"peer {peer} sent no tensor {name}")
            values.append(t.to(device=device, dtype=torch.float32))
        if any(v.shape != values[0].shape for v in values):
            raise ShapeMismatchError("peers sent different shapes", tensor=name)
        factors = [1.0] * len(values)
        if clip_to_median:
            factors = clip_factors(
                [float(torch.linalg.vector_norm(v.to(torch.float64))) for v in values]
            )
        total = torch.zeros_like(values[0])
        for v, f in zip(values, factors, strict=True):
            total.add_(v, alpha=f) if f != 1.0 else total.add_(v)
        yield name, total.div_(len(values))
