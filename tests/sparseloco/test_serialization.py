"""Canonical safetensors bytes, and the bounded reader's checks on hostile input."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sparseloco import CodecConfig, ErrorFeedback, encode
from sparseloco.errors import CorruptUpdateError
from sparseloco.payload import payload_from_tensors
from sparseloco.serialization import (
    SafetensorsFormatError,
    dump_safetensors,
    load_safetensors,
)


def sample() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {
        "b": torch.arange(5, dtype=torch.uint8),  # odd length: the next tensor is misaligned
        "c": torch.tensor([[1.5, -2.0], [0.25, 8.0]]),
        "a": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16),
        "empty": torch.empty(0, dtype=torch.uint8),
    }
    return tensors, {"z": "1", "kind": "test", "format": "x"}


def test_equal_payloads_give_equal_bytes_whatever_the_insertion_order():
    tensors, meta = sample()
    reordered = dict(reversed(list(tensors.items())))
    shuffled_meta = dict(reversed(list(meta.items())))
    first = dump_safetensors(tensors, meta)
    assert dump_safetensors(reordered, shuffled_meta) == first
    clones = {n: t.clone() for n, t in tensors.items()}
    assert dump_safetensors(clones, dict(meta)) == first


def test_compressed_update_bytes_are_deterministic():
    gen = torch.Generator().manual_seed(3)
    deltas = {"w": torch.randn(64, 96, generator=gen), "v": torch.randn(40, generator=gen)}
    one = encode(deltas, ErrorFeedback(CodecConfig(chunk_size=16, topk=8)))
    two = encode(deltas, ErrorFeedback(CodecConfig(chunk_size=16, topk=8)))
    assert dump_safetensors(*one.to_tensors()) == dump_safetensors(*two.to_tensors())
    raw = bytearray(dump_safetensors(*one.to_tensors()))
    back = payload_from_tensors(*load_safetensors(raw))
    assert dump_safetensors(*back.to_tensors()) == raw


def test_bytes_are_standard_safetensors_and_round_trip():
    tensors, meta = sample()
    raw = dump_safetensors(tensors, meta)
    assert struct.unpack_from("<Q", raw)[0] % 8 == 0  # the data section is 8-aligned
    official = st_load(raw)
    ours, ours_meta = load_safetensors(bytearray(raw))
    assert ours_meta == meta
    assert sorted(official) == sorted(ours) == sorted(tensors)
    for name, t in tensors.items():
        assert ours[name].dtype == official[name].dtype == t.dtype
        assert torch.equal(ours[name], t) and torch.equal(official[name], t)
    header = json.loads(raw[8 : 8 + struct.unpack_from("<Q", raw)[0]])
    assert list(header) == ["__metadata__", "a", "b", "c", "empty"]
    assert list(header["__metadata__"]) == ["format", "kind", "z"]


def test_writable_buffer_is_shared_and_read_only_input_is_copied():
    tensors, meta = sample()
    raw = bytearray(dump_safetensors(tensors, meta))
    shared, _ = load_safetensors(raw)
    shared["b"][0] = 200
    assert 200 in raw  # a view of the caller's buffer, no copy
    frozen = dump_safetensors(tensors, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only buffer
        copied, _ = load_safetensors(frozen)
    copied["b"][0] = 100
    assert frozen == dump_safetensors(tensors, meta)


def test_misaligned_float_tensor_is_realigned():
    tensors, meta = sample()
    raw = bytearray(dump_safetensors(tensors, meta))
    out, _ = load_safetensors(raw)
    assert out["b"].data_ptr() % 2 == 0  # "a" is 6 bytes of bfloat16, so "b" starts even
    assert out["c"].data_ptr() % 4 == 0  # "c" starts 11 bytes into the data section
    assert torch.equal(out["c"], tensors["c"])


def test_only_payload_dtypes_are_written():
    with pytest.raises(SafetensorsFormatError) as info:
        dump_safetensors({"x": torch.zeros(2, dtype=torch.int64)}, {})
    assert info.value.tensor == "x"


def _raw(header: object, data: bytes = b"\0" * 8) -> bytes:
    hdr = json.dumps(header).encode()
    return struct.pack("<Q", len(hdr)) + hdr + data


def _entry(dtype="U8", shape=(8,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("raw", "message", "tensor"),
    [
        (b"\1\0\0", "shorter than the length prefix", None),
        (struct.pack("<Q", 1 << 40) + b"{}", "header length 1099511627776 is out of bounds", None),
        (struct.pack("<Q", 4) + b"{no}", "header is not JSON", None),
        (struct.pack("<Q", 200_000) + b"[" * 200_000, "header is not JSON", None),
        (_raw([1, 2]), "header is not a JSON object", None),
        (_raw({"__metadata__": {"a": 1}}), "metadata must map strings to strings", None),
        (_raw({"a": _entry("I64", (1,))}), "disallowed dtype 'I64'", "a"),
        (_raw({"a": _entry(shape=(-8,))}), "bad shape [-8]", "a"),
        (_raw({"a": _entry(shape=(1,) * 9)}), "bad shape", "a"),
        (_raw({"a": _entry(shape=(True,) * 8)}), "bad shape", "a"),
        (_raw({"a": _entry(shape=(0, 2**62, 2**62), offsets=(0, 0))}, b""), "bad shape", "a"),
        (_raw({"a": _entry(shape=(16,), offsets=(0, 16))}), "bad data offsets [0, 16]", "a"),
        (_raw({"a": _entry(offsets=(4, 2))}), "bad data offsets", "a"),
        (_raw({"a": _entry(shape=(4,))}), "data size disagrees with shape and dtype", "a"),
        (_raw({"a": _entry("F32", (3,), (0, 8))}), "data size disagrees", "a"),
        (_raw({"a": [1, 2, 3]}), "malformed header entry", "a"),
        (_raw({"a": {**_entry(), "extra": 1}}), "malformed header entry", "a"),
        (_raw({"a": _entry(), "b": _entry()}), "tensor data overlaps or leaves gaps", None),
        (_raw({"a": _entry(shape=(4,), offsets=(4, 8))}), "overlaps or leaves gaps", None),
        (_raw({"a": _entry(shape=(4,), offsets=(0, 4))}), "does not cover the data section", None),
    ],
)
def test_malformed_input_is_rejected_with_a_typed_error(raw, message, tensor):
    with pytest.raises(SafetensorsFormatError) as info:
        load_safetensors(raw)
    assert message in str(info.value)
    assert info.value.tensor == tensor
    assert isinstance(info.value, CorruptUpdateError)


def test_caps_and_expected_count():
    tensors, meta = sample()
    raw = dump_safetensors(tensors, meta)
    header_len = struct.unpack_from("<Q", raw)[0]
    with pytest.raises(SafetensorsFormatError, match="out of bounds"):
        load_safetensors(raw, max_header_bytes=header_len - 1)
    assert len(load_safetensors(raw, max_header_bytes=header_len)[0]) == 4
    with pytest.raises(SafetensorsFormatError, match="4 tensors exceed the cap of 3"):
        load_safetensors(raw, max_tensors=3)
    with pytest.raises(SafetensorsFormatError, match="4 tensors, expected 5"):
        load_safetensors(raw, expected_tensors=5)


def test_pickle_is_never_loaded():
    import pickle

    with pytest.raises(SafetensorsFormatError):
        load_safetensors(pickle.dumps({"a": torch.zeros(2)}))


def test_library_writer_output_is_accepted():
    tensors, meta = sample()
    out, got_meta = load_safetensors(st_save(tensors, metadata=meta))
    assert got_meta == meta
    assert all(torch.equal(out[n], t) for n, t in tensors.items())
