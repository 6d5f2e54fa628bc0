"""check_payload must accept exactly what sparseloco.payload.validate_payload accepts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netcomm.validate import check_payload
from sparseloco import CodecConfig, CompressedUpdate, ErrorFeedback, encode
from sparseloco.codec import CompressedTensor
from sparseloco.errors import SparseLoCoError
from sparseloco.payload import validate_payload

SHAPES = {"w": (128, 192), "odd": (10, 7), "v": (130,), "t": (3, 5, 8)}
CODECS = [
    CodecConfig(),
    CodecConfig(chunk_size=8, topk=5),  # odd k: pairs straddle chunks
    CodecConfig(chunk_size=16, topk=4, value_bits=4),
    CodecConfig(chunk_size=128, topk=100, value_bits=8),  # 16-bit indices
    CodecConfig(index_coding="rice"),
]


def outcome(fn, payload):
    try:
        fn(payload)
    except SparseLoCoError as exc:
        return type(exc).__name__, getattr(exc, "tensor", None)
    return None


def update_for(codec: CodecConfig, seed: int) -> CompressedUpdate:
    gen = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    return encode(deltas, ErrorFeedback(codec))


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.chunk_size}-{c.topk}-{c.index_coding}")
def test_valid_updates_pass(codec):
    update = update_for(codec, 0)
    assert outcome(check_payload, update) is None
    assert outcome(validate_payload, update) is None


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
    assert outcome(check_payload, mutated) == outcome(validate_payload, mutated)
