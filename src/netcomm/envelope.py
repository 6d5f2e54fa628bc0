"""The wire format of one published update (format version 3), and its defensive reader.

Byte layout (integers little-endian)::

    offset  size  field
    0       4     magic b"NCEN"
    4       2     format version (3)
    6       2     S: signature length
    8       4     H: header length
    12      8     B: body length
    20      H     header: canonical JSON (sorted keys, no spaces), UTF-8
    20+H    B     body: the safetensors bytes, as they are or as one zstd frame (content
                  size declared), as the header's ``compression`` says
    20+H+B  S     signature of SIGNING_CONTEXT + bytes[0 : 20+H]

The header holds ``format``, ``version``, ``scheme``, ``publisher``, ``window``,
``fingerprint`` (see :class:`~netcomm.spec.ModelSpec`), ``kind`` (``"sparse"``/``"dense"``),
``codec`` (the codec's wire fields, or null for dense), ``compression`` (``"zstd"`` or
``"none"``), ``raw_len`` (safetensors length), ``body_len``, ``body_blake3`` and ``tensors``
(count). Packed indices are close to random, so zstd may save nothing on a body while still
costing every receiver a decompression pass; the publisher keeps zstd only when it saves at
least ``min_saving`` of the bytes (SparseLoCo updates: the 12-bit indices do not shrink, the
2-bit codes of real updates halve, ~5% overall).
Since the header carries the body's BLAKE3 digest and the signature covers the header, the
signature covers every byte of the object. Version 3 replaced versions 1 and 2's SHA-256 with
BLAKE3 (one thread, ~2.3x faster here than SHA-256 with SHA extensions): hashing was the
largest verification cost of a gather; objects of those versions are rejected as ``version``.

:func:`open_envelope` checks, in this order and before decompressing or allocating anything
large: lengths and caps, header schema (exact JSON types, ranges, and byte-for-byte canonical
form: one update has one encoding), publisher, signature, window (``replay``), fingerprint,
update kind (``kind``: a sparse channel takes no dense update and vice versa), codec, body
checksum, the zstd frame's declared size; then it decompresses with a hard output cap, growing
the output only as bytes arrive (or, uncompressed, uses the body in place), bounds and checks
the canonical safetensors header (count, dtypes, shapes, offsets tiling the data in name order,
:func:`sparseloco.serialization.load_safetensors`), and finally checks names/shapes against the
model and every tensor's contents (index ranges and order, zero pad bits, finite values:
:func:`sparseloco.payload.validate_payload`). Any failure raises
:class:`~netcomm.errors.EnvelopeError` with a ``reason``; any other exception is a bug.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import zstandard
from blake3 import blake3

from netcomm.errors import EnvelopeError, NetcommConfigError
from netcomm.signing import Signer, Verifier
from netcomm.spec import ModelSpec
from netcomm.storage import fresh_buffer
from sparseloco.codec import CompressedUpdate
from sparseloco.config import CodecConfig
from sparseloco.errors import (
    CodecMismatchError,
    ConfigError,
    NonFiniteError,
    ShapeMismatchError,
    SparseLoCoError,
)
from sparseloco.payload import Payload, payload_from_tensors, validate_payload
from sparseloco.serialization import dump_safetensors, load_safetensors, strict_json_loads

MAGIC = b"NCEN"
FORMAT_VERSION = 3  # the one version this module reads and writes
FORMAT_NAME = "netcomm.envelope"
SIGNING_CONTEXT = b"netcomm/envelope/v1\x00"  # domain separation; the signed prefix has the version
_COMPRESSIONS = ("zstd", "none")  # the body encodings
_PREFIX = struct.Struct("<4sHHIQ")
PREFIX_SIZE = _PREFIX.size
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
    "body_blake3": str,
    "tensors": int,
}
# Exact JSON types of the codec's wire fields (``CodecConfig.wire_fields``).
_CODEC_FIELDS = {
    "chunk_size": int,
    "topk": int,
    "value_bits": int,
    "index_coding": str,
    "error_decay": (int, float),
}
_KINDS = ("sparse", "dense")
_MAX_INT = (1 << 63) - 1  # every integer field is a u64/i64 elsewhere; larger is hostile
_HEX_DIGITS = frozenset("0123456789abcdef")
_DECOMPRESS_STEP = 1 << 20  # the smallest first output buffer of a decompression


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

    @classmethod
    def for_model(cls, spec: ModelSpec) -> EnvelopeLimits:
        """Caps no honest update of ``spec``'s model can exceed.

        The largest payload any method sends is a dense float32 copy of every parameter (a
        DiLoCo pseudo-gradient); a sparse update is far smaller. Allowing that plus 4 KiB of
        headers per tensor keeps a hostile length field from making a reader allocate more
        than one dense copy of the model.
        """
        return cls.for_shapes({name: shape for name, shape, _ in spec.entries})

    @classmethod
    def for_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> EnvelopeLimits:
        """:meth:`for_model` from the tensors' shapes alone."""
        n_params = sum(math.prod(shape) for shape in shapes.values())
        body = 4 * n_params + 4096 * (len(shapes) + 1)
        return cls(
            max_object_bytes=body + (1 << 16),
            max_decompressed_bytes=body,
            max_tensors=4 * len(shapes) + 8,
        )

    def tighten(self, other: EnvelopeLimits) -> EnvelopeLimits:
        """The smaller of each cap of ``self`` and ``other``."""
        return EnvelopeLimits(
            **{
                name: min(getattr(self, name), getattr(other, name))
                for name in self.__dataclass_fields__
            }
        )


@dataclass(frozen=True)
class Envelope:
    """A verified envelope: its header fields and the rebuilt payload."""

    header: dict[str, Any]
    payload: Payload
    #: BLAKE3 (hex) of the canonical safetensors bytes: equal payloads, equal digests,
    #: whatever the compression (what replay detection compares)
    payload_digest: str = ""

    @property
    def publisher(self) -> str:
        return str(self.header["publisher"])

    @property
    def window(self) -> int:
        return int(self.header["window"])


@dataclass(frozen=True)
class BodyDigest:
    """The BLAKE3 digest (hex) of ``blob[start:end]`` of a ``size``-byte blob, as a
    :class:`BodyHasher` computed it while the blob arrived."""

    start: int
    end: int
    size: int
    blake3: str


class BodyHasher:
    """Hashes an envelope's body while the envelope's bytes arrive, so that
    :func:`open_envelope` need not read the whole body again after the last one.

    Give :meth:`update` (a :data:`~netcomm.storage.Progress`) every chunk of the download in
    order; the prefix's length fields say where the body lies. Nothing is checked here: the
    prefix is untrusted, and :func:`open_envelope` uses the digest only where its own parse
    puts the body exactly where this one did.
    """

    def __init__(self) -> None:
        self._restart()

    def _restart(self) -> None:
        self._hash = blake3()
        self._size = 0
        self._prefix = bytearray()
        self._body: tuple[int, int] | None = None

    def update(self, offset: int, chunk: memoryview) -> None:
        """Take the download's bytes ``[offset, offset + len(chunk))``; offset 0 again means
        the download started over."""
        if offset == 0 and self._size:
            self._restart()
        if offset != self._size:
            raise ValueError(f"chunk at byte {offset}, expected {self._size}: chunks come in order")
        lo, self._size = self._size, self._size + len(chunk)
        if self._body is None:
            self._prefix += chunk[: PREFIX_SIZE - len(self._prefix)]
            if len(self._prefix) < PREFIX_SIZE:
                return
            header_len, body_len = _PREFIX.unpack(self._prefix)[3:]
            self._body = (PREFIX_SIZE + header_len, PREFIX_SIZE + header_len + body_len)
        start, end = self._body
        if max(start, lo) < min(end, self._size):
            self._hash.update(chunk[max(start, lo) - lo : min(end, self._size) - lo])

    def digest(self) -> BodyDigest | None:
        """The body's digest, or ``None`` while the bytes so far do not hold the whole body."""
        if self._body is None or self._size < self._body[1]:
            return None
        return BodyDigest(*self._body, size=self._size, blake3=self._hash.hexdigest())


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
    compression: Literal["auto", "zstd", "none"] = "auto",
    min_saving: float = 0.02,
) -> bytes:
    """Serialize, compress and sign ``payload`` for ``window`` as ``publisher``.

    Args:
        level: zstd compression level (1 fastest .. 19 smallest).
        threads: zstd worker threads (0 = compress on the calling thread).
        compression: ``"zstd"``, ``"none"``, or ``"auto"``: zstd only if it makes the body at
            least ``min_saving`` (a fraction) smaller, since every receiver pays for
            decompressing it.

    Raises :class:`~sparseloco.errors.SafetensorsFormatError` for a tensor dtype that
    is not a payload dtype.
    """
    if compression not in ("auto", *_COMPRESSIONS):
        raise NetcommConfigError(
            f"compression must be 'auto', 'zstd' or 'none', got {compression!r}"
        )
    if not 0.0 <= min_saving < 1.0:
        raise NetcommConfigError(f"min_saving must lie in [0, 1), got {min_saving!r}")
    tensors, meta = payload.to_tensors()
    raw = dump_safetensors(tensors, meta)
    body, used = raw, "none"
    if compression != "none":
        packed = zstandard.ZstdCompressor(
            level=level, threads=threads, write_content_size=True
        ).compress(raw)
        if compression == "zstd" or len(packed) <= (1 - min_saving) * len(raw):
            body, used = packed, "zstd"
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
            "compression": used,
            "raw_len": len(raw),
            "body_len": len(body),
            "body_blake3": blake3(body).hexdigest(),
            "tensors": len(tensors),
        }
    )
    unsigned = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header), len(body))
    signature = signer.sign(_signed_message(unsigned, header))
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(signature), len(header), len(body))
    return b"".join((prefix, header, body, signature))


def same_codec(got: Any, expected: Mapping[str, Any]) -> bool:
    """Whether a header's codec fields equal ``expected`` value for value *and* type.

    ``==`` alone would accept ``true`` for ``value_bits=1`` or ``2.0`` for ``2`` (Python
    compares them equal); only a float field may arrive as an integer (JSON drops ``.0``).
    """
    if not isinstance(got, dict) or got != dict(expected):
        return False
    return all(
        type(got[k]) is type(v) or (isinstance(v, float) and type(got[k]) is int)
        for k, v in expected.items()
    )


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
        raise EnvelopeError(
            "version", f"format version {version}, this reader supports {FORMAT_VERSION}"
        )
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
    header_bytes = bytes(view[PREFIX_SIZE : PREFIX_SIZE + header_len])
    header = _parse_header(header_bytes)
    if header["format"] != FORMAT_NAME or header["version"] != version:
        raise EnvelopeError(
            "version", f"header names format {header['format']!r} {header['version']}"
        )
    if header["body_len"] != body_len:
        raise EnvelopeError("format", "header body_len disagrees with the prefix")
    if header["compression"] not in _COMPRESSIONS:
        raise EnvelopeError("format", f"unknown compression {header['compression']!r}")
    if header["compression"] == "none" and header["raw_len"] != body_len:
        raise EnvelopeError("format", "an uncompressed body must have raw_len == body_len")
    return header, header_len


def _parse_header(header_bytes: bytes) -> dict[str, Any]:
    """The header, checked for exact types, ranges and byte-for-byte canonical form.

    One update has exactly one valid header encoding: duplicate keys, a BOM, escapes,
    spacing, ``2.0`` or ``true`` for an integer or ``"0.95"`` for a number are all rejected
    here rather than resolved one way by this reader and another way by the next.
    """
    try:
        header = strict_json_loads(header_bytes)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting
        raise EnvelopeError("format", f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != set(_HEADER_FIELDS):
        raise EnvelopeError("format", "header fields are missing or unexpected")
    _check_types(header, _HEADER_FIELDS, "header field")
    if _canonical(header) != header_bytes:
        raise EnvelopeError("format", "header is not in canonical form")
    for name in ("window", "raw_len", "body_len", "tensors"):
        if not 0 <= header[name] <= _MAX_INT:
            raise EnvelopeError("format", f"header field {name!r} is out of range")
    for name in ("fingerprint", "body_blake3"):
        if len(header[name]) != 64 or not set(header[name]) <= _HEX_DIGITS:
            raise EnvelopeError("format", f"header field {name!r} is not 64 lowercase hex digits")
    if header["kind"] not in _KINDS:
        raise EnvelopeError("format", f"unknown update kind {header['kind']!r}")
    if (header["kind"] == "dense") != (header["codec"] is None):
        raise EnvelopeError("format", "a sparse update needs a codec and a dense one none")
    if header["codec"] is not None:
        _check_codec_fields(header["codec"])
    return header


def _check_types(fields: dict[str, Any], schema: Mapping[str, Any], what: str) -> None:
    for name, kind in schema.items():
        value = fields[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise EnvelopeError("format", f"{what} {name!r} has type {type(value).__name__}")


def _check_codec_fields(fields: dict[str, Any]) -> None:
    # value_coding is present exactly when it is not the default (one encoding per codec).
    schema = dict(_CODEC_FIELDS, value_coding=str) if "value_coding" in fields else _CODEC_FIELDS
    if set(fields) != set(schema):
        raise EnvelopeError("format", "codec fields are missing or unexpected")
    _check_types(fields, schema, "codec field")
    if fields.get("value_coding") == "uniform":
        raise EnvelopeError("format", "value_coding 'uniform' is the default and must be omitted")
    try:
        CodecConfig(**fields)
    except ConfigError as exc:
        raise EnvelopeError("format", f"invalid codec: {exc}") from None


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
    kind: Literal["sparse", "dense"] | None = None,
    limits: EnvelopeLimits | None = None,
    body_digest: BodyDigest | None = None,
) -> Envelope:
    """Verify ``blob`` completely and return the payload; raise :class:`EnvelopeError` if not.

    Args:
        expected_peer: the peer the object was fetched for; the header must name it.
        public_key: that peer's key from the directory.
        verifiers: signature verifiers by scheme name.
        window / fingerprint / shapes / codec: what the receiver expects; ``None`` skips the
            corresponding check. A window other than ``window`` is rejected as ``replay``.
        kind: the update kind the channel carries; a ``codec`` implies ``"sparse"``, so a
            dense update cannot bypass the codec check on a sparse channel.
        limits: size caps (defaults of :class:`EnvelopeLimits`), always tightened to
            :meth:`EnvelopeLimits.for_shapes` when ``shapes`` is given, so no envelope of
            that model can make the reader hold more than one dense float32 copy of it.
        body_digest: the body's BLAKE3 digest as the caller's own :class:`BodyHasher` computed it
            from these very bytes while they arrived; used instead of hashing the body again
            when it covers the body's span of a blob this long. It vouches for the bytes:
            never pass one that did not come from hashing ``blob`` itself.

    Memory: besides ``blob``, the reader holds at most the decompressed body's buffer, at
    most twice the bytes the frame really yields (or 1 MiB) and never more than
    ``max_decompressed_bytes`` (the declared ``raw_len`` only caps it, it sizes no
    allocation), plus the tensors made from it (views, or one copy of an uncompressed body).
    """
    kind = _channel_kind(kind, codec)
    limits = limits or EnvelopeLimits()
    if shapes is not None:
        limits = limits.tighten(EnvelopeLimits.for_shapes(shapes))
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
        raise EnvelopeError("replay", f"envelope is for window {header['window']}, not {window}")
    if fingerprint is not None and header["fingerprint"] != fingerprint:
        raise EnvelopeError("fingerprint", "envelope was made for a different model")
    if kind is not None and header["kind"] != kind:
        raise EnvelopeError("kind", f"a {header['kind']} update on a {kind} channel")
    if (
        codec is not None
        and header["kind"] == CompressedUpdate.kind
        and not same_codec(header["codec"], codec.wire_fields())
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
    if _body_blake3(view, body_start, body_end, body_digest) != header["body_blake3"]:
        raise EnvelopeError("checksum", "body BLAKE3 digest does not match the header")
    raw = body if header["compression"] == "none" else _decompress(body, header["raw_len"], limits)
    try:
        tensors, meta = load_safetensors(
            raw,
            max_header_bytes=limits.max_safetensors_header_bytes,
            max_tensors=limits.max_tensors,
            expected_tensors=header["tensors"],
            canonical=True,
        )
        payload = payload_from_tensors(tensors, meta)
    except SparseLoCoError as exc:
        raise EnvelopeError("tensors", str(exc)) from None
    if payload.kind != header["kind"]:
        raise EnvelopeError(
            "tensors", f"body holds a {payload.kind} payload, header says {header['kind']}"
        )
    if isinstance(payload, CompressedUpdate) and not same_codec(
        header["codec"], payload.codec.wire_fields()
    ):
        raise EnvelopeError("codec", "body codec differs from the header's")
    _check_contents(payload, shapes, codec)
    digest = header["body_blake3"] if raw is body else blake3(raw).hexdigest()
    return Envelope(header=header, payload=payload, payload_digest=digest)


def _body_blake3(view: memoryview, start: int, end: int, known: BodyDigest | None) -> str:
    """BLAKE3 of ``view[start:end]``: ``known`` when it is that span's of a blob this long."""
    if known is not None and (known.start, known.end, known.size) == (start, end, len(view)):
        return known.blake3
    return blake3(view[start:end]).hexdigest()


def _channel_kind(kind: str | None, codec: CodecConfig | None) -> str | None:
    if kind is not None and kind not in _KINDS:
        raise NetcommConfigError(f"kind must be one of {_KINDS}, got {kind!r}")
    if codec is not None and kind == "dense":
        raise NetcommConfigError("a codec is for a sparse channel, not a dense one")
    return "sparse" if codec is not None else kind


def _decompress(body: memoryview, raw_len: int, limits: EnvelopeLimits) -> memoryview:
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
    # The output is decompressed straight into uninitialised memory, at first twice the
    # body's size (an honest update shrinks ~5 %) and doubled only when the frame has filled
    # it: memory follows the bytes the frame really yields, not the (signed, but untrusted)
    # raw_len, which only caps it; a tiny frame claiming 1 GiB costs about 1 MiB.
    out = fresh_buffer(min(raw_len, max(2 * len(body), _DECOMPRESS_STEP)))
    got = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=limits.max_window_bytes)
    try:
        with dctx.stream_reader(body, read_across_frames=True) as reader:
            while got < raw_len:
                if got == len(out):
                    out = _grown(out, min(raw_len, 2 * len(out)))
                n = reader.readinto(out[got:])
                if not n:
                    break
                got += n
            if got != raw_len or reader.read(1):
                raise EnvelopeError(
                    "decompress", f"body does not decompress to exactly {raw_len} bytes"
                )
    except zstandard.ZstdError as exc:
        raise EnvelopeError("decompress", f"zstd: {exc}") from None
    return out


def _grown(buf: memoryview, size: int) -> memoryview:
    bigger = fresh_buffer(size)
    bigger[: len(buf)] = buf
    return bigger


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
        validate_payload(payload)
    except ShapeMismatchError as exc:
        raise EnvelopeError("shape", str(exc)) from None
    except CodecMismatchError as exc:
        raise EnvelopeError("codec", str(exc)) from None
    except NonFiniteError as exc:
        raise EnvelopeError("nonfinite", str(exc)) from None
    except SparseLoCoError as exc:
        raise EnvelopeError("corrupt", str(exc)) from None
