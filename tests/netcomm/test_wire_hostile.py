"""Hostile signed envelopes (issue 11): strict schema, channel kind, bounded memory, replays."""

from __future__ import annotations

import json
import random
import struct
import tracemalloc

import pytest
import torch
import zstandard
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netcomm.envelope
from gauntlet.decoding import InvalidUpdate, decode_update
from netcomm import (
    Ed25519Signer,
    EnvelopeError,
    EnvelopeLimits,
    ExchangeConfig,
    LocalStorage,
    PeerRecord,
    StaticDirectory,
    StorageExchange,
    default_verifiers,
    open_envelope,
    seal_envelope,
    update_key,
)
from netcomm.envelope import FORMAT_VERSION, _canonical, _signed_message
from netcomm.storage import fresh_buffer
from sparseloco import CodecConfig
from sparseloco.errors import CorruptUpdateError
from sparseloco.packing import pack_codes, unpack_codes
from sparseloco.serialization import dump_safetensors

FAST = dict(deadline_s=30.0, poll_interval_s=0.02, backoff_s=0.01, backoff_max_s=0.05)
WINDOW = 7


def header_for(spec, raw: bytes, body: bytes, compression: str = "none", **changes) -> dict:
    header = {
        "format": "netcomm.envelope",
        "version": FORMAT_VERSION,
        "scheme": "ed25519",
        "publisher": "alice",
        "window": WINDOW,
        "fingerprint": spec.fingerprint,
        "kind": "sparse",
        "codec": CodecConfig().wire_fields(),
        "compression": compression,
        "raw_len": len(raw),
        "body_len": len(body),
        "body_blake3": blake3(body).hexdigest(),
        "tensors": 0,
    }
    header.update(changes)
    return header


def sign(signer, header: dict | bytes, body: bytes, version: int = FORMAT_VERSION) -> bytes:
    hdr = header if isinstance(header, bytes) else _canonical(header)
    unsigned = struct.pack("<4sHHIQ", b"NCEN", version, 0, len(hdr), len(body))
    sig = signer.sign(_signed_message(unsigned, hdr))
    return (
        struct.pack("<4sHHIQ", b"NCEN", version, len(sig), len(hdr), len(body)) + hdr + body + sig
    )


def open_(blob, signer, spec, **overrides):
    kwargs = dict(
        expected_peer="alice",
        public_key=signer.public_key,
        verifiers=default_verifiers(),
        window=WINDOW,
        fingerprint=spec.fingerprint,
        shapes=spec.shapes,
        codec=CodecConfig(),
    )
    kwargs.update(overrides)
    return open_envelope(blob, **kwargs)


def reason(fn) -> str:
    with pytest.raises(EnvelopeError) as info:
        fn()
    return info.value.reason


def signed_raw(signer, spec, tensors, meta) -> bytes:
    raw = dump_safetensors(tensors, meta)
    return sign(signer, header_for(spec, raw, raw, tensors=len(tensors)), raw)


# -- strict schema -------------------------------------------------------------------------


def test_float_value_bits_in_body_metadata_is_an_envelope_error(model, spec, signer, kit):
    tensors, meta = kit.sparse_update(model).to_tensors()
    fields = json.loads(meta["codec"])
    meta["codec"] = json.dumps({**fields, "value_bits": 2.0}, sort_keys=True)
    blob = signed_raw(signer, spec, tensors, meta)
    assert reason(lambda: open_(blob, signer, spec, codec=None)) == "tensors"


@pytest.mark.parametrize("extra", [{"value_coding": "uniform"}, {"backend": "torch"}])
def test_body_codec_metadata_holds_only_canonical_wire_fields(model, spec, signer, kit, extra):
    tensors, meta = kit.sparse_update(model).to_tensors()
    meta["codec"] = json.dumps({**json.loads(meta["codec"]), **extra}, sort_keys=True)
    blob = signed_raw(signer, spec, tensors, meta)
    assert reason(lambda: open_(blob, signer, spec, codec=None)) == "tensors"


def test_list_dtype_in_safetensors_header_is_an_envelope_error(model, spec, signer, kit):
    tensors, meta = kit.sparse_update(model).to_tensors()
    raw = bytearray(dump_safetensors(tensors, meta))
    # same length, so the header stays aligned: '"F32"' -> '["F"]'
    (n,) = struct.unpack_from("<Q", raw)
    header = bytes(raw[8 : 8 + n]).replace(b'"dtype":"F32"', b'"dtype":["F"]', 1)
    assert header != bytes(raw[8 : 8 + n])
    raw[8 : 8 + n] = header
    blob = sign(signer, header_for(spec, bytes(raw), bytes(raw), tensors=len(tensors)), bytes(raw))
    assert reason(lambda: open_(blob, signer, spec)) == "tensors"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda h: b"\xef\xbb\xbf" + h,  # BOM
        lambda h: h.replace(b'"alice"', b'"\\u0061lice"'),  # escape
        lambda h: h.replace(b'"window":7', b'"window":7,"window":7'),  # duplicate key
        lambda h: h.replace(b'"window":7', b'"window":7.0'),
        lambda h: h.replace(b'"window":7', b'"window":true'),
        lambda h: h.replace(b'"error_decay":0.95', b'"error_decay":"0.95"'),
        lambda h: h.replace(b'"value_bits":2', b'"value_bits":2.0'),
        lambda h: h.replace(b'"topk":64', b'"topk":true'),
        lambda h: h.replace(b",", b", "),  # spacing
        lambda h: h.replace(b'"window":7', b'"window":-1'),
        lambda h: h.replace(b'"kind":"sparse"', b'"kind":"dense"'),  # dense with a codec
        # the default value coding is omitted, so spelling it out is a second encoding
        lambda h: h.replace(b'"value_bits":2', b'"value_bits":2,"value_coding":"uniform"'),
        lambda h: h.replace(b'"value_bits":2', b'"value_bits":2,"value_coding":1'),
    ],
)
def test_non_canonical_or_mistyped_headers_are_rejected(model, spec, signer, kit, mangle):
    tensors, meta = kit.sparse_update(model).to_tensors()
    raw = dump_safetensors(tensors, meta)
    canonical = _canonical(header_for(spec, raw, raw, tensors=len(tensors)))
    assert sign(signer, canonical, raw) and open_(sign(signer, canonical, raw), signer, spec)
    hostile = mangle(canonical)
    assert hostile != canonical
    assert reason(lambda: open_(sign(signer, hostile, raw), signer, spec)) == "format"


def test_duplicate_tensor_entries_and_reordered_safetensors_header(model, spec, signer, kit):
    tensors, meta = kit.sparse_update(model).to_tensors()
    raw = dump_safetensors(tensors, meta)
    (n,) = struct.unpack_from("<Q", raw)
    parsed = json.loads(raw[8 : 8 + n])
    first = next(k for k in parsed if k != "__metadata__")
    entry = json.dumps(parsed[first], separators=(",", ":"))
    dup = raw[8 : 8 + n].rstrip(b" ")[:-1] + f',"{first}":{entry}}}'.encode()
    for header in (dup, json.dumps(dict(reversed(parsed.items())), separators=(",", ":")).encode()):
        header += b" " * (-len(header) % 8)
        body = struct.pack("<Q", len(header)) + header + raw[8 + n :]
        blob = sign(signer, header_for(spec, body, body, tensors=len(tensors)), body)
        assert reason(lambda blob=blob: open_(blob, signer, spec)) == "tensors"


def test_nonzero_pad_bits_are_rejected():
    packed = pack_codes(torch.tensor([1, 2, 3]), 2)  # 3 codes of 2 bits: 2 pad bits
    assert unpack_codes(packed, 2, 3).tolist() == [1, 2, 3]
    packed[-1] |= 0b1100_0000
    with pytest.raises(CorruptUpdateError, match="pad bits"):
        unpack_codes(packed, 2, 3)


# -- channel kind --------------------------------------------------------------------------


def test_channel_accepts_only_its_kind(model, spec, signer, kit):
    dense = seal_envelope(
        kit.dense_update(model),
        window=WINDOW,
        publisher="alice",
        fingerprint=spec.fingerprint,
        signer=signer,
    )
    sparse = seal_envelope(
        kit.sparse_update(model),
        window=WINDOW,
        publisher="alice",
        fingerprint=spec.fingerprint,
        signer=signer,
    )
    assert reason(lambda: open_(dense, signer, spec)) == "kind"  # codec => sparse channel
    assert reason(lambda: open_(sparse, signer, spec, codec=None, kind="dense")) == "kind"
    assert open_(dense, signer, spec, codec=None, kind="dense").payload.kind == "dense"


def test_gauntlet_rejects_dense_payload_on_sparse_protocol(model, spec, kit):
    with pytest.raises(InvalidUpdate, match="out of protocol"):
        decode_update(kit.dense_update(model), spec.shapes, CodecConfig())


# -- bounded memory ------------------------------------------------------------------------


def _rle_frame(claimed: int, produced: int) -> bytes:
    """A zstd frame declaring ``claimed`` bytes that holds one RLE block of ``produced``."""
    descriptor = bytes([0xC0, 10 << 3])  # 8-byte content size, 1 MiB window (not single-segment)
    block = (1 | (1 << 1) | (produced << 3)).to_bytes(3, "little") + b"\0"  # last, RLE
    return struct.pack("<I", 0xFD2FB528) + descriptor + struct.pack("<Q", claimed) + block


@pytest.fixture
def buffers(monkeypatch) -> list[int]:
    """The size of every output buffer the envelope reader allocates (torch memory, which
    ``tracemalloc`` does not see)."""
    sizes: list[int] = []

    def counted(size: int) -> memoryview:
        sizes.append(size)
        return fresh_buffer(size)

    monkeypatch.setattr(netcomm.envelope, "fresh_buffer", counted)
    return sizes


def test_small_envelope_claiming_1_gib_allocates_little(spec, signer, buffers):
    frame = _rle_frame(1 << 30, 1 << 16)
    assert zstandard.get_frame_parameters(frame).content_size == 1 << 30
    header = header_for(spec, b"", frame, compression="zstd", raw_len=1 << 30, tensors=4)
    blob = sign(signer, header, frame)
    assert len(blob) < 600
    tracemalloc.start()
    try:
        # the reader's own default limits, as the red team used them
        assert (
            reason(
                lambda: open_envelope(
                    blob,
                    expected_peer="alice",
                    public_key=signer.public_key,
                    verifiers=default_verifiers(),
                )
            )
            == "decompress"
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    assert buffers == [1 << 20]  # the first buffer, never grown: the frame yields 64 KiB


def test_a_bomb_under_loose_limits_grows_its_buffer_only_as_bytes_arrive(spec, signer, buffers):
    """Without the model's shapes the default 4 GiB cap lets a 32 MiB bomb decompress; the
    buffers double from 1 MiB as its bytes come, none sized by the declared length alone."""
    raw_len = 32 << 20
    frame = zstandard.ZstdCompressor(level=3).compress(bytes(raw_len))
    header = header_for(spec, b"", frame, compression="zstd", raw_len=raw_len, tensors=4)
    blob = sign(signer, header, frame)
    got = reason(
        lambda: open_envelope(
            blob, expected_peer="alice", public_key=signer.public_key, verifiers=default_verifiers()
        )
    )
    assert got == "tensors", got  # zeros are no safetensors header
    assert buffers == [1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20, 32 << 20]


def test_default_limits_follow_the_expected_shapes(spec, signer):
    """A real 32 MiB zstd bomb (honest sizes, a few KB signed) against the default limits:
    with the model's shapes given, the reader stops at one dense copy of the model."""
    raw_len = 32 << 20
    frame = zstandard.ZstdCompressor(level=3).compress(bytes(raw_len))
    header = header_for(spec, b"", frame, compression="zstd", raw_len=raw_len, tensors=4)
    blob = sign(signer, header, frame)
    cap = EnvelopeLimits.for_shapes(spec.shapes).max_decompressed_bytes
    assert len(blob) < 64 << 10 and cap < 1 << 20
    tracemalloc.start()
    try:
        got = reason(
            lambda: open_envelope(
                blob,
                expected_peer="alice",
                public_key=signer.public_key,
                verifiers=default_verifiers(),
                shapes=spec.shapes,
            )
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got in ("too_large", "decompress"), got
    assert peak < len(blob) + 4 * cap + (4 << 20), peak


# -- gather: replays and no exceptions -----------------------------------------------------


def make_net(tmp_path, spec, names, **config):
    storage = LocalStorage(tmp_path / "store")
    signers = {n: Ed25519Signer.from_seed(bytes([i + 1]) * 32) for i, n in enumerate(names)}
    directory = StaticDirectory(PeerRecord(n, storage, signers[n].public_key) for n in names)
    cfg = ExchangeConfig(**{**FAST, **config})
    exchanges = {n: StorageExchange(n, storage, directory, signers[n], spec, cfg) for n in names}
    return storage, signers, exchanges


def test_republished_payload_is_a_replay(tmp_path, model, spec, kit):
    _, _, ex = make_net(tmp_path, spec, ["a", "b", "c"])
    update = kit.sparse_update(model, seed=3)
    ex["b"].publish(1, update)
    assert ex["a"].gather(1, ["b"]).statuses["b"].status == "ok"
    ex["b"].publish(2, update)  # the same peer, a later window
    ex["c"].publish(2, update)  # another peer copying it
    statuses = ex["a"].gather(2, ["b", "c"]).statuses
    for peer in ("b", "c"):
        assert statuses[peer].status == "invalid"
        assert statuses[peer].reason.startswith("replay:"), statuses[peer].reason


def test_replay_record_is_bounded(tmp_path, model, spec, kit):
    _, _, ex = make_net(tmp_path, spec, ["a", "b"], replay_memory=2)
    for window in range(4):
        ex["b"].publish(window, kit.sparse_update(model, seed=window))
        assert ex["a"].gather(window).statuses["b"].status == "ok"
    assert len(ex["a"]._seen) == 2


def test_untyped_reader_error_is_an_invalid_status(tmp_path, model, spec, kit, monkeypatch):
    _, _, ex = make_net(tmp_path, spec, ["a", "b"])
    ex["b"].publish(0, kit.sparse_update(model))

    def broken(*args, **kwargs):
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr("netcomm.exchange.open_envelope", broken)
    status = ex["a"].gather(0).statuses["b"]
    assert (status.status, status.reason) == (
        "invalid",
        "internal: TypeError: unhashable type: 'list'",
    )


def _mutate(blob: bytes, rng: random.Random) -> bytes:
    out = bytearray(blob)
    choice = rng.randrange(4)
    if choice == 0:
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif choice == 1:
        del out[rng.randrange(len(out)) :]
    elif choice == 2:
        pos = rng.randrange(len(out))
        out[pos:pos] = rng.randbytes(rng.randint(1, 16))
    else:
        pos = rng.randrange(20)
        out[pos] = rng.randrange(256)
    return bytes(out)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False))
def test_no_object_makes_gather_raise(tmp_path_factory, model, spec, kit, rng):
    storage, signers, ex = make_net(tmp_path_factory.mktemp("net"), spec, ["a", "b"], attempts=1)
    payload = rng.choice([kit.sparse_update(model), kit.dense_update(model)])
    honest = seal_envelope(
        payload, window=0, publisher="b", fingerprint=spec.fingerprint, signer=signers["b"]
    )
    if rng.random() < 0.5:
        hostile = _mutate(honest, rng)  # in transit: the signature no longer matches
    else:  # a malicious peer: damaged header and body, signed with its own key
        _, _, _, header_len, body_len = struct.unpack_from("<4sHHIQ", honest)
        signed = _mutate(honest[20 : 20 + header_len + body_len], rng)
        header, body = signed[:header_len], signed[header_len:]
        hostile = sign(signers["b"], header, body)
    storage.put(update_key("", 0, "b"), hostile)
    status = ex["a"].gather(0).statuses["b"]
    assert status.status in ("ok", "invalid")
    assert not status.reason.startswith("internal"), status.reason
