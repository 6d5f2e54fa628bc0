"""Small fixed-size sketches of decoded updates, for near-replay detection.

An exact content digest (:func:`gauntlet.decoding.content_digest`) misses an old update sent
again with one value changed by an ulp. A CountSketch keeps enough of an update's direction
to tell: every non-zero entry j of tensor n adds s(n, j)·v_j/‖v_n‖ to bucket h(n, j) of a
vector of ``dims`` floats (h and s from a public hash of (n, j)), and the sketch is
normalised to unit length. Each tensor enters at unit norm because the scorer evaluates each
tensor at its own reference length (:mod:`gauntlet.clipping`): an old update resent with one
tensor scaled up scores as the original did, and must sketch as it did too.

The sketches' dot product estimates the cosine of the two updates so normalised, with an
error of about 1/√dims for unrelated updates and exactly 1 for a copy with any tensor
rescaled. An honest peer's consecutive updates share coordinates through error feedback,
but their cosine stays far below a replay's.

Cost: O(non-zero entries) per update; memory ``dims`` floats per remembered update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from gauntlet.assignment import derive_seed

_PRIME = (1 << 31) - 1  # multipliers and offsets below it keep j·a + b inside int64


def _hash_params(name: str) -> tuple[int, int, int, int]:
    seed = derive_seed("gauntlet.sketch", name)
    a1, b1 = 1 + seed % (_PRIME - 1), (seed >> 31) % _PRIME
    seed2 = derive_seed("gauntlet.sketch.sign", name)
    a2, b2 = 1 + seed2 % (_PRIME - 1), (seed2 >> 31) % _PRIME
    return a1, b1, a2, b2


def update_sketch(dense: Mapping[str, torch.Tensor], dims: int = 256) -> list[float] | None:
    """The unit-length CountSketch of an update, each tensor at unit norm (tensors in sorted
    name order, float64 accumulation); None for an all-zero or non-finite update."""
    out = torch.zeros(dims, dtype=torch.float64)
    for name in sorted(dense):
        flat = dense[name].detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        idx = flat.nonzero().reshape(-1)
        if idx.numel() == 0:
            continue
        size = math.sqrt(math.fsum(v * v for v in flat[idx].tolist()))
        if size == 0.0 or not math.isfinite(size):
            return None
        a1, b1, a2, b2 = _hash_params(name)
        bucket = ((idx * a1 + b1) % _PRIME) % dims
        sign = (((idx * a2 + b2) % _PRIME) % 2) * 2 - 1
        out.index_add_(0, bucket, flat[idx] / size * sign.to(torch.float64))
    values = out.tolist()
    norm = math.sqrt(math.fsum(v * v for v in values))  # fsum: the same on every CPU
    if norm == 0.0 or not math.isfinite(norm):
        return None
    return [v / norm for v in values]


def sketch_cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Estimated cosine of the two sketched updates (their sketches' dot product)."""
    return math.fsum(x * y for x, y in zip(a, b, strict=True))
