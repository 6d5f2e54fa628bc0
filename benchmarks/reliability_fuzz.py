"""Decoder fuzzing: mutate valid envelopes and check that every case ends well.

A case is one hostile object handed to :func:`netcomm.open_envelope`. It ends well when the
reader returns a payload or raises :class:`netcomm.EnvelopeError`; any other exception is a
crash, a case over the time bound is a hang. Two further defects are counted:

* ``forged``: an object the attacker could not sign (bit flips, truncation, another key,
  replays of an honest peer's old window, envelopes for another model) was accepted;
* ``unusable``: an accepted payload that the slow reference decoder
  (``sparseloco.payload.validate_payload``) or the model's names/shapes/codec reject.

Mutators come in two families. *Byte* mutators change a validly sealed object without the
key (transit corruption, an attacker in the middle, a replay). *Signed* mutators model a
registered but malicious peer: they change the contents (JSON header, zstd body, safetensors
header, tensor bytes, payload fields) and then sign the result with the peer's own key, so the
reader's deeper checks are reached instead of stopping at the signature.

Every mutator takes a :class:`random.Random`, so the same code runs under hypothesis
(``st.randoms()``, shrinkable) in the test suite and under a seeded generator in the
benchmark.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import zstandard
from blake3 import blake3

from netcomm import (
    Ed25519Signer,
    EnvelopeError,
    EnvelopeLimits,
    ExchangeConfig,
    LocalStorage,
    ModelSpec,
    PeerRecord,
    StaticDirectory,
    StorageExchange,
    default_verifiers,
    open_envelope,
    read_header,
    seal_envelope,
    update_key,
)
from netcomm.envelope import FORMAT_VERSION, PREFIX_SIZE, _canonical, _signed_message
from sparseloco import CodecConfig, CompressedUpdate, ErrorFeedback, encode
from sparseloco.chunking import ChunkLayout
from sparseloco.codec import CompressedTensor
from sparseloco.payload import DenseUpdate, Payload, validate_payload
from sparseloco.serialization import dump_safetensors

WINDOW = 7
PEER = "alice"
#: caps sized for the fuzz model (~60 KB raw updates), as a deployment sizes them for its model
LIMITS = EnvelopeLimits(
    max_object_bytes=1 << 20,
    max_decompressed_bytes=4 << 20,
    max_header_bytes=16 << 10,
    max_tensors=256,
    max_safetensors_header_bytes=1 << 20,
    max_window_bytes=1 << 23,
)
#: seconds one case may take before it counts as a hang
CASE_TIMEOUT_S = 5.0

_BOUNDARY_INTS = [
    0,
    1,
    -1,
    7,
    8,
    255,
    256,
    65535,
    65536,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**53 + 1,
    2**63 - 1,
    2**64 - 1,
    2**64,
    10**30,
]


def fuzz_shapes() -> dict[str, tuple[int, ...]]:
    """A small model with every chunking case: 2-D multiples of 64, odd sizes, 1-D, tiny."""
    return {
        "emb.weight": (96, 64),
        "fc.weight": (128, 64),
        "fc.bias": (128,),
        "odd.weight": (7, 9),
        "head.weight": (8, 128),
        "scale": (1,),
    }


@dataclass
class Target:
    """Everything a case needs: the model, keys, valid bases and the expectations."""

    spec: ModelSpec
    signer: Ed25519Signer
    attacker: Ed25519Signer
    bases: list[tuple[Payload, CodecConfig | None]]
    foreign_spec: ModelSpec
    bombs: list[bytes] = field(default_factory=list)
    #: the registered peers by id (``PEER`` is ``signer``), for replays through an exchange
    peers: dict[str, Ed25519Signer] = field(default_factory=dict)

    @classmethod
    def build(cls, seed: int = 0) -> Target:
        gen = torch.Generator().manual_seed(seed)
        shapes = fuzz_shapes()
        deltas = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
        bases: list[tuple[Payload, CodecConfig | None]] = []
        for codec in (
            CodecConfig(backend="torch"),
            CodecConfig(index_coding="rice", backend="torch"),
            CodecConfig(chunk_size=16, topk=8, value_bits=4, backend="torch"),
            CodecConfig(chunk_size=32, topk=5, value_bits=8, backend="torch"),
        ):
            bases.append((encode(deltas, ErrorFeedback(codec)), codec))
        bases.append((DenseUpdate({n: d.clone() for n, d in deltas.items()}), None))
        spec = ModelSpec.from_named_tensors({n: torch.zeros(s) for n, s in shapes.items()})
        foreign = ModelSpec.from_named_tensors(
            {n: torch.zeros(s) for n, s in {**shapes, "extra": (3,)}.items()}
        )
        # Bodies that decompress to far more than any header may declare under LIMITS.
        big = zstandard.ZstdCompressor(level=1)
        bombs = [
            big.compress(b"\0" * (64 << 20)),
            big.compress(b"\0" * (LIMITS.max_decompressed_bytes + 1)),
            zstandard.ZstdCompressor(level=1, write_content_size=False).compress(b"\0" * (8 << 20)),
        ]
        signer = Ed25519Signer.from_seed(b"\x11" * 32)
        return cls(
            spec=spec,
            signer=signer,
            attacker=Ed25519Signer.from_seed(b"\x22" * 32),
            bases=bases,
            foreign_spec=foreign,
            bombs=bombs,
            peers={PEER: signer, "bob": Ed25519Signer.from_seed(b"\x33" * 32)},
        )

    def seal(
        self,
        payload: Payload,
        *,
        window: int = WINDOW,
        signer: Ed25519Signer | None = None,
        publisher: str = PEER,
        spec: ModelSpec | None = None,
    ) -> bytes:
        return seal_envelope(
            payload,
            window=window,
            publisher=publisher,
            fingerprint=(spec or self.spec).fingerprint,
            signer=signer or self.signer,
        )


@dataclass
class Case:
    """One hostile object, whether its author held the key, and the reader's expectations."""

    blob: bytes
    signed: bool
    codec: CodecConfig | None
    original: bytes | None = None
    #: the defect is caught by the receiver's expectations (window, model), so open strictly
    strict: bool = False
    #: structured mutations: the class of a defect every reader must reject (see STRUCTURED)
    must_reject: str | None = None
    #: the payload a StorageExchange accepted in an earlier window; the case is gathered
    #: through that exchange (:func:`open_replay`)
    replay_of: Payload | None = None


# -- helpers building signed hostile objects ----------------------------------------------


def _header_for(payload: Payload, raw: bytes, body: bytes, target: Target) -> dict[str, Any]:
    codec = payload.codec.wire_fields() if isinstance(payload, CompressedUpdate) else None
    return {
        "format": "netcomm.envelope",
        "version": FORMAT_VERSION,
        "scheme": "ed25519",
        "publisher": PEER,
        "window": WINDOW,
        "fingerprint": target.spec.fingerprint,
        "kind": payload.kind,
        "codec": codec,
        "compression": "zstd",
        "raw_len": len(raw),
        "body_len": len(body),
        "body_blake3": blake3(body).hexdigest(),
        "tensors": len(payload.to_tensors()[0]),
    }


def sign_raw(target: Target, header: dict[str, Any] | bytes, body: bytes) -> bytes:
    """A correctly signed envelope around any header and body (the malicious-peer case)."""
    hdr = header if isinstance(header, bytes) else _canonical(header)
    unsigned = struct.pack("<4sHHIQ", b"NCEN", FORMAT_VERSION, 0, len(hdr), len(body))
    sig = target.signer.sign(_signed_message(unsigned, hdr))
    prefix = struct.pack("<4sHHIQ", b"NCEN", FORMAT_VERSION, len(sig), len(hdr), len(body))
    return prefix + hdr + body + sig


def _resign_raw(
    target: Target, payload: Payload, raw: bytes, rng: random.Random, **header_changes: Any
) -> bytes:
    """Sign ``raw`` as a zstd body or, half the time, as it is."""
    if rng.random() < 0.5:
        body = zstandard.ZstdCompressor(level=1).compress(raw)
        header = _header_for(payload, raw, body, target)
    else:
        body = raw
        header = _header_for(payload, raw, body, target)
        header.update(compression="none")
    header.update(header_changes)
    return sign_raw(target, header, body)


def _hostile_int(rng: random.Random) -> int:
    return rng.choice(_BOUNDARY_INTS) if rng.random() < 0.7 else rng.randint(-(2**70), 2**70)


def _hostile_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            _hostile_int(rng),
            rng.random() * 1e300,
            float("nan") if rng.random() < 0.5 else float("inf"),
            "",
            "x" * rng.randint(1, 300),
            "\u0000\ud800",
            None,
            True,
            [],
            {},
            [_hostile_int(rng)],
            {"a": [1, {"b": None}]},
        ]
    )


def _flip_bits(data: bytes, rng: random.Random, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray(data)
    end = len(out) if end is None else end
    if end <= start:
        return data
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(start, end)
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def _split(blob: bytes) -> tuple[int, int, int]:
    _, _, sig_len, header_len, body_len = struct.unpack_from("<4sHHIQ", blob)
    return sig_len, header_len, body_len


# -- byte mutators: no key needed, every acceptance is a forgery ---------------------------


def m_bitflip(t: Target, rng: random.Random) -> Case:
    payload, codec = rng.choice(t.bases)
    blob = t.seal(payload)
    _, header_len, body_len = _split(blob)
    regions = [
        (0, PREFIX_SIZE),
        (PREFIX_SIZE, PREFIX_SIZE + header_len),
        (PREFIX_SIZE + header_len, PREFIX_SIZE + header_len + body_len),
        (PREFIX_SIZE + header_len + body_len, len(blob)),
        (0, len(blob)),
    ]
    start, end = rng.choice(regions)
    return Case(_flip_bits(blob, rng, start, end), False, codec, blob)


def m_truncate(t: Target, rng: random.Random) -> Case:
    payload, codec = rng.choice(t.bases)
    blob = t.seal(payload)
    cut = rng.choice([0, 1, PREFIX_SIZE - 1, PREFIX_SIZE, len(blob) - 1, rng.randrange(len(blob))])
    return Case(blob[:cut], False, codec, blob)


def m_extend(t: Target, rng: random.Random) -> Case:
    payload, codec = rng.choice(t.bases)
    blob = t.seal(payload)
    extra = rng.randbytes(rng.randint(1, 64))
    out = blob + extra if rng.random() < 0.5 else extra + blob
    return Case(out, False, codec, blob)


def m_splice(t: Target, rng: random.Random) -> Case:
    payload, codec = rng.choice(t.bases)
    blob = t.seal(payload)
    a = rng.randrange(len(blob))
    b = min(len(blob), a + rng.randint(0, 256))
    filler = rng.choice([b"", rng.randbytes(rng.randint(1, 64)), blob[b : b + (b - a)]])
    return Case(blob[:a] + filler + blob[b:], False, codec, blob)


def m_length_field(t: Target, rng: random.Random) -> Case:
    payload, codec = rng.choice(t.bases)
    blob = t.seal(payload)
    sig_len, header_len, body_len = _split(blob)
    which = rng.randrange(3)
    value = rng.choice([*_BOUNDARY_INTS[:14], sig_len + 1, header_len - 1, body_len + 1])
    fields = [sig_len, header_len, body_len]
    limits = [0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF]
    fields[which] = max(0, value) & limits[which]
    prefix = struct.pack("<4sHHIQ", b"NCEN", FORMAT_VERSION, *fields)
    return Case(prefix + blob[PREFIX_SIZE:], False, codec, blob)


def m_magic_version(t: Target, rng: random.Random) -> Case:
    payload, codec = rng.choice(t.bases)
    blob = t.seal(payload)
    if rng.random() < 0.5:
        out = rng.randbytes(4) + blob[4:]
    else:
        out = blob[:4] + struct.pack("<H", rng.choice([0, 1, 2, 0xFFFF])) + blob[6:]
    return Case(out, False, codec, blob)


def m_wrong_key(t: Target, rng: random.Random) -> Case:
    payload, codec = rng.choice(t.bases)
    return Case(t.seal(payload, signer=t.attacker), False, codec)


def m_impersonate(t: Target, rng: random.Random) -> Case:
    """The attacker's own validly signed envelope, served as another peer's object."""
    payload, codec = rng.choice(t.bases)
    return Case(t.seal(payload, signer=t.attacker, publisher="mallory"), False, codec)


def m_replay(t: Target, rng: random.Random) -> Case:
    """An honest peer's genuinely signed update of another window, replayed."""
    payload, codec = rng.choice(t.bases)
    window = rng.choice([0, WINDOW - 1, WINDOW + 1, 2**40])
    return Case(t.seal(payload, window=window), False, codec, strict=True)


def m_foreign_model(t: Target, rng: random.Random) -> Case:
    """A genuinely signed update made for another model (foreign fingerprint)."""
    payload, codec = rng.choice(t.bases)
    return Case(t.seal(payload, spec=t.foreign_spec), False, codec, strict=True)


def m_random_blob(t: Target, rng: random.Random) -> Case:
    n = rng.choice([0, 5, PREFIX_SIZE, 100, 4096])
    head = b"NCEN" + struct.pack("<H", 1) if rng.random() < 0.7 else b""
    return Case(head + rng.randbytes(n), False, rng.choice(t.bases)[1])


# -- signed mutators: a registered malicious peer ------------------------------------------


def m_header_field(t: Target, rng: random.Random) -> Case:
    payload, codec = rng.choice(t.bases)
    tensors, meta = payload.to_tensors()
    raw = dump_safetensors(tensors, meta)
    body = zstandard.ZstdCompressor(level=1).compress(raw)
    header = _header_for(payload, raw, body, t)
    name = rng.choice([*header, "extra"])
    action = rng.random()
    if action < 0.15:
        header.pop(name, None)
    elif name == "codec" and rng.random() < 0.6:
        wire = dict(header["codec"] or CodecConfig().wire_fields())
        wire[rng.choice([*wire, "extra"])] = _hostile_value(rng)
        header["codec"] = wire
    elif name in ("raw_len", "tensors", "window", "body_len") and rng.random() < 0.6:
        header[name] = _hostile_int(rng)
    elif name == "kind":
        header[name] = rng.choice(["dense", "sparse", "", "other"])
    else:
        header[name] = _hostile_value(rng)
    try:
        hdr = _canonical(header)
    except ValueError:  # NaN is not canonical JSON; write it the lax way, as an attacker may
        hdr = json.dumps(header, sort_keys=True).encode()
    return Case(sign_raw(t, hdr, body), True, codec)


def m_header_bytes(t: Target, rng: random.Random) -> Case:
    """Raw JSON header bytes damaged (not JSON, wrong encoding, nesting), then signed."""
    payload, codec = rng.choice(t.bases)
    tensors, meta = payload.to_tensors()
    raw = dump_safetensors(tensors, meta)
    body = zstandard.ZstdCompressor(level=1).compress(raw)
    hdr = _canonical(_header_for(payload, raw, body, t))
    choice = rng.randrange(4)
    if choice == 0:
        hdr = _flip_bits(hdr, rng)
    elif choice == 1:
        hdr = b"[" * rng.randint(1, 100_000)
    elif choice == 2:
        hdr = hdr.replace(b"{", b"\xff", 1)
    else:
        hdr = hdr[: rng.randrange(len(hdr))]
    return Case(sign_raw(t, hdr, body), True, codec)


def m_zstd(t: Target, rng: random.Random) -> Case:
    """Hostile compressed bodies: bombs, no content size, several frames, garbage, dictionaries."""
    payload, codec = rng.choice(t.bases)
    tensors, meta = payload.to_tensors()
    raw = dump_safetensors(tensors, meta)
    good = zstandard.ZstdCompressor(level=1).compress(raw)
    choice = rng.randrange(7)
    declared = len(raw)
    if choice == 0:
        body = rng.choice(t.bombs)
    elif choice == 1:
        body = rng.choice(t.bombs)
        declared = LIMITS.max_decompressed_bytes
    elif choice == 2:
        body = good + good
    elif choice == 3:
        body = _flip_bits(good, rng)
    elif choice == 4:
        body = rng.randbytes(rng.randint(0, 200))
    elif choice == 5:
        cobj = zstandard.ZstdCompressor(level=1).compressobj()
        body = cobj.compress(raw) + cobj.flush()
    else:
        body = good[: rng.randrange(len(good))]
    header = _header_for(payload, raw, body, t)
    header["raw_len"] = declared
    return Case(sign_raw(t, header, body), True, codec)


def m_safetensors_header(t: Target, rng: random.Random) -> Case:
    """The safetensors JSON: dtypes, shapes, huge dims, offsets, counts, metadata strings."""
    payload, codec = rng.choice(t.bases)
    tensors, meta = payload.to_tensors()
    raw = dump_safetensors(tensors, meta)
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    choice = rng.randrange(10)
    if choice == 0:
        entry = header[rng.choice(names)]
        entry["dtype"] = rng.choice(["F64", "I64", "BOOL", "F8_E4M3", "U8", "F32", "BF16", ""])
    elif choice == 1:
        entry = header[rng.choice(names)]
        entry["shape"] = [_hostile_int(rng) for _ in range(rng.randint(0, 10))]
    elif choice == 2:
        entry = header[rng.choice(names)]
        entry["data_offsets"] = [_hostile_int(rng), _hostile_int(rng)]
    elif choice == 3:
        header.pop(rng.choice(names))
    elif choice == 4:
        header[f"extra{rng.randrange(9)}"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    elif choice in (5, 6, 7):
        # the payload's own metadata: codec JSON, shapes with huge dims, Rice parameters
        md = header["__metadata__"]
        key = rng.choice(["codec", "shapes", "rice", "format", "kind"])
        if key == "shapes" and key in md:
            shapes = json.loads(md["shapes"])
            victim = rng.choice(sorted(shapes))
            shapes[victim] = rng.choice(
                [
                    [2**39, 2**39],
                    [2**40 - 1],
                    [0],
                    [],
                    [1] * 9,
                    [_hostile_int(rng)],
                    [64, 2**30],
                    "x",
                ]
            )
            md["shapes"] = json.dumps(shapes, sort_keys=True)
        elif key == "rice":
            name = rng.choice(names).split("::")[0]
            md["rice"] = json.dumps({name: _hostile_value(rng)}, sort_keys=True)
        elif key == "codec" and key in md:
            wire = json.loads(md["codec"])
            wire[rng.choice([*wire, "extra"])] = _hostile_value(rng)
            md["codec"] = json.dumps(wire, sort_keys=True)
        else:
            md[key] = rng.choice(["", "{", "sparse", "dense", "x" * 1000, "[" * 100_000])
    elif choice == 8:
        header["__metadata__"] = rng.choice([None, [], {"a": 1}, "x"])
    else:
        # nesting deeper than any JSON parser's recursion limit
        hdr = b'{"a":' + b"[" * 100_000 + b"}"
        raw = struct.pack("<Q", len(hdr)) + hdr + data
        return Case(_resign_raw(t, payload, raw, rng), True, codec)
    hdr = json.dumps(header, separators=(",", ":")).encode()
    hdr += b" " * (-len(hdr) % 8)
    new_raw = struct.pack("<Q", len(hdr)) + hdr + data
    count = sum(1 for k in header if k != "__metadata__")
    return Case(_resign_raw(t, payload, new_raw, rng, tensors=count), True, codec)


def m_tensor_bytes(t: Target, rng: random.Random) -> Case:
    """Bit flips and fills in the tensor data: indices out of range or unsorted, NaN tables."""
    payload, codec = rng.choice(t.bases)
    tensors, meta = payload.to_tensors()
    name = rng.choice(sorted(tensors))
    buf = tensors[name].contiguous().view(torch.uint8).reshape(-1).clone()
    if buf.numel():
        choice = rng.randrange(3)
        if choice == 0:
            buf = torch.tensor(list(_flip_bits(bytes(buf.tolist()), rng)), dtype=torch.uint8)
        elif choice == 1:
            buf.fill_(rng.choice([0, 0xFF, 0x7F]))
        else:
            buf[rng.randrange(buf.numel())] = rng.randrange(256)
    tensors[name] = buf.view(tensors[name].dtype).reshape(tensors[name].shape)
    raw = dump_safetensors(tensors, meta)
    return Case(_resign_raw(t, payload, raw, rng), True, codec)


def m_payload_fields(t: Target, rng: random.Random) -> Case:
    """Well-formed safetensors with wrong contents: lengths, shapes, NaN/Inf, dtypes, Rice p."""
    payload, codec = rng.choice(t.bases)
    if isinstance(payload, DenseUpdate):
        tensors = {n: v.clone() for n, v in payload.tensors.items()}
        name = rng.choice(sorted(tensors))
        choice = rng.randrange(4)
        if choice == 0:
            tensors[name].view(-1)[rng.randrange(tensors[name].numel())] = rng.choice(
                [float("nan"), float("inf"), -float("inf")]
            )
        elif choice == 1:
            tensors[name] = tensors[name].to(rng.choice([torch.float16, torch.bfloat16]))
        elif choice == 2:
            tensors[name] = torch.zeros(rng.choice([(0,), (2, 2), (1, 1, 1)]))
        else:
            tensors[name] = tensors[name].to(torch.uint8)
        bad = DenseUpdate(tensors)
        raw = dump_safetensors(*bad.to_tensors())
        return Case(_resign_raw(t, bad, raw, rng), True, codec)
    assert isinstance(payload, CompressedUpdate)
    cts = dict(payload.tensors)
    name = rng.choice(sorted(cts))
    ct = cts[name]
    choice = rng.randrange(8)
    fields: dict[str, Any] = {
        "shape": ct.shape,
        "indices": ct.indices,
        "gaps": ct.gaps,
        "codes": ct.codes,
        "table": ct.table,
        "rice_param": ct.rice_param,
    }
    if choice == 0:
        fields["shape"] = rng.choice([(2**39,), (2**20, 2**20), (0, 64), (64,), (1, 2, 3)])
    elif choice == 1:
        part = rng.choice(["indices", "gaps", "codes"])
        n = fields[part].numel()
        fields[part] = torch.randint(
            0, 256, (rng.choice([0, 1, max(0, n - 1), n + 1, n * 2]),), dtype=torch.uint8
        )
    elif choice == 2:
        table = ct.table.clone()
        table[rng.randrange(table.numel())] = rng.choice([float("nan"), float("inf"), 1e38])
        fields["table"] = table
    elif choice == 3:
        fields["table"] = ct.table.to(rng.choice([torch.float16, torch.bfloat16]))
    elif choice == 4:
        fields["table"] = torch.zeros(rng.choice([0, 1, 3, 5, 256]))
    elif choice == 5:
        fields["rice_param"] = rng.randint(0, 16)
    elif choice == 6:
        fields["indices"] = torch.randint(0, 256, (ct.indices.numel(),), dtype=torch.uint8)
    else:
        fields["codes"] = torch.randint(0, 256, (ct.codes.numel(),), dtype=torch.uint8)
    cts[name] = CompressedTensor(**fields)
    bad = CompressedUpdate(codec=payload.codec, tensors=cts)
    raw = dump_safetensors(*bad.to_tensors())
    return Case(_resign_raw(t, bad, raw, rng), True, codec)


# -- structured mutators: one defect each, which every reader must reject --------------------


def _canonical_parts(t: Target, rng: random.Random) -> tuple[Payload, CodecConfig | None, bytes]:
    payload, codec = rng.choice(t.bases)
    return payload, codec, dump_safetensors(*payload.to_tensors())


def _split_raw(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join_raw(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    hdr = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":"))
    hdr = hdr.encode() if isinstance(hdr, str) else hdr
    hdr += b" " * (-len(hdr) % 8)
    return struct.pack("<Q", len(hdr)) + hdr + data


def _confuse(value: Any, rng: random.Random) -> Any:
    """A value of another JSON type that lax code would treat as equal or usable."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return rng.choice([float(value), str(value), value == 1 or rng.random() < 0.5, [value]])
    if isinstance(value, float):
        return rng.choice([str(value), [value], None])
    if isinstance(value, str):
        return rng.choice([[value], {value: value}, None, 0])
    if isinstance(value, list):
        return rng.choice([{"0": value}, json.dumps(value), None])
    return rng.choice([[value], json.dumps(value), 1])


def ms_type_confusion(t: Target, rng: random.Random) -> Case:
    """One field of the envelope header, codec, safetensors entry or body metadata retyped."""
    payload, codec, raw = _canonical_parts(t, rng)
    place = rng.randrange(4)
    header = None
    if place == 0 or (place == 1 and not isinstance(payload, CompressedUpdate)):
        header = _header_for(payload, raw, raw, t)
        header.update(compression="none")
        name = rng.choice(sorted(header))
        header[name] = _confuse(header[name], rng)
    elif place == 1:
        header = _header_for(payload, raw, raw, t)
        header.update(compression="none")
        name = rng.choice(sorted(header["codec"]))
        header["codec"][name] = _confuse(header["codec"][name], rng)
    elif place == 2:
        st_header, data = _split_raw(raw)
        entry = st_header[rng.choice([k for k in st_header if k != "__metadata__"])]
        name = rng.choice(["dtype", "shape", "data_offsets"])
        if name != "dtype" and entry[name] and rng.random() < 0.5:
            entry[name][rng.randrange(len(entry[name]))] = _confuse(entry[name][0], rng)
        else:
            entry[name] = _confuse(entry[name], rng)
        raw = _join_raw(st_header, data)
    elif isinstance(payload, CompressedUpdate):
        st_header, data = _split_raw(raw)
        wire = json.loads(st_header["__metadata__"]["codec"])
        name = rng.choice(sorted(wire))
        wire[name] = _confuse(wire[name], rng)
        st_header["__metadata__"]["codec"] = json.dumps(wire, sort_keys=True)
        raw = _join_raw(st_header, data)
    else:
        st_header, data = _split_raw(raw)
        st_header["__metadata__"]["kind"] = _confuse("dense", rng)
        raw = _join_raw(st_header, data)
    if header is None:
        header = _header_for(payload, raw, raw, t)
        header.update(compression="none")
    return Case(sign_raw(t, header, raw), True, codec, must_reject="type_confusion")


def ms_canonical_break(t: Target, rng: random.Random) -> Case:
    """The same contents in another encoding: one update, one encoding, or it is rejected."""
    payload, codec, raw = _canonical_parts(t, rng)
    choice = rng.randrange(9)
    if choice >= 5:
        st_header, data = _split_raw(raw)
        names = [k for k in st_header if k != "__metadata__"]
        if choice == 5:  # a duplicate tensor entry (the parser keeps the last)
            name = rng.choice(names)
            text = json.dumps(st_header, separators=(",", ":"))
            dup = json.dumps(st_header[name], separators=(",", ":"))
            raw = _join_raw(f'{text[:-1]},"{name}":{dup}}}', data)
        elif choice == 6:  # keys out of order
            raw = _join_raw(dict(reversed(list(st_header.items()))), data)
        elif choice == 7:  # spacing
            raw = _join_raw(json.dumps(st_header), data)
        else:  # nonzero pad bits, or a non-canonical metadata string
            raw = _pad_bits_or_meta(payload, st_header, data, rng)
        header = _header_for(payload, raw, raw, t)
        header.update(compression="none")
        return Case(sign_raw(t, header, raw), True, codec, must_reject="canonical")
    header = _header_for(payload, raw, raw, t)
    header.update(compression="none")
    hdr = _canonical(header)
    if choice == 0:
        hdr = b"\xef\xbb\xbf" + hdr
    elif choice == 1:
        hdr = hdr.replace(b'"alice"', b'"\\u0061lice"', 1)
    elif choice == 2:
        hdr = hdr.replace(b'"window":7', b'"window":7,"window":7', 1)
    elif choice == 3:
        hdr = json.dumps(header, sort_keys=True).encode()  # spaces
    else:
        hdr = json.dumps(header, separators=(",", ":")).encode()  # key order
    return Case(sign_raw(t, hdr, raw), True, codec, must_reject="canonical")


def _pad_bits_or_meta(
    payload: Payload, st_header: dict[str, Any], data: bytes, rng: random.Random
) -> bytes:
    meta = st_header["__metadata__"]
    if isinstance(payload, CompressedUpdate):
        code_names = [n for n, ct in payload.tensors.items() if _has_pad_bits(ct, payload.codec)]
        if code_names and rng.random() < 0.7:
            entry = st_header[f"{rng.choice(code_names)}::code"]
            out = bytearray(data)
            out[entry["data_offsets"][1] - 1] |= 0x80  # the highest pad bit
            return _join_raw(st_header, bytes(out))
        key = rng.choice(["codec", "shapes", "rice"])
        meta[key] = json.dumps(json.loads(meta[key]), separators=(",", ":"), sort_keys=False)
        if meta[key] == json.dumps(json.loads(meta[key]), sort_keys=True):
            meta[key] = " " + meta[key]
    else:
        meta["format"] = " " + meta["format"]
    return _join_raw(st_header, data)


def ms_length_offset(t: Target, rng: random.Random) -> Case:
    """Lengths, counts and offsets that disagree with each other or with the bytes."""
    payload, codec, raw = _canonical_parts(t, rng)
    body = zstandard.ZstdCompressor(level=1).compress(raw)
    header = _header_for(payload, raw, body, t)
    choice = rng.randrange(6)
    if choice == 0:
        header["raw_len"] += rng.choice([-8, -1, 1, 8, 1 << 20])
    elif choice == 1:
        header["tensors"] += rng.choice([-1, 1])
    elif choice == 2:  # the zstd frame declares another size than the header
        body = zstandard.ZstdCompressor(level=1).compress(raw + b"\0" * 8)
        header.update(body_len=len(body), body_blake3=blake3(body).hexdigest())
    else:
        st_header, data = _split_raw(raw)
        names = [k for k in st_header if k != "__metadata__"]
        entry = st_header[rng.choice(names)]
        lo, hi = entry["data_offsets"]
        if choice == 3:  # overlap / gap, sizes unchanged
            shift = rng.choice([-4, -1, 1, 4])
            entry["data_offsets"] = [lo + shift, hi + shift]
        elif choice == 4:  # the range disagrees with shape and dtype
            entry["data_offsets"] = [lo, hi + rng.choice([-1, 1])]
        else:  # the data section is longer or shorter than the tensors tile
            data = data + b"\0" * 8 if rng.random() < 0.5 else data[:-1]
        raw = _join_raw(st_header, data)
        body = raw
        header = _header_for(payload, raw, body, t)
        header.update(compression="none")
        return Case(sign_raw(t, header, body), True, codec, must_reject="length_offset")
    return Case(sign_raw(t, header, body), True, codec, must_reject="length_offset")


def ms_overflow_shape(t: Target, rng: random.Random) -> Case:
    """Shapes and integers whose products or values overflow 64 bits or any real model."""
    payload, codec, raw = _canonical_parts(t, rng)
    huge = rng.choice([2**32, 2**40 - 1, 2**62, 2**63, 2**64 + 1])
    choice = rng.randrange(4)
    header = None
    if choice == 0:
        header = _header_for(payload, raw, raw, t)
        header.update(compression="none")
        header[rng.choice(["window", "tensors", "raw_len"])] = huge
    else:
        st_header, data = _split_raw(raw)
        names = [k for k in st_header if k != "__metadata__"]
        name = rng.choice(names)
        if choice == 1 or not isinstance(payload, CompressedUpdate):
            # a zero dimension keeps the byte count 0 while the product overflows
            st_header[name]["shape"] = [0, huge, huge]
        else:
            shapes = json.loads(st_header["__metadata__"]["shapes"])
            shapes[rng.choice(sorted(shapes))] = [huge, huge] if choice == 2 else [2**39, 2**39]
            st_header["__metadata__"]["shapes"] = json.dumps(shapes, sort_keys=True)
        raw = _join_raw(st_header, data)
    if header is None:
        header = _header_for(payload, raw, raw, t)
        header.update(compression="none")
    return Case(sign_raw(t, header, raw), True, codec, must_reject="overflow_shape")


def ms_cross_window_replay(t: Target, rng: random.Random) -> Case:
    """An update accepted in an earlier window, re-signed for this one by its author or by
    another peer (opened through a gathering exchange, :func:`open_replay`)."""
    payload, codec = rng.choice(t.bases)
    publisher = rng.choice([PEER, "bob"])
    blob = t.seal(payload, publisher=publisher, signer=t.peers[publisher])
    return Case(blob, True, codec, must_reject="cross_window_replay", replay_of=payload)


def _has_pad_bits(ct: CompressedTensor, codec: CodecConfig) -> bool:
    layout = ChunkLayout.for_shape(ct.shape, codec.chunk_size)
    return (layout.num_chunks * layout.k(codec.topk) * codec.value_bits) % 8 != 0


MUTATORS: dict[str, Callable[[Target, random.Random], Case]] = {
    "bitflip": m_bitflip,
    "truncate": m_truncate,
    "extend": m_extend,
    "splice": m_splice,
    "length_field": m_length_field,
    "magic_version": m_magic_version,
    "wrong_key": m_wrong_key,
    "impersonate": m_impersonate,
    "replay": m_replay,
    "foreign_model": m_foreign_model,
    "random_blob": m_random_blob,
    "header_field": m_header_field,
    "header_bytes": m_header_bytes,
    "zstd": m_zstd,
    "safetensors_header": m_safetensors_header,
    "tensor_bytes": m_tensor_bytes,
    "payload_fields": m_payload_fields,
    "type_confusion": ms_type_confusion,
    "canonical_break": ms_canonical_break,
    "length_offset": ms_length_offset,
    "overflow_shape": ms_overflow_shape,
    "cross_window_replay": ms_cross_window_replay,
}
#: the classes of structured defects, each counted on its own in :class:`FuzzStats`
STRUCTURED = (
    "type_confusion",
    "canonical",
    "length_offset",
    "overflow_shape",
    "cross_window_replay",
)


# -- running cases -------------------------------------------------------------------------


class CaseTimeout(Exception):
    """Raised by the alarm when one case runs past :data:`CASE_TIMEOUT_S`."""


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout


def open_case(t: Target, case: Case, strict: bool) -> Payload:
    """Open ``case`` as a gathering peer would (``strict``) or with only the key checked."""
    kwargs: dict[str, Any] = dict(
        expected_peer=PEER,
        public_key=t.signer.public_key,
        verifiers=default_verifiers(),
        limits=LIMITS,
    )
    if strict:
        kwargs.update(
            window=WINDOW, fingerprint=t.spec.fingerprint, shapes=t.spec.shapes, codec=case.codec
        )
    return open_envelope(case.blob, **kwargs).payload


def open_replay(t: Target, case: Case, strict: bool) -> Payload:
    """Gather ``case`` through an exchange that accepted the same payload a window earlier.

    The earlier copy is honest (``PEER``'s, for ``WINDOW - 1``); the case is the same payload
    signed for ``WINDOW`` by its author or another peer. A rejection is raised as the
    :class:`EnvelopeError` its status names, an acceptance returns the payload.
    """
    with tempfile.TemporaryDirectory() as root:
        storage = LocalStorage(root)
        directory = StaticDirectory(
            PeerRecord(name, storage, signer.public_key) for name, signer in t.peers.items()
        )
        config = ExchangeConfig(
            deadline_s=10.0, poll_interval_s=0.01, attempts=1, limits=LIMITS, codec=case.codec
        )
        receiver = StorageExchange("carol", storage, directory, t.attacker, t.spec, config)
        assert case.replay_of is not None
        storage.put(update_key("", WINDOW - 1, PEER), t.seal(case.replay_of, window=WINDOW - 1))
        earlier = receiver.gather(WINDOW - 1, [PEER]).statuses[PEER]
        if earlier.status != "ok":
            raise RuntimeError(f"the honest earlier copy was not accepted: {earlier.reason}")
        publisher = read_header(case.blob, LIMITS)[0]["publisher"]
        storage.put(update_key("", WINDOW, publisher), case.blob)
        result = receiver.gather(WINDOW, [publisher])
    status = result.statuses[publisher]
    if status.status != "ok":
        raise EnvelopeError(status.reason.split(":")[0], status.reason)
    return result.updates[publisher]


def check_accepted(t: Target, case: Case, payload: Payload, strict: bool) -> str | None:
    """Why an accepted payload is a defect, or ``None`` when accepting it was right."""
    if not case.signed and case.blob != case.original:
        return "forged"
    try:
        validate_payload(payload)
        if strict:
            if isinstance(payload, CompressedUpdate):
                payload.check_matches(t.spec.shapes, case.codec or payload.codec)
            else:
                payload.check_matches(t.spec.shapes)
    except Exception as exc:
        return f"unusable: {type(exc).__name__}: {exc}"
    return None


@dataclass
class FuzzStats:
    """What a fuzz run found."""

    cases: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    by_mutator: Counter[str] = field(default_factory=Counter)
    defects: list[dict[str, Any]] = field(default_factory=list)
    crashes: int = 0
    hangs: int = 0
    forged: int = 0
    unusable: int = 0
    #: per structured class (:data:`STRUCTURED`): cases, untyped_exceptions, accepted_wrong,
    #: noncanonical_accepted (a canonical-form break that was accepted)
    structured: dict[str, Counter[str]] = field(
        default_factory=lambda: {name: Counter() for name in STRUCTURED}
    )
    max_case_s: float = 0.0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    rss_growth_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "accepted": self.accepted,
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "cases_by_mutator": dict(sorted(self.by_mutator.items())),
            "crashes": self.crashes,
            "hangs": self.hangs,
            "forged_accepted": self.forged,
            "unusable_accepted": self.unusable,
            "structured": {
                name: {
                    key: counts[key]
                    for key in (
                        "cases",
                        "untyped_exceptions",
                        "accepted_wrong",
                        "noncanonical_accepted",
                    )
                }
                for name, counts in self.structured.items()
            },
            "defects": self.defects[:20],
            "max_case_s": self.max_case_s,
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "rss_growth_mb": self.rss_growth_mb,
        }


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(
    t: Target,
    stats: FuzzStats,
    mutator: str,
    rng: random.Random,
    opener: Callable[[Target, Case, bool], Payload] = open_case,
) -> str:
    """Build and open one case; record and return its outcome."""
    case = MUTATORS[mutator](t, rng)
    # a structured defect is one a gathering peer, with all its expectations, must reject
    strict = case.strict or case.must_reject is not None or rng.random() < 0.75
    if case.replay_of is not None:
        opener = open_replay
    stats.cases += 1
    stats.by_mutator[mutator] += 1
    counts = stats.structured[case.must_reject] if case.must_reject else Counter()
    counts["cases"] += 1
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        payload = opener(t, case, strict)
    except EnvelopeError as exc:
        outcome = f"rejected:{exc.reason}"
        stats.rejected[exc.reason] += 1
    except CaseTimeout:
        outcome = "hang"
        stats.hangs += 1
    except Exception as exc:
        outcome = f"crash:{type(exc).__name__}: {str(exc)[:200]}"
        stats.crashes += 1
        counts["untyped_exceptions"] += 1
    else:
        problem = check_accepted(t, case, payload, strict)
        if case.must_reject is not None:
            wrong = "noncanonical_accepted" if case.must_reject == "canonical" else "accepted_wrong"
            outcome = f"must_reject:{wrong}:{case.must_reject}"
            counts[wrong] += 1
        elif problem is None:
            outcome = "accepted"
            stats.accepted += 1
        elif problem == "forged":
            outcome = problem
            stats.forged += 1
        else:
            outcome = problem
            stats.unusable += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - start
    stats.max_case_s = max(stats.max_case_s, elapsed)
    if not outcome.startswith(("rejected", "accepted")):
        stats.defects.append({"mutator": mutator, "strict": strict, "outcome": outcome})
    return outcome


def fuzz(cases: int, seed: int = 0, target: Target | None = None) -> FuzzStats:
    """Run ``cases`` seeded cases, mutators in turn; returns the statistics."""
    t = target or Target.build()
    rss_before = _rss_mb()
    stats = FuzzStats()
    names = sorted(MUTATORS)
    rng = random.Random(seed)
    start = time.perf_counter()
    for i in range(cases):
        run_one(t, stats, names[i % len(names)], random.Random(rng.getrandbits(64)))
    stats.seconds = time.perf_counter() - start
    stats.peak_rss_mb = _rss_mb()
    stats.rss_growth_mb = stats.peak_rss_mb - rss_before
    return stats
