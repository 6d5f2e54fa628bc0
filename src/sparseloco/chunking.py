"""Chunk geometry: how a tensor of any shape is cut into the chunks top-k works on.

A tensor is first viewed as 2-D, ``(rows, cols)``:

* N-D (N ≥ 2): ``(shape[0], prod(shape[1:]))``;
* 1-D ``(n,)``: ``(1, n)``; 0-D: ``(1, 1)``.

Each dimension d is then tiled by its largest divisor ≤ S (the chunk size), so a 4096×11008
weight with S=64 becomes 64×64 tiles, a 50257-row embedding uses 29-row tiles, and a 1-D
tensor is cut into rows of up to S entries. Chunks are numbered tile-row-major; inside a
chunk an entry's index is ``r·tile_cols + c`` (row-major inside the tile).

The error-feedback buffer of a tensor is kept in this chunked layout,
``(num_chunks, chunk_numel)`` contiguous, so selection never needs a full-size copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is ≤ ``limit`` (1 when ``n`` is 0 or prime > limit)."""
    if n <= 0:
        return 1
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


@dataclass(frozen=True)
class ChunkLayout:
    """The chunking of one tensor shape for a given chunk size."""

    shape: tuple[int, ...]
    rows: int
    cols: int
    tile_rows: int
    tile_cols: int

    @classmethod
    def for_shape(cls, shape: torch.Size | tuple[int, ...], chunk_size: int) -> ChunkLayout:
        shape = tuple(int(s) for s in shape)
        if len(shape) == 0:
            rows, cols = 1, 1
        elif len(shape) == 1:
            rows, cols = 1, shape[0]
        else:
            rows, cols = shape[0], math.prod(shape[1:])
        return cls(
            shape=shape,
            rows=rows,
            cols=cols,
            tile_rows=largest_divisor_at_most(rows, chunk_size),
            tile_cols=largest_divisor_at_most(cols, chunk_size),
        )

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def tiles_down(self) -> int:
        return self.rows // self.tile_rows if self.rows else 0

    @property
    def tiles_across(self) -> int:
        return self.cols // self.tile_cols if self.cols else 0

    @property
    def num_chunks(self) -> int:
        return self.tiles_down * self.tiles_across

    @property
    def chunk_numel(self) -> int:
        return self.tile_rows * self.tile_cols

    @property
    def buffer_shape(self) -> tuple[int, int]:
        """Shape of a tensor held in chunked layout."""
        return (self.num_chunks, self.chunk_numel)

    def k(self, topk: int) -> int:
        """Entries kept per chunk: ``min(topk, chunk_numel)``."""
        return min(topk, self.chunk_numel)

    def is_dense(self, topk: int) -> bool:
        """Every entry is kept, so no indices need to be stored."""
        return self.k(topk) == self.chunk_numel

    def tile_view(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A strided view of tile-rows ``[start, stop)`` of ``x`` shaped like chunked layout.

        The result has shape ``(stop-start, tiles_across, tile_rows, tile_cols)`` and shares
        memory with ``x``; it is what a ``(chunks, chunk_numel)`` block looks like after
        ``.view(stop-start, tiles_across, tile_rows, tile_cols)``.
        """
        stop = self.tiles_down if stop is None else stop
        x2 = x.reshape(self.rows, self.cols)
        rows = x2[start * self.tile_rows : stop * self.tile_rows]
        return rows.view(stop - start, self.tile_rows, self.tiles_across, self.tile_cols).permute(
            0, 2, 1, 3
        )

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` copied into chunked layout ``(num_chunks, chunk_numel)``."""
        return self.tile_view(x).reshape(self.buffer_shape)

    def from_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_chunks`: a tensor of the original shape."""
        t = chunks.reshape(self.tiles_down, self.tiles_across, self.tile_rows, self.tile_cols)
        return t.permute(0, 2, 1, 3).reshape(self.shape)

    def flat_positions(self, local: torch.Tensor) -> torch.Tensor:
        """Row-major positions in the original tensor of in-chunk indices ``(num_chunks, k)``."""
        chunk = torch.arange(self.num_chunks, device=local.device).unsqueeze(1)
        tile_r, tile_c = chunk // self.tiles_across, chunk % self.tiles_across
        r = tile_r * self.tile_rows + local // self.tile_cols
        c = tile_c * self.tile_cols + local % self.tile_cols
        return r * self.cols + c

    def blocks(self, max_elements: int) -> Iterator[tuple[int, int]]:
        """Tile-row ranges ``[start, stop)`` of at most ``max_elements`` entries (≥ 1 row)."""
        per_row = self.tiles_across * self.chunk_numel
        step = max(1, max_elements // max(per_row, 1))
        for start in range(0, self.tiles_down, step):
            yield start, min(start + step, self.tiles_down)
