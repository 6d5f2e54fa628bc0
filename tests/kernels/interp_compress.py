"""Triton compress kernels under the CPU interpreter against the PyTorch reference.

Every buffer of the message (packed indices, Rice streams, packed codes, table) and the
updated error buffer must be identical bit for bit, over several rounds so the error
feedback state evolves. Run through ``test_interpreter.py``.
"""

from __future__ import annotations

import pytest
import torch
from _interp import assert_bits_equal

from sparseloco.chunking import ChunkLayout
from sparseloco.codec import CompressedTensor
from sparseloco.config import CodecConfig
from sparseloco.kernels import compress, reference, resolve_backend, triton_codec

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _assert_same(a: CompressedTensor, b: CompressedTensor) -> None:
    assert a.shape == b.shape and a.rice_param == b.rice_param
    for (name, x), y in zip(a.buffers().items(), b.buffers().values(), strict=True):
        assert_bits_equal(x, y, name)


def _rounds(shape, delta_dtype, error_dtype, config, make_delta, rounds=2, make_error=None):
    layout = ChunkLayout.for_shape(shape, config.chunk_size)
    err = (
        make_error(layout.buffer_shape)
        if make_error
        else torch.zeros(layout.buffer_shape, dtype=torch.float32)
    ).to(error_dtype)
    err_ref, err_tri = err.clone(), err.clone()
    for r in range(rounds):
        delta = make_delta(shape, r).to(delta_dtype)
        a = reference.compress(delta, err_ref, layout, config)
        b = triton_codec.compress(delta, err_tri, layout, config)
        _assert_same(a, b)
        assert_bits_equal(err_ref, err_tri, f"error buffer after round {r}")


def _randn(seed):
    def make(shape, r):
        g = torch.Generator().manual_seed(seed * 100 + r)
        return torch.randn(shape, generator=g) * (1 + r)

    return make


SHAPES = [(64, 64), (128, 192), (100, 70), (333,), (5,), (1,), (), (7, 3, 5), (0, 8), (29, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    ("delta_dtype", "error_dtype"), [(F32, F32), (BF16, F32), (F16, F32), (BF16, BF16), (F32, BF16)]
)
def test_shapes_and_dtypes(shape, delta_dtype, error_dtype):
    _rounds(shape, delta_dtype, error_dtype, CodecConfig(), _randn(len(shape) + 7))


CONFIGS = {
    "4bit": CodecConfig(value_bits=4),
    "8bit": CodecConfig(value_bits=8, topk=100),
    "rice": CodecConfig(index_coding="rice"),
    "k1": CodecConfig(topk=1),
    "odd-k": CodecConfig(topk=33, chunk_size=16, value_bits=4),
    "dense": CodecConfig(topk=64, chunk_size=8),
    "16bit-idx": CodecConfig(chunk_size=80, topk=77),
    "beta0": CodecConfig(error_decay=0.0),
    "beta1": CodecConfig(error_decay=1.0, value_bits=8),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_configs(name):
    _rounds((160, 192), BF16, F32, CONFIGS[name], _randn(3), rounds=3)


def _adversarial(kind):
    def make(shape, r):
        g = torch.Generator().manual_seed(r)
        if kind == "all_equal":
            return torch.full(shape, 0.5)
        if kind == "all_zero":
            return torch.zeros(shape)
        if kind == "neg_zero":
            return torch.full(shape, -0.0)
        if kind == "heavy_ties":
            return torch.randint(-2, 3, shape, generator=g).float() * 0.25
        if kind == "sign_ties":
            return torch.randint(0, 2, shape, generator=g).float() * 2 - 1
        if kind == "outlier":
            x = torch.randn(shape, generator=g) * 1e-3
            x.view(-1)[1234 + r] = 3e38
            return x
        if kind == "tiny":
            return torch.randn(shape, generator=g) * 1e-30
        if kind == "few_nonzero":
            x = torch.zeros(shape)
            x.view(-1)[:: 4096 + 17] = 1.0
            return x
        raise AssertionError(kind)

    return make


@pytest.mark.parametrize(
    "kind",
    [
        "all_equal",
        "all_zero",
        "neg_zero",
        "heavy_ties",
        "sign_ties",
        "outlier",
        "tiny",
        "few_nonzero",
    ],
)
@pytest.mark.parametrize("error_dtype", [F32, BF16])
def test_adversarial_chunks(kind, error_dtype):
    _rounds((128, 128), F32, error_dtype, CodecConfig(), _adversarial(kind), rounds=3)


def test_ties_against_existing_error_buffer():
    """Δ = 0 on a buffer of repeated values: selection is decided by ties alone."""

    def make_error(shape):
        return torch.arange(shape[0] * shape[1]).remainder(7).float().view(shape) - 3

    _rounds((128, 64), F32, F32, CodecConfig(), _adversarial("all_zero"), 2, make_error)


def test_dispatch_runs_the_interpreter_only_when_asked():
    cpu = torch.device("cpu")
    assert resolve_backend("triton", cpu).name == "triton"
    auto = resolve_backend("auto", cpu)
    assert auto.name == "torch" and "interpreter" in auto.reason
    layout = ChunkLayout.for_shape((64, 128), 64)
    delta = torch.randn(64, 128)
    err_a, err_b = torch.zeros(layout.buffer_shape), torch.zeros(layout.buffer_shape)
    a = compress(delta, err_a, layout, CodecConfig(backend="triton"))
    b = compress(delta, err_b, layout, CodecConfig(backend="torch"))
    _assert_same(a, b)
    assert_bits_equal(err_a, err_b, "error buffer")
