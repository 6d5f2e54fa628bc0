"""Full content validation of a received compressed update, without decoding it.

The definition of a usable tensor is :func:`sparseloco.codec.decode_sparse`: it decodes every
value to float32 and every index to int64 and checks them (~15 MB/s of payload on one core).
For packed indices the same acceptance rule needs far less work: codes of ``value_bits`` bits
always index the table (``2**value_bits`` entries, or each rank group's ``2**value_bits``
signed magnitudes), so only their byte count matters, and
indices can be checked as 16-bit integers read in place from the packed bytes (~1 GB/s).
:func:`validate_tensor` accepts exactly what ``decode_sparse`` accepts (the tests compare the
two on mutated payloads) and raises the same typed errors; Rice-coded tensors go through
``decode_sparse`` itself.
"""

from __future__ import annotations

import numpy as np
import torch

from sparseloco.chunking import ChunkLayout
from sparseloco.codec import CompressedTensor, CompressedUpdate, check_table, decode_sparse
from sparseloco.config import CodecConfig
from sparseloco.errors import CorruptUpdateError
from sparseloco.packing import check_code_padding, packed_code_nbytes, packed_index_nbytes
from sparseloco.quantize import rank_bounds


def validate_update(update: CompressedUpdate) -> None:
    """Raise the typed error, naming the tensor, of the first (by name) unusable tensor."""
    for name, ct in sorted(update.tensors.items()):
        validate_tensor(name, ct, update.codec)


def validate_tensor(name: str, ct: CompressedTensor, codec: CodecConfig) -> None:
    """Raise what ``decode_sparse(name, ct, codec)`` would raise; return if it would succeed."""
    if codec.index_coding != "packed":
        decode_sparse(name, ct, codec)
        return
    try:
        _check_packed(ct, codec)
    except CorruptUpdateError as exc:
        raise CorruptUpdateError(str(exc), tensor=name) from None


def _check_packed(ct: CompressedTensor, codec: CodecConfig) -> None:
    layout = ChunkLayout.for_shape(ct.shape, codec.chunk_size)
    k, n_chunks = layout.k(codec.topk), layout.num_chunks
    count = n_chunks * k
    check_table(ct.table, codec, layout)
    _check_bytes(
        ct.codes, packed_code_nbytes(count, codec.value_bits), "code", count, codec.value_bits
    )
    check_code_padding(ct.codes, codec.value_bits, count)
    if layout.is_dense(codec.topk):
        if ct.indices.numel() or ct.gaps.numel():
            raise CorruptUpdateError("dense tensor must not carry indices")
        return
    if ct.gaps.numel():
        raise CorruptUpdateError("packed index coding must not carry a gap stream")
    _check_bytes(
        ct.indices, packed_index_nbytes(count, codec.index_bits), "index", count, codec.index_bits
    )
    if not count:
        return
    raw = ct.indices.detach().cpu().contiguous().numpy()
    ranked = codec.value_coding == "ranked"
    if codec.index_bits == 12 and k % 2 == 0 and not ranked:
        first, second = _pair_views(raw)
        _check_range((first, second), layout.chunk_numel, codec.index_bits)
        if not _pairs_ascend(first, second, k // 2):
            raise CorruptUpdateError("indices are not strictly ascending within a chunk")
        return
    unpacked = _unpack(raw, codec.index_bits)
    if count % 2 and codec.index_bits == 12 and unpacked[count]:
        raise CorruptUpdateError("index buffer has a nonzero pad index")
    idx = unpacked[:count]
    _check_range((idx,), layout.chunk_numel, codec.index_bits)
    if ranked and not _ascends(idx, k, rank_bounds(k)[1:-1]):
        raise CorruptUpdateError("indices are not strictly ascending within a rank group")
    if ranked and not _distinct(idx, k):
        raise CorruptUpdateError("indices repeat within a chunk")
    if not ranked and not _ascends(idx, k):
        raise CorruptUpdateError("indices are not strictly ascending within a chunk")


def _check_bytes(buf: torch.Tensor, expected: int, what: str, count: int, bits: int) -> None:
    """The buffer checks of ``unpack_codes`` / ``unpack_indices``, with their messages."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise CorruptUpdateError(f"{what} buffer must be a 1-D uint8 tensor")
    if buf.numel() != expected:
        plural = "indices" if what == "index" else "codes"
        raise CorruptUpdateError(
            f"{what} buffer has {buf.numel()} bytes, expected {expected} for {count} "
            f"{bits}-bit {plural}"
        )


def _check_range(parts: tuple[np.ndarray, ...], chunk_numel: int, bits: int) -> None:
    if 1 << bits <= chunk_numel:
        return  # every value of that many bits is a valid in-chunk index
    top = max(int(p.max()) for p in parts)
    if top >= chunk_numel:
        raise CorruptUpdateError(f"index {top} out of range for chunks of {chunk_numel}")


def _pairs_ascend(first: np.ndarray, second: np.ndarray, pairs: int) -> bool:
    """Whether every chunk's indices a₀ < b₀ < a₁ < b₁ < … ascend strictly, given each pair's
    a and b in flat arrays (``pairs`` pairs per chunk): b_j > a_j, and a_{j+1} > b_j within
    a chunk."""
    return bool(np.greater(second, first).all()) and _steps_up(first[1:], second[:-1], pairs)


def _ascends(idx: np.ndarray, k: int, starts: list[int] | None = None) -> bool:
    """Whether every chunk of ``k`` consecutive indices ascends strictly (from each of
    ``starts``, positions in the chunk where a new rank group begins, afresh)."""
    return _steps_up(idx[1:], idx[:-1], k, starts or [])


def _distinct(idx: np.ndarray, k: int) -> bool:
    """Whether no chunk of ``k`` consecutive indices holds one twice (any order)."""
    rows = np.sort(idx.reshape(-1, k), axis=1)
    return bool(np.greater(rows[:, 1:], rows[:, :-1]).all())


def _steps_up(
    later: np.ndarray, earlier: np.ndarray, per_chunk: int, starts: list[int] | None = None
) -> bool:
    """Whether ``later > earlier`` everywhere except at each chunk's last position, where
    ``later`` is already the next chunk's (no order across chunks).

    Flat comparisons of contiguous arrays are cheaper than a (chunks, k) layout's strided ones.
    """
    steps = np.greater(later, earlier)
    steps[per_chunk - 1 :: per_chunk] = True
    for start in starts or []:
        steps[start - 1 :: per_chunk] = True
    return bool(steps.all())


def _pair_views(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and second 12-bit index of every 3-byte pair, in order.

    Each is read as a strided little-endian uint16 straight from the packed bytes (the low 12
    bits of bytes 0-1, the high 12 bits of bytes 1-2), so the only arrays made are the results.
    """
    pairs = raw.size // 3
    first = np.ndarray((pairs,), dtype="<u2", buffer=raw, offset=0, strides=(3,))
    second = np.ndarray((pairs,), dtype="<u2", buffer=raw, offset=1, strides=(3,))
    return first & 0x0FFF, second >> 4


def _unpack(raw: np.ndarray, bits: int) -> np.ndarray:
    """Every packed index as uint16, in order (an odd 12-bit count keeps its zero pad)."""
    if bits == 16:
        return raw.view("<u2")
    first, second = _pair_views(raw)
    out = np.empty(2 * first.size, dtype=np.uint16)
    out[0::2], out[1::2] = first, second
    return out
