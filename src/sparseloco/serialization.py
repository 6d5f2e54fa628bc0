"""Payload tensors to safetensors bytes and back: canonical when writing, bounded when reading.

:func:`dump_safetensors` writes the safetensors format with a canonical header (tensors in name
order, metadata keys sorted, no spaces), so equal payloads give equal bytes;
``safetensors.torch.save`` orders metadata keys differently from run to run, which would make
equal updates hash and sign differently.

:func:`load_safetensors` reads bytes from another peer. It parses the header itself, under a
size cap, and checks the tensor count, dtypes (the payload dtypes only), shapes, and that the
data offsets tile the data section exactly, before it builds any tensor. Tensors are views of
the given buffer (no copy) when it is writable. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import torch

from sparseloco.errors import SafetensorsFormatError

# Payload tensors are uint8 buffers and float tables/values; nothing else is legitimate.
DTYPES: dict[str, torch.dtype] = {
    "U8": torch.uint8,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 1 << 16
_MAX_DIMS = 8
# Shapes whose element count (zero dimensions aside) torch cannot index: an empty tensor of
# shape (0, 2**62, 2**62) still overflows its stride calculation.
_MAX_ELEMENTS = 1 << 48


def strict_json_loads(data: bytes | str) -> Any:
    """Parse JSON from another peer, rejecting what lax parsing would silently resolve.

    Duplicate keys (Python keeps the last, another reader may keep the first) and the
    non-standard NaN/Infinity constants raise :class:`ValueError`.
    """
    return json.loads(data, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _header_bytes(entries: Mapping[str, Any]) -> bytes:
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # the format aligns the data section to 8 bytes


def dump_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` with a canonical header (equal inputs, equal bytes).

    Raises :class:`SafetensorsFormatError` for a dtype outside :data:`DTYPES`.
    """
    entries: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    flat = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _NAMES:
            raise SafetensorsFormatError(f"dtype {t.dtype} is not a payload dtype", tensor=name)
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        entries[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + data.numel()],
        }
        flat.append(data)
        offset += data.numel()
    header = _header_bytes(entries)
    start = _LENGTH.size + len(header)
    out = bytearray(start + offset)
    _LENGTH.pack_into(out, 0, len(header))
    out[_LENGTH.size : start] = header
    dest = torch.frombuffer(out, dtype=torch.uint8) if out else torch.empty(0, dtype=torch.uint8)
    for data, name in zip(flat, sorted(tensors), strict=True):
        lo, hi = entries[name]["data_offsets"]
        dest[start + lo : start + hi] = data
    return bytes(out)


def load_safetensors(
    raw: bytes | bytearray | memoryview,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int = MAX_TENSORS,
    expected_tensors: int | None = None,
    canonical: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check and read safetensors bytes into (tensors, metadata).

    Args:
        raw: the bytes; a writable buffer (``bytearray``) is shared by the returned tensors,
            a read-only one is copied once.
        max_header_bytes: largest JSON header accepted.
        max_tensors: most tensors accepted.
        expected_tensors: the exact tensor count required, when the caller knows it.
        canonical: require the header to be byte for byte what :func:`dump_safetensors`
            writes (one encoding per payload, so equal payloads hash equal).

    Raises :class:`SafetensorsFormatError` naming the problem (and the tensor, if one).
    """
    view = memoryview(raw).cast("B")
    if len(view) < _LENGTH.size:
        raise SafetensorsFormatError(f"{len(view)} bytes is shorter than the length prefix")
    (n,) = _LENGTH.unpack_from(view, 0)
    if n > max_header_bytes or n > len(view) - _LENGTH.size:
        raise SafetensorsFormatError(f"header length {n} is out of bounds")
    header_bytes = bytes(view[_LENGTH.size : _LENGTH.size + n])
    try:
        header = strict_json_loads(header_bytes)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting too
        raise SafetensorsFormatError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    if canonical:
        _check_canonical(header, header_bytes)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise SafetensorsFormatError("metadata must map strings to strings")
    if len(header) > max_tensors:
        raise SafetensorsFormatError(f"{len(header)} tensors exceed the cap of {max_tensors}")
    if expected_tensors is not None and len(header) != expected_tensors:
        raise SafetensorsFormatError(f"{len(header)} tensors, expected {expected_tensors}")
    start = _LENGTH.size + n
    entries = {name: _entry(name, info, len(view) - start) for name, info in header.items()}
    _check_tiling(entries.values(), len(view) - start)
    if view.readonly:
        view = memoryview(bytearray(view))
    tensors = {
        name: _tensor(view, start + lo, hi - lo, dtype, shape)
        for name, (dtype, shape, lo, hi) in entries.items()
    }
    return tensors, meta


def _check_canonical(header: dict[str, Any], header_bytes: bytes) -> None:
    """The header must be :func:`dump_safetensors`'s: its key order, spacing, escapes, padding
    and offsets assigned in name order."""
    names = [k for k in header if k != "__metadata__"]
    if list(header) != ["__metadata__", *sorted(names)]:
        raise SafetensorsFormatError("header keys are not in canonical order")
    meta = header["__metadata__"]
    if isinstance(meta, dict) and list(meta) != sorted(meta):
        raise SafetensorsFormatError("metadata keys are not in canonical order")
    if _header_bytes(header) != header_bytes:
        raise SafetensorsFormatError("header is not in canonical form")
    end = 0
    for name in names:
        info = header[name]
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not isinstance(info, dict) or list(info) != ["dtype", "shape", "data_offsets"]:
            raise SafetensorsFormatError("header entry is not in canonical form", tensor=name)
        if not isinstance(offsets, list) or not offsets or offsets[0] != end:
            raise SafetensorsFormatError("data is not laid out in name order", tensor=name)
        end = offsets[-1]


def _entry(name: str, info: object, data_len: int) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry, checked against the data length."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsFormatError("malformed header entry", tensor=name)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsFormatError(f"disallowed dtype {dtype!r}", tensor=name)
    if not (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMS
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        and math.prod(max(s, 1) for s in shape) <= _MAX_ELEMENTS
    ):
        raise SafetensorsFormatError(f"bad shape {shape!r}", tensor=name)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise SafetensorsFormatError(f"bad data offsets {offsets!r}", tensor=name)
    torch_dtype = DTYPES[dtype]
    if offsets[1] - offsets[0] != math.prod(shape) * torch_dtype.itemsize:
        raise SafetensorsFormatError("data size disagrees with shape and dtype", tensor=name)
    return torch_dtype, shape, offsets[0], offsets[1]


def _check_tiling(entries: Any, data_len: int) -> None:
    """The tensors' byte ranges must cover the data section exactly: no overlap, no gap."""
    end = 0
    for _, _, lo, hi in sorted(entries, key=lambda e: (e[2], e[3])):
        if lo != end:
            raise SafetensorsFormatError("tensor data overlaps or leaves gaps")
        end = hi
    if end != data_len:
        raise SafetensorsFormatError("tensor data does not cover the data section exactly")


def _tensor(
    view: memoryview, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]
) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    data = torch.frombuffer(view, dtype=torch.uint8, count=nbytes, offset=offset)
    if data.data_ptr() % dtype.itemsize:
        # Only the data section is aligned (and only within the file), so a float table after
        # an odd-length byte buffer can be misaligned; a copy gives kernels the alignment they
        # assume.
        data = data.clone()
    return data.view(dtype).view(shape)
