"""Triton kernels of the compress path (REFERENCE §1 steps 3–8), one job per kernel.

The host side (:mod:`sparseloco.kernels.triton_codec`) runs them in this order:

1. :func:`select_kernel`, per chunk (a row of ``n`` entries of the chunked error buffer):

       w = fl(fl(e·β) + Δ)                  two rounded fp32 operations, never an FMA
       T = max{t : #{j : bits|w_j| ≥ t} ≥ k}  (bitwise binary search, 31 steps)
       I = {j : bits|w_j| > T} ∪ first (k − #{bits > T}) of {j : bits|w_j| = T}

   The bits of |w| (sign cleared) order like |w| for finite floats, so T is the k-th largest
   magnitude and the set I is the exact top-k with ties going to the lower index. A cumsum
   of the selection mask gives every kept entry its output slot, so indices come out
   ascending. The kernel writes I (int16: chunks have at most 8192 entries), v = w[I] and
   the whole updated row w back into e.
2. μ and s come from :func:`sparseloco.quantize.quant_scale` on v (torch, float64 sums),
   so they are the reference's bits.
3. :func:`codes_kernel`: q = clamp(round_half_even(c ⊘ s + L/2), 0, L−1), c = v ⊖ μ with an
   IEEE division (``div_rn``), written unpacked (for the table) and packed 8/b per byte.
4. The table comes from :func:`sparseloco.quantize.centroid_table` (torch).
5. :func:`scatter_pack_kernel`: e[I] ← v ⊖ table[q] and the 12- or 16-bit index packing.

A bfloat16 error buffer is read and written through an int16 view: widening is a shift and
narrowing is done with integer round-to-nearest-even, so the bits equal torch's ``.to`` on
every platform (Triton's CPU interpreter truncates on fp32→bf16 casts).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Whether these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


@triton.jit
def bf16_bits_to_f32(h):
    """int16 bfloat16 bits → float32 (exact: a bf16 is the top half of an fp32)."""
    return (h.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_bits(x):
    """float32 → int16 bfloat16 bits, rounded to nearest even like ``torch.Tensor.to``."""
    b = x.to(tl.int32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16)


@triton.jit
def tile_offsets(chunk, local, tiles_across, tile_rows, tile_cols, cols):
    """Row-major offset in the original tensor of in-chunk index ``local`` of ``chunk``."""
    tr = chunk // tiles_across
    tc = chunk % tiles_across
    r = tr * tile_rows + local // tile_cols
    return r * cols + tc * tile_cols + local % tile_cols


@triton.jit
def select_kernel(
    delta_ptr,
    err_ptr,
    idx_ptr,
    val_ptr,
    num_chunks,
    n,
    k,
    tiles_across,
    tile_rows,
    tile_cols,
    cols,
    beta,
    DELTA_BF16: tl.constexpr,
    ERR_BF16: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Error-feedback update, exact top-k selection and value gather for ROWS chunks."""
    chunk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    pos = tl.arange(0, BLOCK)
    row_ok = chunk < num_chunks
    mask = row_ok[:, None] & (pos < n)[None, :]

    d_off = tile_offsets(chunk[:, None], pos[None, :], tiles_across, tile_rows, tile_cols, cols)
    if DELTA_BF16:
        d = bf16_bits_to_f32(tl.load(delta_ptr + d_off, mask=mask, other=0))
    else:
        d = tl.load(delta_ptr + d_off, mask=mask, other=0).to(tl.float32)
    e_off = chunk[:, None] * n + pos[None, :]
    if ERR_BF16:
        e = bf16_bits_to_f32(tl.load(err_ptr + e_off, mask=mask, other=0))
    else:
        e = tl.load(err_ptr + e_off, mask=mask, other=0.0)
    # The launch disables fp fusion, so these stay two roundings as in the reference.
    w = e * beta
    w = w + d

    # Padding lanes get -1, below every candidate threshold (thresholds are >= 0).
    bits = tl.where(mask, w.to(tl.int32, bitcast=True) & 0x7FFFFFFF, -1)
    thr = tl.zeros([ROWS], dtype=tl.int32)
    for b in tl.static_range(30, -1, -1):
        cand = thr | (1 << b)
        cnt = tl.sum((bits >= cand[:, None]).to(tl.int32), axis=1)
        thr = tl.where(cnt >= k, cand, thr)

    above = bits > thr[:, None]
    need = k - tl.sum(above.to(tl.int32), axis=1)
    tie = bits == thr[:, None]
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=1)
    sel = above | (tie & (tie_rank <= need[:, None]))
    slot = tl.cumsum(sel.to(tl.int32), axis=1) - 1
    out_off = chunk[:, None] * k + slot
    tl.store(
        idx_ptr + out_off, (pos[None, :] + tl.zeros([ROWS, BLOCK], tl.int32)).to(tl.int16), mask=sel
    )
    tl.store(val_ptr + out_off, w, mask=sel)

    if ERR_BF16:
        tl.store(err_ptr + e_off, f32_to_bf16_bits(w), mask=mask)
    else:
        tl.store(err_ptr + e_off, w, mask=mask)


@triton.jit
def codes_kernel(
    val_ptr,
    stats_ptr,
    codes_ptr,
    packed_ptr,
    count,
    nbytes,
    LEVELS: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Quantization codes of BLOCK·(8/BITS) kept values, unpacked and packed (first code low).

    ``stats_ptr`` holds (μ, s). s = 0 means every code is L/2, as in the reference.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    lane = tl.arange(0, PER_BYTE)
    j = byte[:, None] * PER_BYTE + lane[None, :]
    m = j < count
    v = tl.load(val_ptr + j, mask=m, other=0.0)
    mu = tl.load(stats_ptr)
    s = tl.load(stats_ptr + 1)
    t = tl.math.div_rn(v - mu, tl.where(s == 0.0, 1.0, s)) + (LEVELS // 2)
    # Clamping before rounding does not change clamp(round(t)) and keeps t small, so
    # t − floor(t) is exact and the half-even test below is the IEEE rounding.
    t = tl.minimum(tl.maximum(t, -1.0), LEVELS * 1.0)
    f = tl.floor(t)
    frac = t - f
    fi = f.to(tl.int32)
    q = fi + ((frac > 0.5) | ((frac == 0.5) & ((fi & 1) == 1))).to(tl.int32)
    q = tl.minimum(tl.maximum(q, 0), LEVELS - 1)
    q = tl.where(s == 0.0, LEVELS // 2, q)
    q = tl.where(m, q, 0)
    tl.store(codes_ptr + j, q.to(tl.uint8), mask=m)
    packed = tl.sum(q << (lane[None, :] * BITS), axis=1)
    tl.store(packed_ptr + byte, packed.to(tl.uint8), mask=byte < nbytes)


@triton.jit
def scatter_pack_kernel(
    idx_ptr,
    val_ptr,
    codes_ptr,
    table_ptr,
    err_ptr,
    packed_ptr,
    count,
    k,
    n,
    ERR_BF16: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Residual write-back e[I] ← v ⊖ table[q] and index packing for BLOCK pairs of entries.

    INDEX_BITS 12: pair (a, b) → ``a & 0xFF, (a >> 8) | (b & 0xF) << 4, b >> 4`` (an odd
    count pads b = 0); 16: two little-endian bytes each; 0: dense tensor, no indices.
    """
    pair = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    j = pair[:, None] * 2 + tl.arange(0, 2)[None, :]
    m = j < count
    i = tl.load(idx_ptr + j, mask=m, other=0).to(tl.int32)
    v = tl.load(val_ptr + j, mask=m, other=0.0)
    q = tl.load(codes_ptr + j, mask=m, other=0).to(tl.int32)
    res = v - tl.load(table_ptr + q, mask=m, other=0.0)
    e_off = (j // k) * n + i
    if ERR_BF16:
        tl.store(err_ptr + e_off, f32_to_bf16_bits(res), mask=m)
    else:
        tl.store(err_ptr + e_off, res, mask=m)

    if INDEX_BITS == 12:
        a, b = tl.split(i)
        out = packed_ptr + pair * 3
        pm = pair * 2 < count
        tl.store(out, (a & 0xFF).to(tl.uint8), mask=pm)
        tl.store(out + 1, ((a >> 8) | ((b & 0xF) << 4)).to(tl.uint8), mask=pm)
        tl.store(out + 2, (b >> 4).to(tl.uint8), mask=pm)
    elif INDEX_BITS == 16:
        tl.store(packed_ptr + j * 2, (i & 0xFF).to(tl.uint8), mask=m)
        tl.store(packed_ptr + j * 2 + 1, (i >> 8).to(tl.uint8), mask=m)
