"""Triton backend of the codec: same contracts and results as :mod:`.reference`.

:func:`compress` runs the kernels of :mod:`.triton_compress` with the two per-tensor steps
that need every kept value in between done by the reference's own torch functions
(``quant_scale`` for μ and s, ``centroid_table`` for the decode table), so those floats are
the reference's bits. Rice index coding (``index_coding="rice"``) stays on the torch/numpy
path of :mod:`sparseloco.packing`, applied to the kernel's indices.

:func:`aggregate_sparse` computes the median-norm clip factors with the reference's
float64 norms and runs :mod:`.triton_aggregate` over all peers at once.

Exactness: indices, codes and packed bytes equal the reference bit for bit; so do the
updated error buffer, the values and the aggregate, because every float step is the same
IEEE operation in the same order (no FMA, ``div_rn``, round-half-even done with integers).

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on
CPU tensors in Triton's interpreter; there each program handles many chunks at once,
because the interpreter's cost grows with the number of programs, not their width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

from sparseloco.chunking import ChunkLayout
from sparseloco.codec import CompressedTensor
from sparseloco.config import CodecConfig
from sparseloco.errors import BackendUnavailableError, UpdateError
from sparseloco.kernels.reference import clip_factors
from sparseloco.kernels.triton_aggregate import aggregate_kernel
from sparseloco.kernels.triton_compress import (
    INTERPRETED,
    codes_kernel,
    scatter_pack_kernel,
    select_kernel,
)
from sparseloco.packing import (
    best_rice_parameter,
    packed_code_nbytes,
    packed_index_nbytes,
    rice_encode,
)
from sparseloco.quantize import centroid_table, quant_scale

# Entries one interpreted program works on; numpy does the work in wide vector steps.
_INTERPRET_ELEMENTS = 1 << 16
# Flat entries (kept values, packed bytes or index pairs) per program of the flat kernels.
_FLAT_BLOCK = 1 << 14 if INTERPRETED else 1024


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter."""
    return INTERPRETED


def _rows_per_program(block: int, num_chunks: int) -> int:
    """Chunks per program: 1 on a GPU (a 4096-entry chunk fills a program), many when
    interpreted."""
    if not INTERPRETED:
        return 1
    rows = max(1, _INTERPRET_ELEMENTS // block)
    return min(rows, triton.next_power_of_2(max(num_chunks, 1)))


def num_warps_for(elements: int) -> int:
    """Warps for a program holding ``elements`` entries: about 16 per thread, 1 to 16 warps."""
    return max(1, min(16, elements // 512))


def compress(
    delta: torch.Tensor, error: torch.Tensor, layout: ChunkLayout, config: CodecConfig
) -> CompressedTensor:
    """e ← β·e + Δ; per-chunk exact top-k of |e|; quantize; e[I] ← v − v̂; pack.

    Same contract as :func:`sparseloco.kernels.reference.compress`: ``error`` is the
    contiguous chunked buffer (float32 or bfloat16), updated in place; ``delta`` has the
    tensor's shape and any float dtype.
    """
    if config.value_coding != "uniform":
        raise BackendUnavailableError(
            f"the Triton compress kernel implements value_coding='uniform' only, not "
            f"{config.value_coding!r}; use backend='torch' or 'auto'"
        )
    if error.dtype not in (torch.float32, torch.bfloat16) or not error.is_contiguous():
        raise UpdateError(
            f"triton compress needs a contiguous float32/bfloat16 error buffer, got "
            f"{error.dtype} (contiguous={error.is_contiguous()})"
        )
    device = error.device
    num_chunks, n, k = layout.num_chunks, layout.chunk_numel, layout.k(config.topk)
    count = num_chunks * k
    levels, bits = config.levels, config.value_bits
    delta_bf16 = delta.dtype == torch.bfloat16
    src = delta.contiguous()
    src = src.view(torch.int16) if delta_bf16 else src
    err_bf16 = error.dtype == torch.bfloat16
    err = error.view(torch.int16) if err_bf16 else error

    idx = torch.empty((num_chunks, k), dtype=torch.int16, device=device)
    values = torch.empty((num_chunks, k), dtype=torch.float32, device=device)
    if num_chunks:
        block = triton.next_power_of_2(n)
        rows = _rows_per_program(block, num_chunks)
        select_kernel[(triton.cdiv(num_chunks, rows),)](
            src,
            err,
            idx,
            values,
            num_chunks,
            n,
            k,
            layout.tiles_across,
            layout.tile_rows,
            layout.tile_cols,
            layout.cols,
            float(config.error_decay),
            DELTA_BF16=delta_bf16,
            ERR_BF16=err_bf16,
            ROWS=rows,
            BLOCK=block,
            num_warps=num_warps_for(block),
            enable_fp_fusion=False,
        )

    flat = values.view(-1)
    mu, scale = quant_scale(flat, levels)
    codes = torch.empty(count, dtype=torch.uint8, device=device)
    packed_codes = torch.empty(packed_code_nbytes(count, bits), dtype=torch.uint8, device=device)
    if count:
        codes_kernel[(triton.cdiv(packed_codes.numel(), _FLAT_BLOCK),)](
            flat,
            torch.stack([mu, scale]),
            codes,
            packed_codes,
            count,
            packed_codes.numel(),
            LEVELS=levels,
            BITS=bits,
            BLOCK=_FLAT_BLOCK,
            num_warps=4,
            enable_fp_fusion=False,
        )
    table = centroid_table(flat, codes.long(), mu, scale, levels)

    dense = layout.is_dense(config.topk)
    packed = not dense and config.index_coding == "packed"
    index_bits = config.index_bits if packed else 0
    packed_idx = torch.empty(
        packed_index_nbytes(count, index_bits) if index_bits else 0,
        dtype=torch.uint8,
        device=device,
    )
    if count:
        scatter_pack_kernel[(triton.cdiv(count, 2 * _FLAT_BLOCK),)](
            idx,
            values,
            codes,
            table,
            err,
            packed_idx,
            count,
            k,
            n,
            ERR_BF16=err_bf16,
            INDEX_BITS=index_bits,
            BLOCK=_FLAT_BLOCK,
            num_warps=4,
            enable_fp_fusion=False,
        )

    rice_param = 0
    gaps = torch.empty(0, dtype=torch.uint8, device=device)
    if not dense and not packed:
        # Rice coding is serial bit work; it runs in torch/numpy on the kernel's indices.
        idx64 = idx.long()
        diffs = torch.diff(idx64, dim=1, prepend=torch.full_like(idx64[:, :1], -1)) - 1
        rice_param = best_rice_parameter(diffs, config.index_bits)
        unary, remainder = rice_encode(diffs, rice_param)
        gaps, packed_idx = unary.to(device), remainder.to(device)
    return CompressedTensor(
        shape=layout.shape,
        indices=packed_idx,
        gaps=gaps,
        codes=packed_codes,
        table=table,
        rice_param=rice_param,
    )


def _max_programs(device: torch.device) -> int:
    """Persistent grid size: enough programs to fill the GPU several times over."""
    if INTERPRETED:
        return 4
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def aggregate_sparse(
    layout: ChunkLayout,
    peers: Sequence[tuple[torch.Tensor | None, torch.Tensor]],
    *,
    reducer: str,
    clip_to_median: bool,
) -> torch.Tensor:
    """Same contract as :func:`sparseloco.kernels.reference.aggregate_sparse`.

    ``peers`` holds ``(indices (num_chunks, k) or None when dense, values (num_chunks, k))``
    per peer, all on one device, summed in the given order.
    """
    if not peers:
        raise UpdateError("nothing to aggregate: no peers")
    device = peers[0][1].device
    dense = peers[0][0] is None
    if any((idx is None) != dense for idx, _ in peers):
        raise UpdateError("peers mix dense and sparse records for one tensor")
    factors = [1.0] * len(peers)
    if clip_to_median:
        norms = [float(torch.linalg.vector_norm(v.to(torch.float64))) for _, v in peers]
        factors = clip_factors(norms)
    out = torch.empty(layout.numel, dtype=torch.float32, device=device)
    num_chunks, n = layout.num_chunks, layout.chunk_numel
    if num_chunks == 0:
        return out.view(layout.shape)
    k = peers[0][1].shape[-1]
    # The kernel reads the peers through their addresses; these lists keep them alive.
    vals = [v.to(torch.float32).contiguous() for _, v in peers]
    idxs = [vals[0]] * len(peers) if dense else [i.to(torch.int64).contiguous() for i, _ in peers]
    for i, v in zip(idxs, vals, strict=True):
        if tuple(v.shape) != (num_chunks, k) or tuple(i.shape) != (num_chunks, k):
            raise UpdateError(
                f"peer records must be ({num_chunks}, {k}), got {tuple(i.shape)} {tuple(v.shape)}"
            )
    val_addrs = torch.tensor([v.data_ptr() for v in vals], dtype=torch.int64, device=device)
    idx_addrs = torch.tensor([i.data_ptr() for i in idxs], dtype=torch.int64, device=device)
    block = triton.next_power_of_2(n)
    rows = _rows_per_program(block, num_chunks)
    grid = min(triton.cdiv(num_chunks, rows), _max_programs(device))
    mean_selected = reducer != "mean"
    scratch = torch.empty(
        (grid * rows, block) if mean_selected else (1,),
        dtype=torch.float32,
        device=device,
    )
    aggregate_kernel[(grid,)](
        out,
        scratch,
        idx_addrs,
        val_addrs,
        torch.tensor(factors, dtype=torch.float32, device=device),
        len(peers),
        num_chunks,
        n,
        k,
        layout.tiles_across,
        layout.tile_rows,
        layout.tile_cols,
        layout.cols,
        MEAN_SELECTED=mean_selected,
        DENSE=dense,
        ROWS=rows,
        BLOCK=block,
        KBLOCK=triton.next_power_of_2(k),
        num_warps=num_warps_for(block),
        # Software pipelining could hoist the next peer's gather above the barrier.
        num_stages=1,
        enable_fp_fusion=False,
    )
    return out.view(layout.shape)
