"""Full content validation of a received payload, fast for the common packed-index coding.

``sparseloco.payload.validate_payload`` decodes every value to float32 and every index to
int64 (~15 MB/s of payload on one CPU core), which would dominate a gather. For packed indices
the same acceptance rule needs far less work: codes of ``value_bits`` bits always index a
table of ``2**value_bits`` entries, so only their byte count matters, and indices can be
checked as 16-bit integers read in place from the packed bytes. :func:`check_payload` accepts
exactly what ``validate_payload`` accepts (tests compare the two on mutated payloads) and
raises the same typed errors; Rice coding and dense payloads go through ``validate_payload``
itself.
"""

from __future__ import annotations

import numpy as np
import torch

from sparseloco.chunking import ChunkLayout
from sparseloco.codec import CompressedTensor, CompressedUpdate
from sparseloco.config import CodecConfig
from sparseloco.errors import CorruptUpdateError
from sparseloco.packing import packed_code_nbytes, packed_index_nbytes
from sparseloco.payload import Payload, validate_payload


def check_payload(payload: Payload) -> None:
    """Raise the typed error ``validate_payload`` would raise for the first unusable tensor."""
    if not isinstance(payload, CompressedUpdate) or payload.codec.index_coding != "packed":
        validate_payload(payload)
        return
    for name, ct in sorted(payload.tensors.items()):
        try:
            _check_packed(ct, payload.codec)
        except CorruptUpdateError as exc:
            raise CorruptUpdateError(str(exc), tensor=name) from None


def _check_packed(ct: CompressedTensor, codec: CodecConfig) -> None:
    layout = ChunkLayout.for_shape(ct.shape, codec.chunk_size)
    k, n_chunks = layout.k(codec.topk), layout.num_chunks
    count = n_chunks * k
    table = ct.table
    if table.dtype != torch.float32 or tuple(table.shape) != (codec.levels,):
        raise CorruptUpdateError(
            f"table must be float32 of shape ({codec.levels},), got {table.dtype} "
            f"{tuple(table.shape)}"
        )
    if not bool(torch.isfinite(table).all()):
        raise CorruptUpdateError("table contains NaN or Inf")
    _check_bytes(ct.codes, packed_code_nbytes(count, codec.value_bits), "code")
    if layout.is_dense(codec.topk):
        if ct.indices.numel() or ct.gaps.numel():
            raise CorruptUpdateError("dense tensor must not carry indices")
        return
    if ct.gaps.numel():
        raise CorruptUpdateError("packed index coding must not carry a gap stream")
    _check_bytes(ct.indices, packed_index_nbytes(count, codec.index_bits), "index")
    if not count:
        return
    raw = ct.indices.detach().cpu().contiguous().numpy()
    if codec.index_bits == 12 and k % 2 == 0:
        _check_pairs12(raw, k, layout.chunk_numel)
        return
    idx = _unpack(raw, codec.index_bits)[:count].reshape(n_chunks, k)
    top = int(idx.max())
    if top >= layout.chunk_numel:
        raise CorruptUpdateError(f"index {top} out of range for chunks of {layout.chunk_numel}")
    if k > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        raise CorruptUpdateError("indices are not strictly ascending within a chunk")


def _check_bytes(buf: torch.Tensor, expected: int, what: str) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise CorruptUpdateError(f"{what} buffer must be a 1-D uint8 tensor")
    if buf.numel() != expected:
        raise CorruptUpdateError(f"{what} buffer has {buf.numel()} bytes, expected {expected}")


def _pair_views(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and second 12-bit index of every 3-byte pair, read as strided uint16 (no copy)."""
    pairs = raw.size // 3
    first = np.ndarray((pairs,), dtype="<u2", buffer=raw, offset=0, strides=(3,)) & 0x0FFF
    second = np.ndarray((pairs,), dtype="<u2", buffer=raw, offset=1, strides=(3,)) >> 4
    return first, second


def _unpack(raw: np.ndarray, bits: int) -> np.ndarray:
    if bits == 16:
        return raw.view("<u2")
    first, second = _pair_views(raw)
    out = np.empty(2 * first.size, dtype=np.uint16)
    out[0::2], out[1::2] = first, second
    return out


def _check_pairs12(raw: np.ndarray, k: int, chunk_numel: int) -> None:
    """Range and order checks with k even, so every chunk holds k/2 whole pairs."""
    first, second = _pair_views(raw)
    top = max(int(first.max()), int(second.max()))
    if top >= chunk_numel:
        raise CorruptUpdateError(f"index {top} out of range for chunks of {chunk_numel}")
    ascending = np.greater(first[1:], second[:-1])
    ascending[k // 2 - 1 :: k // 2] = True  # the next pair starts a new chunk
    if not (np.greater(second, first).all() and ascending.all()):
        raise CorruptUpdateError("indices are not strictly ascending within a chunk")
