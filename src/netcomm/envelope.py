"""The wire format of one published update (format version 1), and its defensive reader.

Byte layout (integers little-endian)::

    offset  size  field
    0       4     magic b"NCEN"
    4       2     format version (1)
    6       2     S: signature length
    8       4     H: header length
    12      8     B: body length
    20      H     header: canonical JSON (sorted keys, no spaces), UTF-8
    20+H    B     body: one zstd frame (content size declared) of the safetensors bytes
    20+H+B  S     signature of SIGNING_CONTEXT + bytes[0 : 20+H]

The header holds ``format``, ``version``, ``scheme``, ``publisher``, ``window``,
``fingerprint`` (see :class:`~netcomm.spec.ModelSpec`), ``kind`` (``"sparse"``/``"dense"``),
``codec`` (the codec's wire fields, or null for dense), ``compression`` (``"zstd"``),
``raw_len`` (safetensors length), ``body_len``, ``body_sha256`` and ``tensors`` (count).
Since the header carries the body's SHA-256 and the signature covers the header, the signature
covers every byte of the object.

:func:`open_envelope` checks, in this order and before decompressing or allocating anything
large: lengths and caps, header schema, publisher, signature, window, fingerprint, codec,
body checksum, the zstd frame's declared size; then it decompresses with a hard output cap,
bounds and checks the safetensors header (count, dtypes, shapes, offsets tiling the data), and
finally checks names/shapes against the model and decodes every tensor once (index ranges,
finite values). Any failure raises :class:`~netcomm.errors.EnvelopeError` with a ``reason``.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import zstandard
from safetensors.torch import load as st_load

from netcomm.errors import EnvelopeError, NetcommConfigError
from netcomm.signing import Signer, Verifier
from netcomm.validate import check_payload
from sparseloco.codec import CompressedUpdate
from sparseloco.config import CodecConfig
from sparseloco.errors import (
    CodecMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    SparseLoCoError,
)
from sparseloco.payload import Payload, payload_from_tensors

MAGIC = b"NCEN"
FORMAT_VERSION = 1
FORMAT_NAME = "netcomm.envelope"
SIGNING_CONTEXT = b"netcomm/envelope/v1\x00"
_PREFIX = struct.Struct("<4sHHIQ")
PREFIX_SIZE = _PREFIX.size

# Payload tensors are uint8 buffers and float tables/values; nothing else is legitimate.
_ST_DTYPES = {"U8": 1, "F32": 4, "F16": 2, "BF16": 2}
_ST_NAMES = {torch.uint8: "U8", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_HEADER_FIELDS = {
    "format": str,
    "version": int,
    "scheme": str,
    "publisher": str,
    "window": int,
    "fingerprint": str,
    "kind": str,
    "codec": (dict, type(None)),
    "compression": str,
    "raw_len": int,
    "body_len": int,
    "body_sha256": str,
    "tensors": int,
}


@dataclass(frozen=True)
class EnvelopeLimits:
    """Caps a reader enforces before it spends memory or CPU on an envelope.

    Args:
        max_object_bytes: largest whole envelope accepted (also checked against the storage's
            reported size before downloading).
        max_decompressed_bytes: largest safetensors body after decompression.
        max_header_bytes: largest JSON header.
        max_signature_bytes: largest signature.
        max_tensors: most tensors in the safetensors body.
        max_safetensors_header_bytes: largest safetensors JSON header.
        max_window_bytes: largest zstd window (decoder memory) accepted.
    """

    max_object_bytes: int = 4 << 30
    max_decompressed_bytes: int = 4 << 30
    max_header_bytes: int = 64 << 10
    max_signature_bytes: int = 512
    max_tensors: int = 1 << 16
    max_safetensors_header_bytes: int = 16 << 20
    max_window_bytes: int = 1 << 27

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise NetcommConfigError(
                    f"EnvelopeLimits.{name} must be a positive integer, got {value!r}"
                )
        if self.max_signature_bytes > 0xFFFF:
            raise NetcommConfigError("EnvelopeLimits.max_signature_bytes must be at most 65535")


@dataclass(frozen=True)
class Envelope:
    """A verified envelope: its header fields and the rebuilt payload."""

    header: dict[str, Any]
    payload: Payload

    @property
    def publisher(self) -> str:
        return str(self.header["publisher"])

    @property
    def window(self) -> int:
        return int(self.header["window"])


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal_envelope(
    payload: Payload,
    *,
    window: int,
    publisher: str,
    fingerprint: str,
    signer: Signer,
    level: int = 3,
    threads: int = 0,
) -> bytes:
    """Serialize, compress and sign ``payload`` for ``window`` as ``publisher``.

    Args:
        level: zstd compression level (1 fastest .. 19 smallest).
        threads: zstd worker threads (0 = compress on the calling thread).
    """
    tensors, meta = payload.to_tensors()
    raw = _safetensors_bytes(tensors, meta)
    body = zstandard.ZstdCompressor(level=level, threads=threads, write_content_size=True).compress(
        raw
    )
    codec = payload.codec.wire_fields() if isinstance(payload, CompressedUpdate) else None
    header = _canonical(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "scheme": signer.scheme,
            "publisher": publisher,
            "window": int(window),
            "fingerprint": fingerprint,
            "kind": payload.kind,
            "codec": codec,
            "compression": "zstd",
            "raw_len": len(raw),
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "tensors": len(tensors),
        }
    )
    unsigned = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header), len(body))
    signature = signer.sign(_signed_message(unsigned, header))
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(signature), len(header), len(body))
    return b"".join((prefix, header, body, signature))


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> bytes:
    """The safetensors encoding with a canonical header, so equal payloads give equal bytes.

    ``safetensors.torch.save`` orders metadata keys differently from run to run.
    """
    entries: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, not a wire dtype")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        entries[name] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data section to 8 bytes
    return b"".join([struct.pack("<Q", len(header)), header, *chunks])


def _signed_message(prefix: bytes, header: bytes) -> bytes:
    # The signature length cannot be known before signing, so it is zeroed in the signed bytes.
    return SIGNING_CONTEXT + prefix[:6] + b"\0\0" + prefix[8:] + header


def read_header(blob: bytes | memoryview, limits: EnvelopeLimits) -> tuple[dict[str, Any], int]:
    """Parse and bound the fixed prefix and the JSON header; returns (header, header length).

    Checks only structure, not the signature: use :func:`open_envelope` to accept an update.
    """
    view = memoryview(blob)
    if len(view) > limits.max_object_bytes:
        raise EnvelopeError(
            "too_large", f"object is {len(view)} bytes, limit {limits.max_object_bytes}"
        )
    if len(view) < PREFIX_SIZE:
        raise EnvelopeError("format", f"object is {len(view)} bytes, shorter than the prefix")
    magic, version, sig_len, header_len, body_len = _PREFIX.unpack(view[:PREFIX_SIZE])
    if magic != MAGIC:
        raise EnvelopeError("format", f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise EnvelopeError("version", f"format version {version}, this reader supports 1")
    if header_len > limits.max_header_bytes:
        raise EnvelopeError("too_large", f"header of {header_len} bytes exceeds the cap")
    if sig_len > limits.max_signature_bytes:
        raise EnvelopeError("too_large", f"signature of {sig_len} bytes exceeds the cap")
    if PREFIX_SIZE + header_len + body_len + sig_len != len(view):
        raise EnvelopeError(
            "format",
            f"lengths (header {header_len}, body {body_len}, signature {sig_len}) do not add up "
            f"to the object's {len(view)} bytes (truncated or padded)",
        )
    try:
        header = json.loads(bytes(view[PREFIX_SIZE : PREFIX_SIZE + header_len]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting
        raise EnvelopeError("format", f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != set(_HEADER_FIELDS):
        raise EnvelopeError("format", "header fields are missing or unexpected")
    for name, kind in _HEADER_FIELDS.items():
        value = header[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise EnvelopeError("format", f"header field {name!r} has type {type(value).__name__}")
    if header["format"] != FORMAT_NAME or header["version"] != FORMAT_VERSION:
        raise EnvelopeError("version", f"header names format {header['format']!r}")
    if header["body_len"] != body_len:
        raise EnvelopeError("format", "header body_len disagrees with the prefix")
    return header, header_len


def open_envelope(
    blob: bytes | memoryview,
    *,
    expected_peer: str,
    public_key: bytes,
    verifiers: Mapping[str, Verifier],
    window: int | None = None,
    fingerprint: str | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    codec: CodecConfig | None = None,
    limits: EnvelopeLimits | None = None,
) -> Envelope:
    """Verify ``blob`` completely and return the payload; raise :class:`EnvelopeError` if not.

    Args:
        expected_peer: the peer the object was fetched for; the header must name it.
        public_key: that peer's key from the directory.
        verifiers: signature verifiers by scheme name.
        window / fingerprint / shapes / codec: what the receiver expects; ``None`` skips the
            corresponding check.
        limits: size caps (defaults of :class:`EnvelopeLimits`).
    """
    limits = limits or EnvelopeLimits()
    view = memoryview(blob)
    header, header_len = read_header(view, limits)
    if header["publisher"] != expected_peer:
        raise EnvelopeError(
            "peer", f"envelope names publisher {header['publisher']!r}, expected {expected_peer!r}"
        )
    verifier = verifiers.get(header["scheme"])
    if verifier is None:
        raise EnvelopeError("signature", f"no verifier for scheme {header['scheme']!r}")
    body_start = PREFIX_SIZE + header_len
    body_end = body_start + header["body_len"]
    signed = _signed_message(bytes(view[:PREFIX_SIZE]), bytes(view[PREFIX_SIZE:body_start]))
    if not verifier.verify(public_key, signed, bytes(view[body_end:])):
        raise EnvelopeError("signature", f"signature does not verify for peer {expected_peer!r}")
    if window is not None and header["window"] != window:
        raise EnvelopeError("window", f"envelope is for window {header['window']}, not {window}")
    if fingerprint is not None and header["fingerprint"] != fingerprint:
        raise EnvelopeError("fingerprint", "envelope was made for a different model")
    if (
        codec is not None
        and header["kind"] == CompressedUpdate.kind
        and header["codec"] != codec.wire_fields()
    ):
        raise EnvelopeError(
            "codec", f"envelope codec {header['codec']} != expected {codec.wire_fields()}"
        )
    if header["raw_len"] > limits.max_decompressed_bytes or header["raw_len"] < 8:
        raise EnvelopeError(
            "too_large", f"declared body size {header['raw_len']} is outside [8, cap]"
        )
    if header["tensors"] > limits.max_tensors:
        raise EnvelopeError("too_large", f"{header['tensors']} tensors exceed the cap")
    body = view[body_start:body_end]
    if hashlib.sha256(body).hexdigest() != header["body_sha256"]:
        raise EnvelopeError("checksum", "body SHA-256 does not match the header")
    raw = _decompress(body, header["raw_len"], limits)
    meta = _check_safetensors(raw, header["tensors"], limits)
    try:
        payload = payload_from_tensors(st_load(raw), meta)
    except SparseLoCoError as exc:
        raise EnvelopeError("tensors", str(exc)) from None
    if payload.kind != header["kind"]:
        raise EnvelopeError(
            "tensors", f"body holds a {payload.kind} payload, header says {header['kind']}"
        )
    if isinstance(payload, CompressedUpdate) and payload.codec.wire_fields() != header["codec"]:
        raise EnvelopeError("codec", "body codec differs from the header's")
    _check_contents(payload, shapes, codec)
    return Envelope(header=header, payload=payload)


def _decompress(body: memoryview, raw_len: int, limits: EnvelopeLimits) -> bytes:
    try:
        params = zstandard.get_frame_parameters(body)
    except zstandard.ZstdError as exc:
        raise EnvelopeError("decompress", f"not a zstd frame: {exc}") from None
    if params.content_size != raw_len:
        raise EnvelopeError(
            "decompress",
            f"zstd frame declares {params.content_size} bytes, header says {raw_len}",
        )
    if params.window_size > limits.max_window_bytes:
        raise EnvelopeError("too_large", f"zstd window of {params.window_size} bytes")
    out = bytearray(raw_len)
    dest = memoryview(out)
    pos = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=limits.max_window_bytes)
    try:
        # A hard output cap: the reader never writes past raw_len, whatever the frames claim.
        with dctx.stream_reader(body, read_across_frames=True) as reader:
            while pos < raw_len:
                n = reader.readinto(dest[pos:])
                if n == 0:
                    break
                pos += n
            if pos != raw_len or reader.read(1):
                raise EnvelopeError(
                    "decompress", f"body does not decompress to exactly {raw_len} bytes"
                )
    except zstandard.ZstdError as exc:
        raise EnvelopeError("decompress", f"zstd: {exc}") from None
    return bytes(out)


def _check_safetensors(raw: bytes, count: int, limits: EnvelopeLimits) -> dict[str, str]:
    """Bound and check the safetensors header so its parser only sees sane input."""
    (n,) = struct.unpack_from("<Q", raw, 0)
    if n > limits.max_safetensors_header_bytes or n > len(raw) - 8:
        raise EnvelopeError("tensors", f"safetensors header length {n} is out of bounds")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting
        raise EnvelopeError("tensors", f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise EnvelopeError("tensors", "safetensors header is not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise EnvelopeError("tensors", "safetensors metadata must map strings to strings")
    if len(header) != count:
        raise EnvelopeError("tensors", f"{len(header)} tensors, header declared {count}")
    data_len = len(raw) - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise EnvelopeError("tensors", f"tensor {name!r} has a malformed entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise EnvelopeError("tensors", f"tensor {name!r} has disallowed dtype {dtype!r}")
        if not (
            isinstance(shape, list)
            and len(shape) <= 8
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ):
            raise EnvelopeError("tensors", f"tensor {name!r} has a bad shape")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise EnvelopeError("tensors", f"tensor {name!r} has bad data offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * _ST_DTYPES[dtype]:
            raise EnvelopeError("tensors", f"tensor {name!r} size disagrees with its shape")
        spans.append((offsets[0], offsets[1]))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise EnvelopeError("tensors", "tensor data overlaps or leaves gaps")
        end = stop
    if end != data_len:
        raise EnvelopeError("tensors", "tensor data does not cover the buffer exactly")
    return meta


def _check_contents(
    payload: Payload,
    shapes: Mapping[str, tuple[int, ...]] | None,
    codec: CodecConfig | None,
) -> None:
    try:
        if shapes is not None:
            if isinstance(payload, CompressedUpdate):
                payload.check_matches(shapes, codec or payload.codec)
            else:
                payload.check_matches(shapes)
        check_payload(payload)
    except ShapeMismatchError as exc:
        raise EnvelopeError("shape", str(exc)) from None
    except CodecMismatchError as exc:
        raise EnvelopeError("codec", str(exc)) from None
    except NonFiniteError as exc:
        raise EnvelopeError("nonfinite", str(exc)) from None
    except SparseLoCoError as exc:
        raise EnvelopeError("corrupt", str(exc)) from None
