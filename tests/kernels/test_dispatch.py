"""Backend dispatch: what runs where, and the errors when Triton cannot run."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sparseloco.chunking import ChunkLayout
from sparseloco.config import CodecConfig
from sparseloco.errors import BackendUnavailableError
from sparseloco.kernels import (
    TRITON_MAX_CHUNK_NUMEL,
    aggregate_sparse,
    compress,
    resolve_backend,
    triton_status,
)

CPU = torch.device("cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_torch_is_always_available(no_interpreter):
    assert resolve_backend("torch", CPU).name == "torch"


def test_auto_on_cpu_uses_torch_and_says_why(no_interpreter):
    choice = resolve_backend("auto", CPU)
    assert choice.name == "torch"
    assert "cpu" in choice.reason and "CUDA" in choice.reason


def test_triton_on_cpu_raises_with_the_reason(no_interpreter):
    with pytest.raises(BackendUnavailableError, match="need CUDA tensors"):
        resolve_backend("triton", CPU)
    layout = ChunkLayout.for_shape((8, 8), 8)
    with pytest.raises(BackendUnavailableError, match="backend='triton' cannot run"):
        compress(
            torch.zeros(8, 8),
            torch.zeros(layout.buffer_shape),
            layout,
            CodecConfig(chunk_size=8, topk=4, backend="triton"),
        )
    peers = [(torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 4))]
    with pytest.raises(BackendUnavailableError):
        aggregate_sparse(layout, peers, reducer="mean", clip_to_median=False, backend="triton")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_auto_on_cuda_tensors_picks_triton():
    choice = resolve_backend("auto", torch.device("cuda"))
    assert choice.name == "triton" and choice.reason.startswith("auto:")


def test_chunks_over_the_kernel_limit_are_refused():
    ok, why = triton_status(torch.device("cuda"), TRITON_MAX_CHUNK_NUMEL + 1)
    assert not ok and "limit" in why
    assert resolve_backend("auto", torch.device("cuda"), 128 * 128).name == "torch"
    with pytest.raises(BackendUnavailableError, match="limit"):
        resolve_backend("triton", torch.device("cuda"), 128 * 128)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("coding", ["signmag", "ranked"])
def test_the_triton_compress_kernel_refuses_other_value_codings(coding):
    """Called directly (not through the dispatcher) it would otherwise send a uniform table."""
    from sparseloco.kernels import triton_codec

    layout = ChunkLayout.for_shape((8, 8), 8)
    cfg = CodecConfig(chunk_size=8, topk=4, value_coding=coding)
    with pytest.raises(BackendUnavailableError, match=f"not '{coding}'"):
        triton_codec.compress(torch.zeros(8, 8), torch.zeros(layout.buffer_shape), layout, cfg)
