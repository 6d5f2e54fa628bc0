"""Bit packing of in-chunk indices and quantization codes, and Rice coding of index gaps.

Layouts (all little-endian, byte streams as ``uint8`` tensors):

* 12-bit indices: two per three bytes. For a pair (a, b):
  ``byte0 = a & 0xFF``, ``byte1 = (a >> 8) | (b & 0xF) << 4``, ``byte2 = b >> 4``; an odd
  count is padded with one zero index.
* 16-bit indices: two bytes each, little-endian.
* b-bit codes (b ∈ {2, 4, 8}): 8/b per byte, the first code in the lowest bits.
* Rice code of gaps with parameter p (sorted indices i₀ < i₁ < … in a chunk have gaps
  g₀ = i₀, gⱼ = iⱼ − iⱼ₋₁ − 1): two streams, so decoding is vectorised. The *unary* stream
  holds, per gap, ``g >> p`` one-bits then a zero-bit; the *remainder* stream holds
  ``g & (2^p − 1)`` in p bits. Bits are packed LSB first. ``value_coding="ranked"`` appends
  each entry's rank-group label u to the unary stream after the gaps' quotients (u one-bits
  then a zero-bit, no remainder).
"""

from __future__ import annotations

import numpy as np
import torch

from sparseloco.errors import CorruptUpdateError


def packed_index_nbytes(count: int, bits: int) -> int:
    """Bytes used by ``count`` packed indices of ``bits`` (12 or 16) bits."""
    if bits == 12:
        return 3 * ((count + 1) // 2)
    return 2 * count


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2**bits (bits 12 or 16) into bytes."""
    flat = idx.reshape(-1).to(torch.int32)
    if bits == 16:
        out = torch.empty(flat.numel(), 2, dtype=torch.uint8, device=flat.device)
        out[:, 0] = flat & 0xFF
        out[:, 1] = flat >> 8
        return out.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    out = torch.empty(pairs.shape[0], 3, dtype=torch.uint8, device=flat.device)
    out[:, 0] = a & 0xFF
    out[:, 1] = (a >> 8) | ((b & 0xF) << 4)
    out[:, 2] = b >> 4
    return out.reshape(-1)


def unpack_indices(buf: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`; returns ``count`` int64 values."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise CorruptUpdateError("index buffer must be a 1-D uint8 tensor")
    if buf.numel() != packed_index_nbytes(count, bits):
        raise CorruptUpdateError(
            f"index buffer has {buf.numel()} bytes, expected "
            f"{packed_index_nbytes(count, bits)} for {count} {bits}-bit indices"
        )
    b = buf.to(torch.int64)
    if bits == 16:
        v = b.view(-1, 2)
        return v[:, 0] | (v[:, 1] << 8)
    t = b.view(-1, 3)
    out = torch.empty(t.shape[0], 2, dtype=torch.int64, device=buf.device)
    out[:, 0] = t[:, 0] | ((t[:, 1] & 0xF) << 8)
    out[:, 1] = (t[:, 1] >> 4) | (t[:, 2] << 4)
    flat = out.reshape(-1)
    if count % 2 and int(flat[count]):
        # one encoding per update: the pad index the writer adds is zero
        raise CorruptUpdateError("index buffer has a nonzero pad index")
    return flat[:count]


def packed_code_nbytes(count: int, bits: int) -> int:
    per_byte = 8 // bits
    return (count + per_byte - 1) // per_byte


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (bits 1, 2, 4 or 8) into bytes."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per_byte)
    out = groups[:, 0].clone()
    for j in range(1, per_byte):
        out |= groups[:, j] << (bits * j)
    return out


def unpack_codes(buf: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; returns ``count`` int64 codes."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise CorruptUpdateError("code buffer must be a 1-D uint8 tensor")
    if buf.numel() != packed_code_nbytes(count, bits):
        raise CorruptUpdateError(
            f"code buffer has {buf.numel()} bytes, expected "
            f"{packed_code_nbytes(count, bits)} for {count} {bits}-bit codes"
        )
    if bits == 8:
        return buf.to(torch.int64)
    check_code_padding(buf, bits, count)
    shifts = torch.arange(0, 8, bits, device=buf.device, dtype=torch.int64)
    out = (buf.to(torch.int64).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return out.reshape(-1)[:count]


def check_code_padding(buf: torch.Tensor, bits: int, count: int) -> None:
    """The unused high bits of the last code byte must be zero, as the writer leaves them."""
    used = (count * bits) % 8
    if used and int(buf[-1]) >> used:
        raise CorruptUpdateError("code buffer has nonzero pad bits")


def _pack_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def best_rice_parameter(gaps: torch.Tensor, max_param: int) -> int:
    """The p in ``[0, max_param]`` that minimises the Rice-coded size of ``gaps``."""
    if gaps.numel() == 0:
        return 0
    g = gaps.reshape(-1).to(torch.int64)
    params = torch.arange(max_param + 1, device=g.device)
    totals = (g.unsqueeze(0) >> params.unsqueeze(1)).sum(dim=1) + g.numel() * (params + 1)
    return int(torch.argmin(totals).item())


def rice_encode(
    gaps: torch.Tensor, p: int, tail: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rice-code non-negative ``gaps`` with parameter ``p``: (unary bytes, remainder bytes).

    ``tail`` (non-negative integers) is unary-coded after the gaps' quotients in the same
    unary stream, with no remainder (``value_coding="ranked"`` sends its rank groups there).
    """
    g = gaps.reshape(-1).to(torch.int64).cpu().numpy()
    q = g >> p
    if tail is not None:
        q = np.concatenate([q, tail.reshape(-1).to(torch.int64).cpu().numpy()])
    ends = np.cumsum(q + 1) - 1
    unary = np.ones(int(ends[-1]) + 1 if q.size else 0, dtype=np.uint8)
    unary[ends] = 0
    if p:
        rem = (g & ((1 << p) - 1)).astype(np.uint16)
        rem_bits = ((rem[:, None] >> np.arange(p, dtype=np.uint16)) & 1).astype(np.uint8)
        remainder = _pack_bits(rem_bits.reshape(-1))
    else:
        remainder = torch.empty(0, dtype=torch.uint8)
    return _pack_bits(unary), remainder


def rice_decode(unary: torch.Tensor, remainder: torch.Tensor, p: int, count: int) -> torch.Tensor:
    """Inverse of :func:`rice_encode`: ``count`` int64 gaps. Raises on malformed streams."""
    return rice_decode_tail(unary, remainder, p, count, 0)[0]


def rice_decode_tail(
    unary: torch.Tensor,
    remainder: torch.Tensor,
    p: int,
    count: int,
    tail: int,
    max_bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`rice_encode` with a tail: (``count`` int64 gaps, ``tail`` int64 tail
    values). Raises on malformed streams; a unary stream longer than ``max_bits`` (the most
    any valid one can hold) before unpacking it: unpacking makes a byte per bit and an 8-byte
    position per zero bit, up to 72 bytes per received byte, and zero bytes compress well."""
    for name, buf in (("unary", unary), ("remainder", remainder)):
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise CorruptUpdateError(f"rice {name} stream must be a 1-D uint8 tensor")
    if max_bits is not None and unary.numel() > (max_bits + 7) // 8:
        raise CorruptUpdateError("rice unary stream has trailing bytes")
    if remainder.numel() != (count * p + 7) // 8:
        raise CorruptUpdateError(
            f"rice remainder stream has {remainder.numel()} bytes, expected "
            f"{(count * p + 7) // 8} for {count} gaps with p={p}"
        )
    symbols = count + tail
    if symbols == 0:
        if unary.numel():
            raise CorruptUpdateError("rice unary stream has trailing bytes")
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    ubits = np.unpackbits(unary.cpu().numpy(), bitorder="little")
    zeros = np.flatnonzero(ubits == 0)
    if zeros.size < symbols:
        raise CorruptUpdateError(f"rice unary stream ends after {zeros.size} of {symbols} codes")
    zeros = zeros[:symbols]
    if unary.numel() != (int(zeros[-1]) + 8) // 8:
        raise CorruptUpdateError("rice unary stream has trailing bytes")
    if ubits[int(zeros[-1]) + 1 :].any():
        raise CorruptUpdateError("rice unary stream has nonzero pad bits")
    q = (np.diff(zeros, prepend=-1) - 1).astype(np.int64)
    q, rest = q[:count], q[count:]
    g = q << p
    if p:
        rbits = np.unpackbits(remainder.cpu().numpy(), bitorder="little")
        if rbits[count * p :].any():
            raise CorruptUpdateError("rice remainder stream has nonzero pad bits")
        rbits = rbits[: count * p]
        weights = 1 << np.arange(p, dtype=np.int64)
        g |= (rbits.reshape(count, p).astype(np.int64) * weights).sum(axis=1)
    return torch.from_numpy(g), torch.from_numpy(rest)
