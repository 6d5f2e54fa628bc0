"""Triton decode + aggregate kernel under the CPU interpreter against the PyTorch reference.

The dense result must be identical bit for bit for both reducers, with and without
median-norm clipping. Run through ``test_interpreter.py``.
"""

from __future__ import annotations

import pytest
import torch
from _interp import assert_bits_equal

from sparseloco.aggregate import aggregate
from sparseloco.chunking import ChunkLayout
from sparseloco.codec import ErrorFeedback, encode
from sparseloco.config import CodecConfig
from sparseloco.kernels import reference, triton_codec


def _peers(layout, k, num_peers, seed, *, overlap=False):
    g = torch.Generator().manual_seed(seed)
    peers = []
    shared = torch.rand(layout.num_chunks, layout.chunk_numel, generator=g).argsort(1)
    for p in range(num_peers):
        values = torch.randn(layout.num_chunks, k, generator=g) * (1 + p % 5)
        if k == layout.chunk_numel:
            peers.append((None, values))
            continue
        order = (
            shared
            if overlap
            else torch.rand(layout.num_chunks, layout.chunk_numel, generator=g).argsort(1)
        )
        peers.append((order[:, :k].sort(1).values, values))
    return peers


def _check(layout, peers):
    for reducer in ("mean", "mean_selected"):
        for clip in (False, True):
            a = reference.aggregate_sparse(layout, peers, reducer=reducer, clip_to_median=clip)
            b = triton_codec.aggregate_sparse(layout, peers, reducer=reducer, clip_to_median=clip)
            assert_bits_equal(a, b, f"aggregate reducer={reducer} clip={clip}")


@pytest.mark.parametrize(
    ("shape", "topk"),
    [((128, 192), 64), ((100, 70), 7), ((333,), 64), ((5,), 64), ((), 64), ((7, 3, 5), 3)],
    ids=str,
)
@pytest.mark.parametrize("num_peers", [1, 2, 20])
def test_random_peers(shape, topk, num_peers):
    layout = ChunkLayout.for_shape(shape, 64)
    _check(layout, _peers(layout, layout.k(topk), num_peers, seed=num_peers))


@pytest.mark.parametrize("num_peers", [3, 20])
def test_all_peers_pick_the_same_indices(num_peers):
    layout = ChunkLayout.for_shape((128, 128), 64)
    _check(layout, _peers(layout, 64, num_peers, seed=5, overlap=True))


def test_zero_and_outlier_peers():
    layout = ChunkLayout.for_shape((64, 192), 64)
    peers = _peers(layout, 64, 5, seed=9)
    peers[1] = (peers[1][0], torch.zeros_like(peers[1][1]))
    peers[3] = (peers[3][0], peers[3][1] * 1e6)
    _check(layout, peers)


def test_empty_tensor():
    layout = ChunkLayout.for_shape((0, 8), 64)
    peers = [(torch.zeros(0, 8, dtype=torch.int64), torch.zeros(0, 8))]
    b = triton_codec.aggregate_sparse(layout, peers, reducer="mean", clip_to_median=True)
    assert b.shape == (0, 8)


@pytest.mark.parametrize("preset", ["covenant-72b", "covenant-72b-rice", "sparseloco-512m"])
def test_end_to_end_through_codec(preset):
    """Messages from the real encoder, decoded and aggregated by both backends."""
    codec = CodecConfig.from_preset(preset)
    shapes = {"w": (96, 128), "b": (96,), "emb": (50, 64)}
    updates = {}
    for peer in range(4):
        g = torch.Generator().manual_seed(peer)
        deltas = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        updates[f"peer{peer}"] = encode(deltas, ErrorFeedback(codec))
    for reducer in ("mean", "mean_selected"):
        ref = aggregate(updates, reducer=reducer, backend="torch")
        tri = aggregate(updates, reducer=reducer, backend="triton")
        for name in shapes:
            assert_bits_equal(ref[name], tri[name], f"{preset} {reducer} {name}")
