"""Triton kernel of decode + aggregate (REFERENCE §1 step 10): many peers → one dense tensor.

Per chunk, with peers p = 0..P−1 in the caller's order, clip factors f_p (fp32) and decoded
records (I_p, v_p):

    S[j] = (((0 ⊕ f_0·v_0[j]) ⊕ f_1·v_1[j]) ⊕ …)    only over peers with j ∈ I_p
    C[j] = #{p : j ∈ I_p}
    out[j] = S[j] ⊘ max(C[j], 1)   ("mean_selected")   or   S[j] ⊘ P   ("mean")

One program owns a chunk at a time and adds the peers in order, so the result is the
reference's sequence of roundings: deterministic and atomic-free. The k kept entries of a
peer are added with a gather/add/scatter on the chunk's slice of the output (it stays in
L1/L2), with a barrier between peers; since a peer's indices are distinct, no two lanes
touch the same entry within one step. Counts live in a per-program scratch row, so the
programs are persistent (a strided loop over chunks) and the scratch is
``programs × ROWS × BLOCK`` floats whatever the tensor size. Peers are passed as tables
of raw addresses, so nothing is stacked or copied.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparseloco.kernels.triton_compress import tile_offsets


@triton.jit
def aggregate_kernel(
    out_ptr,
    count_ptr,
    idx_addrs,
    val_addrs,
    factors_ptr,
    num_peers,
    num_chunks,
    n,
    k,
    tiles_across,
    tile_rows,
    tile_cols,
    cols,
    MEAN_SELECTED: tl.constexpr,
    DENSE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    KBLOCK: tl.constexpr,
):
    """Sum of clipped peer contributions per chunk, divided by counts or by P."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * ROWS
    local = tl.arange(0, ROWS).to(tl.int64)
    pos = tl.arange(0, BLOCK)
    slot = tl.arange(0, KBLOCK)
    scratch = count_ptr + (pid * ROWS + local)[:, None] * BLOCK
    for c0 in range(pid * ROWS, num_chunks, step):
        chunk = c0 + local
        row_ok = chunk < num_chunks
        dm = row_ok[:, None] & (pos < n)[None, :]
        dense_off = tile_offsets(
            chunk[:, None], pos[None, :], tiles_across, tile_rows, tile_cols, cols
        )
        tl.store(out_ptr + dense_off, tl.zeros([ROWS, BLOCK], tl.float32), mask=dm)
        if MEAN_SELECTED:
            tl.store(scratch + pos[None, :], tl.zeros([ROWS, BLOCK], tl.float32), mask=dm)
        tl.debug_barrier()

        km = row_ok[:, None] & (slot < k)[None, :]
        rec = chunk[:, None] * k + slot[None, :]
        for p in range(num_peers):
            vals = tl.load(val_addrs + p).to(tl.pointer_type(tl.float32))
            f = tl.load(factors_ptr + p)
            if DENSE:
                i = slot[None, :] + tl.zeros([ROWS, KBLOCK], tl.int32)
            else:
                idx = tl.load(idx_addrs + p).to(tl.pointer_type(tl.int64))
                i = tl.load(idx + rec, mask=km, other=0).to(tl.int32)
            contrib = tl.load(vals + rec, mask=km, other=0.0) * f
            off = tile_offsets(chunk[:, None], i, tiles_across, tile_rows, tile_cols, cols)
            acc = tl.load(out_ptr + off, mask=km, other=0.0)
            tl.store(out_ptr + off, acc + contrib, mask=km)
            if MEAN_SELECTED:
                cnt = tl.load(scratch + i, mask=km, other=0.0)
                tl.store(scratch + i, cnt + 1.0, mask=km)
            tl.debug_barrier()

        total = tl.load(out_ptr + dense_off, mask=dm, other=0.0)
        if MEAN_SELECTED:
            cnt = tl.load(scratch + pos[None, :], mask=dm, other=0.0)
            total = tl.math.div_rn(total, tl.maximum(cnt, 1.0))
        else:
            total = tl.math.div_rn(total, num_peers * 1.0)
        tl.store(out_ptr + dense_off, total, mask=dm)
        # The next chunk reuses the scratch row; no lane may zero it before all have read.
        tl.debug_barrier()
