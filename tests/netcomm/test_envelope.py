"""The wire format: round trips, and every rejection reason the reader can give."""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct

import pytest
import torch
import zstandard
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netcomm import (
    BodyDigest,
    BodyHasher,
    Ed25519Signer,
    EnvelopeError,
    EnvelopeLimits,
    NetcommConfigError,
    default_verifiers,
    open_envelope,
    read_header,
    seal_envelope,
)
from netcomm.envelope import FORMAT_VERSION, PREFIX_SIZE, _canonical, _signed_message
from sparseloco import CodecConfig, CompressedUpdate
from sparseloco.codec import CompressedTensor
from sparseloco.payload import DenseUpdate
from sparseloco.serialization import dump_safetensors


def seal(payload, signer, spec, window=7, publisher="alice"):
    return seal_envelope(
        payload, window=window, publisher=publisher, fingerprint=spec.fingerprint, signer=signer
    )


def open_(blob, signer, spec, **overrides):
    kwargs = dict(
        expected_peer="alice",
        public_key=signer.public_key,
        verifiers=default_verifiers(),
        window=7,
        fingerprint=spec.fingerprint,
        shapes=spec.shapes,
        codec=CodecConfig(),
    )
    kwargs.update(overrides)
    return open_envelope(blob, **kwargs)


def reason_of(fn) -> str:
    with pytest.raises(EnvelopeError) as info:
        fn()
    return info.value.reason


def craft(
    signer,
    spec,
    *,
    raw=None,
    body=None,
    tensors=None,
    meta=None,
    count=None,
    version=FORMAT_VERSION,
    **header_changes,
):
    """A correctly signed envelope around arbitrary (possibly hostile) contents."""
    if raw is None:
        raw = dump_safetensors(tensors, meta)  # canonical, so the check under test is reached
    if body is None:
        body = zstandard.ZstdCompressor().compress(raw)
    header = {
        "format": "netcomm.envelope",
        "version": version,
        "scheme": "ed25519",
        "publisher": "alice",
        "window": 7,
        "fingerprint": spec.fingerprint,
        "kind": "sparse",
        "codec": CodecConfig().wire_fields(),
        "compression": "zstd",
        "raw_len": len(raw),
        "body_len": len(body),
        "body_blake3": blake3(body).hexdigest(),
        "tensors": count if count is not None else len(tensors or {}),
    }
    header.update(header_changes)
    hdr = _canonical(header)
    unsigned = struct.pack("<4sHHIQ", b"NCEN", version, 0, len(hdr), len(body))
    sig = signer.sign(_signed_message(unsigned, hdr))
    prefix = struct.pack("<4sHHIQ", b"NCEN", version, len(sig), len(hdr), len(body))
    return prefix + hdr + body + sig


def test_sparse_roundtrip_is_exact(model, spec, signer, kit):
    update = kit.sparse_update(model)
    blob = seal(update, signer, spec)
    env = open_(blob, signer, spec)
    assert (env.publisher, env.window) == ("alice", 7)
    assert isinstance(env.payload, CompressedUpdate)
    assert kit.payload_bytes(env.payload) == kit.payload_bytes(update)
    header, _ = read_header(blob, EnvelopeLimits())
    assert header["kind"] == "sparse" and header["tensors"] == 16
    assert header["compression"] == "zstd"  # the codes of a real update compress
    assert blob[:4] == b"NCEN" and struct.unpack_from("<H", blob, 4)[0] == header["version"] == 3


def test_dense_roundtrip_is_exact(model, spec, signer, kit):
    update = kit.dense_update(model)
    env = open_(seal(update, signer, spec), signer, spec, codec=None, kind="dense")
    assert kit.payload_bytes(env.payload) == kit.payload_bytes(update)


def test_sealing_is_deterministic(model, spec, signer, kit):
    update = kit.sparse_update(model)
    assert seal(update, signer, spec) == seal(update, signer, spec)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_roundtrip_with_each_compression(model, spec, signer, kit, compression):
    update = kit.sparse_update(model)
    blob = seal_envelope(
        update,
        window=7,
        publisher="alice",
        fingerprint=spec.fingerprint,
        signer=signer,
        compression=compression,
    )
    header, _ = read_header(blob, EnvelopeLimits())
    assert header["compression"] == compression
    assert (header["raw_len"] == header["body_len"]) == (compression == "none")
    assert header["version"] == struct.unpack_from("<H", blob, 4)[0] == FORMAT_VERSION
    env = open_(blob, signer, spec)
    assert kit.payload_bytes(env.payload) == kit.payload_bytes(update)


def test_auto_compression_keeps_zstd_only_when_it_pays(model, spec, signer, kit):
    def used(payload, **kwargs):
        blob = seal_envelope(
            payload,
            window=7,
            publisher="alice",
            fingerprint=spec.fingerprint,
            signer=signer,
            **kwargs,
        )
        return read_header(blob, EnvelopeLimits())[0]["compression"]

    zeros = DenseUpdate({n: torch.zeros(p.shape) for n, p in model.named_parameters()})
    assert used(zeros) == "zstd"
    noise = kit.dense_update(model)  # zstd saves well under 90% on random floats
    assert used(noise, min_saving=0.9) == "none"
    assert used(noise, min_saving=0.0) == "zstd"
    assert used(zeros, compression="none") == "none"
    with pytest.raises(NetcommConfigError, match="compression must be"):
        used(noise, compression="lz4")
    with pytest.raises(NetcommConfigError, match="min_saving must lie in"):
        used(noise, min_saving=1.0)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"expected_peer": "bob"}, "peer"),
        ({"public_key": Ed25519Signer.from_seed(b"\1" * 32).public_key}, "signature"),
        ({"verifiers": {}}, "signature"),
        ({"window": 8}, "replay"),
        ({"fingerprint": "0" * 64}, "fingerprint"),
        ({"codec": CodecConfig(topk=32)}, "codec"),
        # a model with fewer parameters: the update is larger than any honest one of it
        ({"shapes": {"0.weight": (128, 64)}}, "too_large"),
        ({"limits": EnvelopeLimits(max_object_bytes=100)}, "too_large"),
        ({"limits": EnvelopeLimits(max_decompressed_bytes=1000)}, "too_large"),
        ({"limits": EnvelopeLimits(max_tensors=3)}, "too_large"),
        ({"limits": EnvelopeLimits(max_header_bytes=50)}, "too_large"),
    ],
)
def test_expectation_mismatch_reasons(model, spec, signer, kit, changes, reason):
    blob = seal(kit.sparse_update(model), signer, spec)
    assert reason_of(lambda: open_(blob, signer, spec, **changes)) == reason


def test_same_size_other_shapes_are_a_shape_error(model, spec, signer, kit):
    blob = seal(kit.sparse_update(model), signer, spec)
    name = next(n for n, shape in spec.shapes.items() if len(shape) == 2)
    shapes = {**spec.shapes, name: tuple(reversed(spec.shapes[name]))}
    assert reason_of(lambda: open_(blob, signer, spec, shapes=shapes)) == "shape"


def test_wrong_shape_from_other_model(spec, signer, kit):
    other = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 9))
    blob = seal(kit.sparse_update(other), signer, spec)
    assert reason_of(lambda: open_(blob, signer, spec)) == "shape"


def test_signed_by_another_key(model, spec, signer, kit):
    mallory = Ed25519Signer.from_seed(b"\2" * 32)
    blob = seal(kit.sparse_update(model), mallory, spec)
    assert reason_of(lambda: open_(blob, signer, spec)) == "signature"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:-1], "format"),
        (lambda b: b + b"\0", "format"),
        (lambda b: b[:10], "format"),
        (lambda b: b"XXXX" + b[4:], "format"),
        (lambda b: b[:4] + struct.pack("<H", 0) + b[6:], "version"),
        (lambda b: b[:4] + struct.pack("<H", 2) + b[6:], "version"),  # SHA-256 versions
        (lambda b: b[:4] + struct.pack("<H", 1) + b[6:], "version"),
        (lambda b: b[:4] + struct.pack("<H", 4) + b[6:], "version"),
        (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "signature"),
        (lambda b: b[:600] + bytes([b[600] ^ 1]) + b[601:], "checksum"),
    ],
)
def test_tampered_bytes(model, spec, signer, kit, mutate, reason):
    blob = seal(kit.sparse_update(model), signer, spec)
    header_len = struct.unpack_from("<I", blob, 8)[0]
    assert PREFIX_SIZE + header_len < 600 < len(blob) - 64  # byte 600 lies in the body
    assert reason_of(lambda: open_(mutate(blob), signer, spec)) == reason


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_single_byte_change_is_rejected(model, spec, signer, kit, data):
    blob = seal(kit.sparse_update(model), signer, spec)
    pos = data.draw(st.integers(0, len(blob) - 1))
    xor = data.draw(st.integers(1, 255))
    bad = bytearray(blob)
    bad[pos] ^= xor
    with pytest.raises(EnvelopeError):
        open_(bytes(bad), signer, spec)


def test_zstd_bomb_is_stopped_at_declared_size(spec, signer):
    raw = b"\0" * (8 << 20)  # 8 MiB of zeros compresses to a few hundred bytes
    body = zstandard.ZstdCompressor().compress(raw)
    blob = craft(signer, spec, body=body, raw=b"\0" * 100)  # header claims 100 bytes
    assert reason_of(lambda: open_(blob, signer, spec)) == "decompress"


def test_frame_without_content_size_is_rejected(spec, signer):
    cobj = zstandard.ZstdCompressor().compressobj()
    body = cobj.compress(b"\0" * 1000) + cobj.flush()
    blob = craft(signer, spec, body=body, raw=b"\0" * 1000)
    assert reason_of(lambda: open_(blob, signer, spec)) == "decompress"


def test_second_frame_beyond_declared_size_is_rejected(spec, signer):
    raw = b"\1" * 1000
    one = zstandard.ZstdCompressor().compress(raw)
    blob = craft(signer, spec, body=one + one, raw=raw)
    assert reason_of(lambda: open_(blob, signer, spec)) == "decompress"


def test_huge_declared_size_rejected_before_decompressing(spec, signer):
    blob = craft(signer, spec, raw=b"x" * 100, raw_len=1 << 40)
    assert reason_of(lambda: open_(blob, signer, spec)) == "too_large"


def test_pickle_body_is_never_unpickled(spec, signer):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    raw = pickle.dumps(Boom())
    blob = craft(signer, spec, raw=raw)
    assert reason_of(lambda: open_(blob, signer, spec)) == "tensors"


def _raw_with_header(header: dict, data: bytes) -> bytes:
    hdr = json.dumps(header).encode()
    return struct.pack("<Q", len(hdr)) + hdr + data


@pytest.mark.parametrize(
    "header",
    [
        {"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}},
        {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 8]}},
        {"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 16]}},
        {
            "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
            "b": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
        },
        {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}},
        {"a": {"dtype": "U8", "shape": [-8], "data_offsets": [0, 8]}},
        {"a": [1, 2, 3]},
    ],
    ids=["dtype", "size", "bounds", "overlap", "gap", "negative", "malformed"],
)
def test_hostile_safetensors_headers(spec, signer, header):
    raw = _raw_with_header(header, b"\0" * 8)
    blob = craft(signer, spec, raw=raw, count=len(header))
    assert reason_of(lambda: open_(blob, signer, spec)) == "tensors"


def test_safetensors_header_length_is_bounded(spec, signer):
    raw = struct.pack("<Q", 1 << 40) + b"{}"
    blob = craft(signer, spec, raw=raw)
    assert reason_of(lambda: open_(blob, signer, spec)) == "tensors"


def _sparse_tensors(model, kit):
    update = kit.sparse_update(model)
    return update.to_tensors()


def test_out_of_range_or_unsorted_indices_are_corrupt(model, spec, signer, kit):
    tensors, meta = _sparse_tensors(model, kit)
    idx = tensors["0.weight::idx"].clone()
    idx[:3] = torch.tensor([0xFF, 0xFF, 0x00], dtype=torch.uint8)  # first index 4095, then 4080
    tensors["0.weight::idx"] = idx
    blob = craft(signer, spec, tensors=tensors, meta=meta)
    with pytest.raises(EnvelopeError) as info:
        open_(blob, signer, spec)
    assert info.value.reason == "corrupt"
    assert "0.weight" in str(info.value)


def test_nan_table_is_corrupt_and_nan_dense_is_nonfinite(model, spec, signer, kit):
    tensors, meta = _sparse_tensors(model, kit)
    tensors["1.bias::table"] = torch.tensor([float("nan"), 0.0, 1.0, 2.0])
    blob = craft(signer, spec, tensors=tensors, meta=meta)
    assert reason_of(lambda: open_(blob, signer, spec)) == "corrupt"

    dense = kit.dense_update(model)
    dense.tensors["1.bias"][3] = float("inf")
    blob = seal(dense, signer, spec)
    with pytest.raises(EnvelopeError) as info:
        open_(blob, signer, spec, codec=None, kind="dense")
    assert (info.value.reason, "1.bias" in str(info.value)) == ("nonfinite", True)


def test_body_codec_must_match_header(model, spec, signer, kit):
    tensors, meta = _sparse_tensors(model, kit)
    blob = craft(
        signer, spec, tensors=tensors, meta=meta, codec={**CodecConfig().wire_fields(), "topk": 1}
    )
    assert reason_of(lambda: open_(blob, signer, spec, codec=None)) == "codec"


def test_uncompressed_body_rules(model, spec, signer, kit):
    tensors, meta = _sparse_tensors(model, kit)
    raw = dump_safetensors(tensors, meta)
    blob = craft(signer, spec, raw=raw, body=raw, tensors=tensors, compression="none")
    assert kit.payload_bytes(open_(blob, signer, spec).payload) == kit.payload_bytes(
        kit.sparse_update(model)
    )
    padded = craft(signer, spec, raw=raw, body=raw + b"\0", tensors=tensors, compression="none")
    assert reason_of(lambda: open_(padded, signer, spec)) == "format"
    blob = craft(signer, spec, raw=raw, tensors=tensors, compression="brotli")
    assert reason_of(lambda: open_(blob, signer, spec)) == "format"
    v2 = craft(signer, spec, raw=raw, body=raw, tensors=tensors, compression="none", version=2)
    assert reason_of(lambda: open_(v2, signer, spec)) == "version"  # SHA-256 era: not read
    # A zstd frame labelled uncompressed is read as safetensors bytes, which it is not.
    frame = zstandard.ZstdCompressor().compress(raw)
    blob = craft(signer, spec, raw=frame, body=frame, tensors=tensors, compression="none")
    assert reason_of(lambda: open_(blob, signer, spec)) == "tensors"


def test_header_schema_is_strict(spec, signer):
    blob = craft(signer, spec, raw=b"x" * 10, window="7")
    assert reason_of(lambda: open_(blob, signer, spec)) == "format"
    blob = craft(signer, spec, raw=b"x" * 10, extra=1)
    assert reason_of(lambda: open_(blob, signer, spec)) == "format"


def test_limits_validate():
    with pytest.raises(NetcommConfigError, match="max_tensors must be a positive integer"):
        EnvelopeLimits(max_tensors=0)
    assert isinstance(NetcommConfigError("x"), ValueError)


def test_ed25519_signer_seed_length():
    with pytest.raises(ValueError, match="32 bytes"):
        Ed25519Signer.from_seed(b"short")


def test_compressed_tensor_type_is_rebuilt(model, spec, signer, kit):
    env = open_(seal(kit.sparse_update(model), signer, spec), signer, spec)
    assert all(isinstance(t, CompressedTensor) for t in env.payload.tensors.values())


def _hashed(blob: bytes, cuts: list[int]) -> BodyHasher:
    """A BodyHasher fed ``blob`` in chunks ending at the given offsets (then the rest)."""
    hasher, view, at = BodyHasher(), memoryview(blob), 0
    for end in [*sorted(cuts), len(blob)]:
        hasher.update(at, view[at:end])
        at = end
    return hasher


@given(cuts=st.lists(st.integers(0, 400), max_size=6))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_body_hasher_digest_equals_the_body_checksum_wherever_chunks_split(
    model, spec, signer, kit, cuts
):
    blob = seal(kit.sparse_update(model), signer, spec)
    header, header_len = read_header(blob, EnvelopeLimits())
    start = PREFIX_SIZE + header_len
    digest = _hashed(blob, cuts).digest()
    assert digest == BodyDigest(start, start + header["body_len"], len(blob), header["body_blake3"])
    assert open_(bytearray(blob), signer, spec, body_digest=digest).payload_digest


def test_body_hasher_starts_over_and_rejects_chunks_out_of_order(model, spec, signer, kit):
    blob = seal(kit.sparse_update(model), signer, spec)
    hasher = BodyHasher()
    hasher.update(0, memoryview(b"\xff" * 100))  # a first attempt's bytes, then a retry
    hasher.update(0, memoryview(blob)[:50])
    hasher.update(50, memoryview(blob)[50:])
    assert hasher.digest() == _hashed(blob, []).digest()
    # one byte short of the signature the body is all there; inside the prefix, nothing is known
    assert _hashed(blob[:-1], []).digest().blake3 == hasher.digest().blake3
    assert _hashed(blob[: PREFIX_SIZE + 10], []).digest() is None
    with pytest.raises(ValueError, match="in order"):
        hasher.update(7, memoryview(b"x"))


def test_a_digest_is_used_only_for_the_span_and_size_it_was_made_for(model, spec, signer, kit):
    blob = seal(kit.sparse_update(model), signer, spec)
    good = _hashed(blob, []).digest()
    wrong = dataclasses.replace(good, blake3="0" * 64)
    # it vouches for the bytes: a wrong digest for this very span and size fails the checksum
    assert reason_of(lambda: open_(blob, signer, spec, body_digest=wrong)) == "checksum"
    for other in ({"size": good.size + 1}, {"start": good.start + 1}, {"end": good.end - 1}):
        assert open_(blob, signer, spec, body_digest=dataclasses.replace(wrong, **other))
