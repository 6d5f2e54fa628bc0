"""The codec against a plain float64 re-implementation, exact top-k, EF identity, bad input."""

import math

import numpy as np
import pytest
import torch

from sparseloco import (
    CodecConfig,
    CodecMismatchError,
    CompressedTensor,
    CompressedUpdate,
    ConfigError,
    CorruptUpdateError,
    ErrorFeedback,
    NonFiniteError,
    ShapeMismatchError,
    UnknownPresetError,
    decode,
    decode_tensor,
    encode,
    encode_tensor,
    preset,
)
from sparseloco.chunking import ChunkLayout
from sparseloco.codec import commit_tensor
from sparseloco.config import PRESETS
from sparseloco.kernels.reference import topk_exact


def _divisor(n, limit):
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _chunks64(x, side):
    """Independent chunking: list of (flat positions, values) per tile, tile-row-major."""
    a = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    a = a.double().numpy()
    rows, cols = a.shape
    tr, tc = _divisor(rows, side), _divisor(cols, side)
    out = []
    for r0 in range(0, rows, tr):
        for c0 in range(0, cols, tc):
            pos = [(r0 + i) * cols + c0 + j for i in range(tr) for j in range(tc)]
            out.append((np.array(pos), a[r0 : r0 + tr, c0 : c0 + tc].reshape(-1)))
    return out


def float64_codec(e_new, cfg):
    """Select, quantize and decode in float64 exactly as REFERENCE §1 describes."""
    k, levels = cfg.topk, cfg.levels
    positions, values = [], []
    for pos, vals in _chunks64(e_new, cfg.chunk_size):
        order = sorted(range(len(vals)), key=lambda i: (-abs(vals[i]), i))[: min(k, len(vals))]
        order.sort()
        positions.append(pos[order])
        values.append(vals[order])
    pos, v = np.concatenate(positions), np.concatenate(values)
    n = v.size
    mu = v.mean()
    c = v - mu
    sigma = math.sqrt((c * c).sum() / (n - 1)) if n > 1 else 0.0
    s = 6 * sigma / levels
    q = np.full(n, levels // 2) if s == 0 else np.clip(np.rint(c / s + levels // 2), 0, levels - 1)
    table = np.array([c[q == j].mean() + mu if (q == j).any() else np.nan for j in range(levels)])
    dense = np.zeros(e_new.numel())
    dense[pos] = table[q.astype(int)]
    return pos, q.astype(int), c / s + levels // 2 if s else None, dense.reshape(e_new.shape)


SHAPES = [(128, 256), (100, 30), (77,), (3,), (), (8, 4, 3, 3), (130, 65)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_codec_matches_float64_reimplementation(shape, bits):
    cfg = CodecConfig(topk=64, value_bits=bits, error_decay=0.9)
    g = torch.Generator().manual_seed(hash((shape, bits)) % 2**31)
    ef = ErrorFeedback(cfg)
    e_old = torch.randn(shape, generator=g)
    layout = ChunkLayout.for_shape(shape, cfg.chunk_size)
    ef.buffers["w"] = layout.to_chunks(e_old)
    delta = torch.randn(shape, generator=g)
    e_mid = e_old * 0.9 + delta  # the spec: two rounded float32 operations
    update = encode({"w": delta}, ef, cfg)
    pos, _, scaled, dense64 = float64_codec(e_mid, cfg)
    got = decode(update)["w"]
    # same selected positions
    assert torch.equal(got.reshape(-1) != 0, torch.from_numpy(np.isin(np.arange(got.numel()), pos)))
    # decoded values equal the float64 table values except at rounding boundaries of c/s
    diff = (got.double() - torch.from_numpy(dense64)).abs().reshape(-1)[pos]
    close = diff <= 1e-5 * (1 + torch.from_numpy(dense64).abs().reshape(-1)[pos])
    if scaled is not None:
        boundary = torch.from_numpy(np.abs(scaled - np.floor(scaled) - 0.5) < 1e-4)
        assert bool((close | boundary).all())
        assert int((~close).sum()) <= 1
    else:
        assert bool(close.all())


def test_error_feedback_identity_over_rounds():
    cfg = CodecConfig(topk=16, error_decay=0.95)
    ef = ErrorFeedback(cfg)
    g = torch.Generator().manual_seed(1)
    shape = (96, 80)
    e_old = torch.zeros(shape)
    for _ in range(5):
        delta = torch.randn(shape, generator=g)
        sent = decode(encode({"w": delta}, ef))["w"]
        e_new = ef.dense("w", shape)
        torch.testing.assert_close(e_old * 0.95 + delta, e_new + sent, rtol=0, atol=1e-5)
        e_old = e_new
    assert float(e_old.abs().max()) > 0


def test_error_feedback_identity_bf16_buffer_and_half_inputs():
    cfg = CodecConfig(topk=32, error_decay=0.95)
    ef = ErrorFeedback(cfg)
    shape = (64, 128)
    ef.buffer("w", shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        e_old = ef.dense("w", shape).float()
        delta = torch.randn(shape, generator=g).to(dtype)
        sent = decode(encode({"w": delta}, ef))["w"]
        assert ef.buffers["w"].dtype == torch.bfloat16
        e_new = ef.dense("w", shape).float()
        torch.testing.assert_close(e_old * 0.95 + delta.float(), e_new + sent, rtol=1e-2, atol=2e-2)


# Every value coding and width, both index codings, 16-bit indices, and sparse 1-D chunks.
COMMIT_CODECS = {
    **{name: cfg.codec for name, cfg in sorted(PRESETS.items())},
    **{
        f"{coding}-{b}": CodecConfig(value_bits=b, topk=8, value_coding=coding)
        for coding, widths in (
            ("uniform", (2, 4, 8)),
            ("signmag", (1, 2, 4)),
            ("ranked", (1, 2, 4)),
        )
        for b in widths
    },
    "rice-signmag-4": CodecConfig(value_bits=4, value_coding="signmag", index_coding="rice"),
    "rice-ranked-2": CodecConfig(topk=8, value_coding="ranked", index_coding="rice"),
    "index16": CodecConfig(chunk_size=100, topk=50, error_decay=0.9),
}
# Not multiples of the chunk (29x64, 26x36, 50x30 tiles), 1-D (11-entry chunks: dense at
# topk=64, sparse at 8), 0-D, N-D, empty.
COMMIT_SHAPES = [(128, 256), (87, 64), (130, 72), (100, 30), (77,), (), (8, 4, 3, 3), (0, 5)]


def _bits(t):
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("error_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("codec", sorted(COMMIT_CODECS))
def test_commit_tensor_leaves_the_encoders_own_error_buffer(codec, error_dtype):
    """e ← β·e + Δ − D(sent) gives, bit for bit, the buffer encode_tensor leaves, over
    rounds that carry the buffer (with ties, zeros and −0.0 in some rounds)."""
    cfg = COMMIT_CODECS[codec]
    g = torch.Generator().manual_seed(len(codec))
    for shape in COMMIT_SHAPES:
        layout = ChunkLayout.for_shape(shape, cfg.chunk_size)
        error = layout.to_chunks(torch.randn(shape, generator=g)).to(error_dtype)
        for rnd in range(4):
            delta = torch.randn(shape, generator=g)
            flat = delta.view(-1)
            flat[: flat.numel() // 3] = (0.25, -0.0, 0.0, 1e-30)[rnd]
            encoded = error.clone()
            sent = encode_tensor("w", delta, encoded, cfg)
            committed = error.clone()
            commit_tensor("w", delta, committed, sent, cfg)
            assert torch.equal(_bits(committed), _bits(encoded)), (shape, rnd)
            error = encoded
        assert layout.numel < 2 or bool(error.ne(0).any())  # the buffer carries state


def test_commit_tensor_rejects_a_wrong_buffer_or_message_before_changing_it():
    cfg, update = _one()
    delta = torch.randn(64, 64)
    error = torch.zeros(1, 4096)
    with pytest.raises(ShapeMismatchError, match="error buffer"):
        commit_tensor("w", delta, torch.zeros(2, 4096), update.tensors["w"], cfg)
    with pytest.raises(ShapeMismatchError, match="message"):
        commit_tensor("w", delta, error, _with(update, shape=(64, 32)), cfg)
    assert not bool(error.any())


def _stable_topk(x, k):
    order = torch.sort(-x.abs(), dim=1, stable=True).indices[:, :k]
    return order.sort(dim=1).values


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.ones(6, 4096),
        lambda g: torch.zeros(6, 4096),
        lambda g: torch.randint(-3, 4, (6, 4096), generator=g).float(),
        lambda g: torch.randn(6, 4096, generator=g).round(decimals=1),
        lambda g: torch.where(torch.rand(6, 4096, generator=g) < 0.5, 1.0, -1.0),
        lambda g: torch.cat([torch.full((6, 1), 1e30), torch.ones(6, 4095)], dim=1),
        lambda g: torch.randn(6, 4096, generator=g),
    ],
    ids=["equal", "zeros", "ints", "rounded", "signs", "outlier", "random"],
)
def test_topk_exact_ties_go_to_lower_index(make):
    x = make(torch.Generator().manual_seed(5))
    for k in (1, 64, 4095):
        assert torch.equal(topk_exact(x, k), _stable_topk(x, k))


def test_negative_zero_ties_with_zero():
    x = torch.tensor([[0.0, -0.0, 0.0, -0.0, 1.0]])
    assert topk_exact(x, 3).tolist() == [[0, 1, 4]]


def test_size_budget_packed_and_rice():
    g = torch.Generator().manual_seed(7)
    shape = (1024, 1024)
    kept = 256 * 64
    packed = encode({"w": torch.randn(shape, generator=g)}, ErrorFeedback(CodecConfig(topk=64)))
    # 12-bit index + 2-bit code per kept entry, plus the 4-entry float32 table
    assert packed.nbytes == kept * 14 // 8 + 16
    assert packed.num_kept() == kept
    rice_cfg = CodecConfig(topk=64, index_coding="rice")
    rice = encode({"w": torch.randn(shape, generator=g)}, ErrorFeedback(rice_cfg))
    assert 8 * rice.nbytes / kept <= 10.5


def test_rice_and_packed_select_and_decode_identically():
    g = torch.Generator().manual_seed(8)
    delta = torch.randn(200, 130, generator=g)
    out = []
    for coding in ("packed", "rice"):
        cfg = CodecConfig(topk=40, index_coding=coding)
        out.append(decode(encode({"w": delta}, ErrorFeedback(cfg)))["w"])
    assert torch.equal(out[0], out[1])


def test_payload_round_trip_through_flat_tensors():
    cfg = preset("covenant-72b-rice").codec
    g = torch.Generator().manual_seed(9)
    deltas = {"a": torch.randn(64, 192, generator=g), "b": torch.randn(10, generator=g)}
    update = encode(deltas, ErrorFeedback(cfg))
    tensors, meta = update.to_tensors()
    back = CompressedUpdate.from_tensors(tensors, meta)
    for name in deltas:
        assert torch.equal(decode(back)[name], decode(update)[name])


def test_presets_and_config_validation():
    assert preset("covenant-72b").codec == CodecConfig(
        chunk_size=64, topk=64, value_bits=2, error_decay=0.95
    )
    assert preset("sparseloco-512m").codec.topk == 128
    with pytest.raises(UnknownPresetError, match="known presets: covenant-72b"):
        preset("covenant-7b")
    with pytest.raises(ConfigError, match="larger than a chunk"):
        CodecConfig(chunk_size=8, topk=65)
    with pytest.raises(ConfigError, match="value_bits"):
        CodecConfig(value_bits=3)
    with pytest.raises(ConfigError, match="error_decay"):
        CodecConfig(error_decay=1.5)


def test_nonfinite_delta_raises_and_leaves_state_unchanged():
    cfg = CodecConfig(topk=8)
    ef = ErrorFeedback(cfg)
    g = torch.Generator().manual_seed(10)
    encode({"a": torch.randn(32, 32, generator=g), "b": torch.randn(16, generator=g)}, ef)
    before = {n: b.clone() for n, b in ef.buffers.items()}
    bad = torch.randn(16, generator=g)
    bad[3] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        encode({"a": torch.randn(32, 32, generator=g), "b": bad}, ef)
    assert info.value.tensor == "b"
    for n, b in ef.buffers.items():
        assert torch.equal(b, before[n])


def test_wrong_error_buffer_shape_raises():
    cfg = CodecConfig(topk=8)
    ef = ErrorFeedback(cfg)
    ef.buffer("w", (32, 32))
    with pytest.raises(ShapeMismatchError, match="w"):
        encode({"w": torch.randn(32, 16)}, ef)


def _one(shape=(64, 64), cfg=None):
    cfg = cfg or CodecConfig(topk=8)
    g = torch.Generator().manual_seed(11)
    return cfg, encode({"w": torch.randn(shape, generator=g)}, ErrorFeedback(cfg))


def _with(update, **changes):
    ct = update.tensors["w"]
    fields = {
        f: getattr(ct, f) for f in ("shape", "indices", "gaps", "codes", "table", "rice_param")
    }
    fields.update(changes)
    return CompressedTensor(**fields)


def test_corrupt_messages_raise_typed_errors():
    cfg, update = _one()
    ct = update.tensors["w"]
    idx = ct.indices.clone()
    idx[0], idx[1] = 0xFF, 0xFF  # first index 0xFFF: out of range is impossible for 64x64
    descending = _with(update, indices=idx)
    cases = {
        "not strictly ascending": descending,
        "NaN or Inf": _with(update, table=torch.tensor([0.0, float("nan"), 0.0, 0.0])),
        "float32 of shape": _with(update, table=torch.zeros(5)),
        "expected": _with(update, codes=ct.codes[:-1]),
        "bytes": _with(update, indices=ct.indices[:-3]),
    }
    for reason, bad in cases.items():
        with pytest.raises(CorruptUpdateError, match=reason) as info:
            decode_tensor("w", bad, cfg)
        assert info.value.tensor == "w"


def test_out_of_range_index_in_small_chunk():
    cfg, update = _one(shape=(30, 30))  # 30x30 chunks: indices must be < 900
    from sparseloco.packing import pack_indices, unpack_indices

    idx = unpack_indices(update.tensors["w"].indices, 12, 8)
    idx[-1] = 1000
    with pytest.raises(CorruptUpdateError, match="out of range"):
        decode_tensor("w", _with(update, indices=pack_indices(idx, 12)), cfg)


def test_codec_mismatch_is_reported():
    cfg, update = _one()
    other = CodecConfig(topk=16)
    with pytest.raises(CodecMismatchError):
        update.check_matches({"w": (64, 64)}, other)
    with pytest.raises(ShapeMismatchError, match="w"):
        update.check_matches({"w": (64, 32)}, cfg)
    with pytest.raises(ShapeMismatchError, match="missing"):
        update.check_matches({"w": (64, 64), "v": (3,)}, cfg)
