"""validate_payload accepts exactly what decoding (codec.decode_sparse, the definition) does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseloco import CodecConfig, CompressedUpdate, ErrorFeedback, encode
from sparseloco.codec import CompressedTensor, decode_sparse
from sparseloco.errors import CorruptUpdateError, NonFiniteError, SparseLoCoError
from sparseloco.packing import pack_codes, pack_indices
from sparseloco.payload import DenseUpdate, validate_payload

SHAPES = {"w": (128, 192), "odd": (10, 7), "v": (130,), "t": (3, 5, 8)}
CODECS = [
    CodecConfig(),
    CodecConfig(chunk_size=8, topk=5),  # odd k: pairs straddle chunks
    CodecConfig(chunk_size=16, topk=4, value_bits=4),
    CodecConfig(chunk_size=128, topk=100, value_bits=8),  # 16-bit indices
    CodecConfig(index_coding="rice"),
    CodecConfig(value_coding="ranked"),
    CodecConfig(chunk_size=8, topk=5, value_bits=4, value_coding="ranked"),  # odd k
    CodecConfig(chunk_size=128, topk=100, value_bits=1, value_coding="ranked"),  # 16-bit
    CodecConfig(index_coding="rice", value_coding="ranked"),
    CodecConfig(chunk_size=8, topk=5, index_coding="rice", value_coding="ranked", value_bits=4),
    CodecConfig(chunk_size=128, topk=100, index_coding="rice", value_coding="ranked"),  # 16-bit
    CodecConfig(chunk_size=8, topk=2, index_coding="rice", value_coding="ranked"),  # no labels
]


def decode_all(update: CompressedUpdate) -> None:
    """The reference: decode every tensor, in name order."""
    for name, ct in sorted(update.tensors.items()):
        decode_sparse(name, ct, update.codec)


def outcome(fn, payload):
    try:
        fn(payload)
    except SparseLoCoError as exc:
        return type(exc).__name__, getattr(exc, "tensor", None), str(exc)
    return None


def update_for(codec: CodecConfig, seed: int) -> CompressedUpdate:
    gen = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    return encode(deltas, ErrorFeedback(codec))


def _codec_id(c: CodecConfig) -> str:
    return f"{c.chunk_size}-{c.topk}-{c.index_coding}-{c.value_coding}-{c.value_bits}"


@pytest.mark.parametrize("codec", CODECS, ids=_codec_id)
def test_valid_updates_pass(codec):
    update = update_for(codec, 0)
    assert outcome(validate_payload, update) is None
    assert outcome(decode_all, update) is None


@settings(max_examples=150, deadline=None)
@given(
    codec_i=st.integers(0, len(CODECS) - 1),
    name=st.sampled_from(sorted(SHAPES)),
    part=st.sampled_from(["indices", "codes", "table", "gaps"]),
    action=st.sampled_from(["flip", "drop", "extra", "nan"]),
    pos=st.floats(0, 1, exclude_max=True),
    xor=st.integers(1, 255),
)
def test_same_verdict_on_mutations(codec_i, name, part, action, pos, xor):
    codec = CODECS[codec_i]
    update = update_for(codec, codec_i)
    ct = update.tensors[name]
    buf = getattr(ct, part).clone()
    if action == "flip" and buf.numel():
        flat = buf.view(torch.uint8)
        flat[int(pos * flat.numel())] ^= xor
    elif action == "drop" and buf.numel():
        buf = buf[:-1]
    elif action == "extra":
        buf = torch.cat([buf, buf.new_zeros(1)])
    elif action == "nan" and part == "table":
        buf[int(pos * buf.numel())] = float("nan")
    fields = {"indices": ct.indices, "gaps": ct.gaps, "codes": ct.codes, "table": ct.table}
    fields[part] = buf
    bad = CompressedTensor(shape=ct.shape, rice_param=ct.rice_param, **fields)
    mutated = CompressedUpdate(codec=codec, tensors={**update.tensors, name: bad})
    assert outcome(validate_payload, mutated) == outcome(decode_all, mutated)


def test_errors_name_the_tensor():
    codec = CODECS[0]
    update = update_for(codec, 0)
    ct = update.tensors["w"]
    idx = ct.indices.clone()
    idx[:3] = torch.tensor([0xFF, 0xFF, 0x00], dtype=torch.uint8)  # 4095 then 4080
    bad = CompressedTensor(ct.shape, idx, ct.gaps, ct.codes, ct.table)
    with pytest.raises(CorruptUpdateError) as info:
        validate_payload(CompressedUpdate(codec=codec, tensors={**update.tensors, "w": bad}))
    assert info.value.tensor == "w"
    assert str(info.value) == "w: indices are not strictly ascending within a chunk"


def test_out_of_range_index_in_a_small_chunk():
    codec = CodecConfig(chunk_size=8, topk=4)  # "odd" (10x7): 2 chunks of 35 entries
    update = update_for(codec, 3)
    ct = update.tensors["odd"]
    idx = ct.indices.clone()
    idx[-3:] = torch.tensor([0x3F, 0x00, 0x05], dtype=torch.uint8)  # last pair (63, 80)
    bad = CompressedTensor(ct.shape, idx, ct.gaps, ct.codes, ct.table)
    mutated = CompressedUpdate(codec=codec, tensors={**update.tensors, "odd": bad})
    expected = ("CorruptUpdateError", "odd", "odd: index 80 out of range for chunks of 35")
    assert outcome(validate_payload, mutated) == outcome(decode_all, mutated) == expected


def test_dense_payload_must_be_finite():
    dense = DenseUpdate({"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")])})
    with pytest.raises(NonFiniteError) as info:
        validate_payload(dense)
    assert info.value.tensor == "b"


def _two_chunks(idx: torch.Tensor) -> CompressedUpdate:
    """A (64, 128) tensor, two 64x64 chunks of k = 64, with these 128 in-chunk indices."""
    codec = CodecConfig()
    ct = CompressedTensor(
        shape=(64, 128),
        indices=pack_indices(idx, codec.index_bits),
        gaps=torch.empty(0, dtype=torch.uint8),
        codes=pack_codes(torch.zeros(idx.numel(), dtype=torch.uint8), codec.value_bits),
        table=torch.tensor([-1.5, -0.5, 0.5, 1.5]),
    )
    return CompressedUpdate(codec=codec, tensors={"w": ct})


@pytest.mark.parametrize(
    ("repeat", "accepted"),
    [(None, True), (1, False), (2, False), (62, False), (63, False), (65, False), (127, False)],
)
def test_each_chunk_ascends_to_its_last_index_and_not_into_the_next(repeat, accepted):
    # chunk 1 starts at chunk 0's last index: no order holds across chunks
    idx = torch.cat([torch.arange(0, 128, 2), torch.arange(126, 190)])
    if repeat is not None:
        idx[repeat] = idx[repeat - 1]
    update = _two_chunks(idx)
    assert outcome(validate_payload, update) == outcome(decode_all, update)
    assert (outcome(validate_payload, update) is None) == accepted
