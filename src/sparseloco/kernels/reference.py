"""Exact PyTorch reference of the compress and decode+aggregate kernels; runs on any device.

This file *defines* the results: the Triton kernels must match it bit for bit on indices and
codes, and within float tolerance on floats. Work is done in blocks of chunks so temporaries
stay bounded (``BLOCK_ELEMENTS`` entries) whatever the tensor's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from sparseloco.chunking import ChunkLayout
from sparseloco.codec import CompressedTensor
from sparseloco.config import CodecConfig
from sparseloco.packing import best_rice_parameter, pack_codes, pack_indices, rice_encode
from sparseloco.quantize import (
    encode_values,
    magnitude_order,
    rank_bounds,
    rank_groups,
    rank_labels,
    ranked_decode,
    ranked_quantize,
)

BLOCK_ELEMENTS = 1 << 22


def topk_exact(x: torch.Tensor, k: int) -> torch.Tensor:
    """In-chunk indices of the k largest |x| per row, ties to the lower index, ascending.

    ``x`` is ``(rows, n)`` float32. Uses a sorted float top-(k+1): when the k-th and
    (k+1)-th magnitudes differ, the top-k set is unique and the float result is exact; rows
    where they tie are redone with an integer key (|x| bits, then reversed index) that has no
    ties. Indices are sorted as int32, which is much faster than int64 on CPU.
    """
    rows, n = x.shape
    if k >= n:
        return torch.arange(n, device=x.device).expand(rows, n).clone()
    mag = x.abs()
    vals, idx = torch.topk(mag, k + 1, dim=1, sorted=True)
    out = idx[:, :k].to(torch.int32)
    tied = vals[:, k - 1] == vals[:, k]
    if bool(tied.any()):
        rows_t = tied.nonzero().squeeze(1)
        bits = mag[rows_t].view(torch.int32).to(torch.int64)
        rev = torch.arange(n - 1, -1, -1, device=x.device, dtype=torch.int64)
        key = (bits << 16) | rev
        top = torch.topk(key, k, dim=1, sorted=False).values
        out[rows_t] = ((n - 1) - (top & 0xFFFF)).to(torch.int32)
    return out.sort(dim=1).values.to(torch.int64)


def _accumulated_blocks(
    delta: torch.Tensor, error: torch.Tensor, layout: ChunkLayout, beta: float
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Per block of chunks: (c0, c1, the buffer's rows, float32 β·e + Δ of them).

    A bfloat16 buffer is widened per block: the sum and the residual must each be rounded
    once, and the float32 scratch stays bounded. The caller writes the scratch back.
    """
    for start, stop in layout.blocks(BLOCK_ELEMENTS):
        c0, c1 = start * layout.tiles_across, stop * layout.tiles_across
        block = error[c0:c1]
        work = block if block.dtype == torch.float32 else block.float()
        tiles = work.view(stop - start, layout.tiles_across, layout.tile_rows, layout.tile_cols)
        tiles.mul_(beta).add_(layout.tile_view(delta, start, stop).to(torch.float32))
        yield c0, c1, block, work


def compress(
    delta: torch.Tensor, error: torch.Tensor, layout: ChunkLayout, config: CodecConfig
) -> CompressedTensor:
    """e ← β·e + Δ; per-chunk exact top-k of |e|; quantize; e[I] ← v − v̂; pack.

    ``error`` is the chunked buffer ``(num_chunks, chunk_numel)`` (float32 or bfloat16) and is
    updated in place. β·e + Δ is computed as two rounded float32 operations (no fused
    multiply-add), Δ converted to float32 first.
    """
    k = layout.k(config.topk)
    idx_blocks, val_blocks = [], []
    for _, _, block, work in _accumulated_blocks(delta, error, layout, float(config.error_decay)):
        idx = topk_exact(work, k)
        idx_blocks.append(idx)
        val_blocks.append(work.gather(1, idx))
        if work is not block:
            block.copy_(work)
    idx = torch.cat(idx_blocks) if idx_blocks else torch.empty(0, k, dtype=torch.int64)
    values = torch.cat(val_blocks) if val_blocks else torch.empty(0, k)
    idx, values, codes, table, decoded, labels = _quantize(idx, values, layout, config)
    error.scatter_(1, idx.to(error.device), (values - decoded).to(error.dtype))

    rice_param = 0
    gaps = torch.empty(0, dtype=torch.uint8)
    if layout.is_dense(config.topk):
        packed_idx = torch.empty(0, dtype=torch.uint8)
    elif config.index_coding == "packed":
        packed_idx = pack_indices(idx, config.index_bits)
    else:
        diffs = torch.diff(idx, dim=1, prepend=torch.full_like(idx[:, :1], -1)) - 1
        rice_param = best_rice_parameter(diffs, config.index_bits)
        gaps, packed_idx = rice_encode(diffs, rice_param, labels)
    return CompressedTensor(
        shape=layout.shape,
        indices=packed_idx.to(error.device),
        gaps=gaps.to(error.device),
        codes=pack_codes(codes, config.value_bits),
        table=table,
        rice_param=rice_param,
    )


def _quantize(
    idx: torch.Tensor, values: torch.Tensor, layout: ChunkLayout, config: CodecConfig
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None
]:
    """(indices and values in message order, int64 codes, table, v̂, rank-group labels), all
    ``(chunks, k)`` but the table. ``"ranked"`` ranks each chunk's entries by decreasing |v|;
    packed indices then go group by group (ascending inside a group), Rice-coded ones stay
    in index order with the labels u = G − 1 − g(rank) (None for every other coding)."""
    bits = config.value_bits
    if config.value_coding != "ranked":
        codes, table = encode_values(values.reshape(-1), bits, config.value_coding)
        codes = codes.view_as(values)
        return idx, values, codes, table, table[codes], None
    if layout.is_dense(config.topk):
        codes, table = ranked_quantize(values, bits, dense=True)
        return idx, values, codes, table, ranked_decode(codes, table, bits, dense=True), None
    k = values.shape[1]
    ranks = magnitude_order(values)
    groups = torch.empty_like(ranks).scatter_(
        1, ranks, rank_groups(k, device=ranks.device).expand_as(ranks)
    )
    # The packed message: group by group, ascending inside a group (only the group decodes,
    # so the order inside one is free and made canonical); Rice keeps index order.
    by_group = torch.argsort(groups * layout.chunk_numel + idx, dim=1)
    codes, table = ranked_quantize(values.gather(1, by_group), bits)
    decoded = ranked_decode(codes, table, bits)
    if config.index_coding == "packed":
        return idx.gather(1, by_group), values.gather(1, by_group), codes, table, decoded, None
    codes, decoded = (torch.empty_like(t).scatter_(1, by_group, t) for t in (codes, decoded))
    labels = rank_labels(groups, k) if len(rank_bounds(k)) > 2 else None  # k ≤ 2: one group
    return idx, values, codes, table, decoded, labels


def subtract_decoded(
    delta: torch.Tensor,
    error: torch.Tensor,
    layout: ChunkLayout,
    config: CodecConfig,
    idx: torch.Tensor | None,
    values: torch.Tensor,
) -> None:
    """e ← β·e + Δ − D(m) in place, D(m) given as its decoded ``(indices or None, values)``.

    The roundings are :func:`compress`'s own: β·e + Δ as two float32 operations, v − v̂ at
    the kept entries in float32, one rounding to the buffer's dtype. D(m) is zero off the
    kept entries, so they keep β·e + Δ as it is. For the message ``compress`` returned, the
    buffer is therefore bit-identical to the one ``compress`` leaves (on every backend,
    since the Triton kernels match the reference's error buffer bit for bit).
    """
    for c0, c1, block, work in _accumulated_blocks(delta, error, layout, float(config.error_decay)):
        if idx is None:
            work.sub_(values[c0:c1])
        else:
            kept = idx[c0:c1]
            work.scatter_(1, kept, work.gather(1, kept).sub_(values[c0:c1]))
        if work is not block:
            block.copy_(work)


def median(values: Sequence[float]) -> float:
    """Median with the mean of the two middle values for an even count."""
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median of no values")
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])


def clip_factors(norms: Sequence[float]) -> list[float]:
    """min(1, median/‖vᵢ‖) per peer (1 for a zero norm)."""
    med = median(norms)
    return [1.0 if n <= med or n == 0.0 else med / n for n in norms]


def aggregate_sparse(
    layout: ChunkLayout,
    peers: Sequence[tuple[torch.Tensor | None, torch.Tensor]],
    *,
    reducer: str,
    clip_to_median: bool,
) -> torch.Tensor:
    """Combine peers' decoded ``(indices, values)`` for one tensor into a dense float32 tensor.

    With peers p = 0..P−1 in the given order (callers sort by peer id), clip factors f_p and
    records (I_p, v_p), per coordinate j:

        S[j] = ((0 + f_0·v_0[j]) + f_1·v_1[j]) + …    (float32, only peers with j ∈ I_p)
        C[j] = #{p : j ∈ I_p}
        out[j] = S[j] / max(C[j], 1)   ("mean_selected")   or   S[j] / P   ("mean")

    The tensor is done one block of whole tile rows at a time (``AGGREGATE_BLOCK_ELEMENTS``
    entries, so the block's sums and counts stay in cache): in chunked layout, one
    ``scatter_add_`` per peer (a peer's indices are distinct within each chunk, so every
    coordinate still receives its peers' terms one at a time in peer order, with no atomics
    on any device: the roundings of a per-peer flat ``index_add_``), then the division and
    one strided copy of the block into the output. Each block reaches memory once, where
    whole-tensor passes would move the 4·numel-byte sums in and out of memory per peer and
    per step (``benchmarks/codec.py`` times both). Counts are exact integers.
    """
    factors = [1.0] * len(peers)
    if clip_to_median:
        norms = [float(torch.linalg.vector_norm(v.to(torch.float64))) for _, v in peers]
        factors = clip_factors(norms)
    contribs = [
        (idx, values * f if f != 1.0 else values)
        for (idx, values), f in zip(peers, factors, strict=True)
    ]
    device = peers[0][1].device
    out = torch.empty(layout.numel, dtype=torch.float32, device=device)
    dest = out.view(layout.tiles_down, layout.tile_rows, layout.tiles_across, layout.tile_cols)
    blocks = list(layout.blocks(AGGREGATE_BLOCK_ELEMENTS))
    rows = max((stop - start for start, stop in blocks), default=0) * layout.tiles_across
    sums = torch.empty(rows, layout.chunk_numel, dtype=torch.float32, device=device)
    counts = (
        None if reducer == "mean" else _CountBuffer(rows, layout.chunk_numel, len(peers), device)
    )
    for start, stop in blocks:
        c0, c1 = start * layout.tiles_across, stop * layout.tiles_across
        total = sums[: c1 - c0].zero_()
        for idx, contrib in contribs:
            if idx is None:
                total.add_(contrib[c0:c1])
            else:
                total.scatter_add_(1, idx[c0:c1], contrib[c0:c1])
        if counts is None:
            total.div_(len(peers))
        else:
            total.div_(counts.of_block([idx for idx, _ in peers], c0, c1).clamp_min_(1))
        tiles = total.view(stop - start, layout.tiles_across, layout.tile_rows, layout.tile_cols)
        dest[start:stop].copy_(tiles.permute(0, 2, 1, 3))
    return out.view(layout.shape)


# Entries per aggregation block: 4 MiB of float32 sums plus 1 MiB of counts, sized to stay in
# a CPU's cache while every peer's terms are added.
AGGREGATE_BLOCK_ELEMENTS = 1 << 20


class _CountBuffer:
    """C[j] = number of peers whose record holds j, for one block of chunk rows at a time.

    Counted in uint8 while fewer than 256 peers can collide (a uint8 scatter is ~4× cheaper
    than a float32 one on CPU), else int32; integer counts do not depend on the order of
    additions. Dividing float32 sums by them converts each count to float32 exactly.
    """

    def __init__(self, rows: int, chunk_numel: int, peers: int, device: torch.device) -> None:
        dtype = torch.uint8 if peers < 256 else torch.int32
        self.buffer = torch.zeros(rows, chunk_numel, dtype=dtype, device=device)
        self.one = torch.ones((), dtype=dtype, device=device)

    def of_block(self, indices: Sequence[torch.Tensor | None], c0: int, c1: int) -> torch.Tensor:
        count = self.buffer[: c1 - c0].zero_()
        for idx in indices:
            if idx is None:
                count.add_(1)
            else:
                count.scatter_add_(1, idx[c0:c1], self.one.expand(c1 - c0, idx.shape[1]))
        return count
