import itertools

import pytest
import torch

from sparseloco import (
    CodecConfig,
    CodecMismatchError,
    DenseUpdate,
    ErrorFeedback,
    aggregate,
    decode,
    encode,
    iter_aggregate_dense,
)
from sparseloco.kernels.reference import clip_factors, median

SHAPES = {"w": (64, 128), "b": (50,), "c": (5, 3, 3)}


def _peer_updates(n, scale=None, cfg=None):
    cfg = cfg or CodecConfig(topk=16)
    g = torch.Generator().manual_seed(42)
    out = {}
    for i in range(n):
        s = 1.0 if scale is None else scale[i]
        deltas = {k: torch.randn(v, generator=g) * s for k, v in SHAPES.items()}
        out[f"peer{i}"] = encode(deltas, ErrorFeedback(cfg))
    return out


def _manual(updates, reducer, clip):
    dense = {p: decode(u) for p, u in sorted(updates.items())}
    out = {}
    for name in SHAPES:
        vals = [dense[p][name].double() for p in sorted(dense)]
        norms = [float(v.norm()) for v in vals]
        med = (
            sorted(norms)[len(norms) // 2]
            if len(norms) % 2
            else sum(sorted(norms)[len(norms) // 2 - 1 : len(norms) // 2 + 1]) / 2
        )
        f = [min(1.0, med / n) if clip and n > 0 else 1.0 for n in norms]
        total = sum(v * fi for v, fi in zip(vals, f, strict=True))
        if reducer == "mean":
            out[name] = total / len(vals)
        else:
            count = sum((v != 0).double() for v in vals)
            out[name] = total / count.clamp_min(1)
    return out


@pytest.mark.parametrize("reducer", ["mean", "mean_selected"])
@pytest.mark.parametrize("clip", [True, False])
def test_aggregate_matches_manual_computation(reducer, clip):
    updates = _peer_updates(5, scale=[1, 2, 0.5, 10, 1])
    got = aggregate(updates, reducer=reducer, clip_to_median=clip)
    want = _manual(updates, reducer, clip)
    for name in SHAPES:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-6)


def test_mean_selected_differs_from_mean_where_few_peers_selected():
    updates = _peer_updates(4)
    sel = aggregate(updates, reducer="mean_selected", clip_to_median=False)["w"]
    avg = aggregate(updates, reducer="mean", clip_to_median=False)["w"]
    nz = avg != 0
    assert bool((sel[nz].abs() >= avg[nz].abs() - 1e-7).all())
    assert float((sel - avg).abs().max()) > 0


def test_result_is_bitwise_independent_of_arrival_order():
    updates = _peer_updates(4, scale=[1, 3, 0.2, 1])
    ref = aggregate(updates)
    for perm in itertools.permutations(sorted(updates)):
        got = aggregate({p: updates[p] for p in perm})
        for name in SHAPES:
            assert torch.equal(got[name], ref[name])


def test_clipping_bounds_a_huge_peer():
    updates = _peer_updates(5, scale=[1, 1, 1, 1, 1e6])
    clipped = aggregate(updates, reducer="mean", clip_to_median=True)["w"]
    assert float(clipped.norm()) < 3 * float(decode(updates["peer0"])["w"].norm())


def test_median_and_clip_factors():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert clip_factors([1.0, 2.0, 4.0]) == [1.0, 1.0, 0.5]
    assert clip_factors([0.0, 0.0, 1.0]) == [1.0, 1.0, 0.0]


def test_mixed_codecs_rejected():
    a = _peer_updates(1, cfg=CodecConfig(topk=16))
    b = _peer_updates(1, cfg=CodecConfig(topk=8))
    with pytest.raises(CodecMismatchError):
        aggregate({"a": a["peer0"], "b": b["peer0"]})


def test_dense_mean_in_fixed_order():
    g = torch.Generator().manual_seed(3)
    ups = {f"p{i}": DenseUpdate({"w": torch.randn(7, 5, generator=g)}) for i in range(3)}
    ((_, mean),) = list(iter_aggregate_dense(ups))
    want = (ups["p0"].tensors["w"] + ups["p1"].tensors["w"] + ups["p2"].tensors["w"]) / 3
    torch.testing.assert_close(mean, want)


def _index_add_aggregate(layout, peers, *, reducer, clip_to_median):
    """The aggregate before issue 15 (per-peer flat index_add_), the bit-exact oracle."""
    factors = [1.0] * len(peers)
    if clip_to_median:
        factors = clip_factors([float(torch.linalg.vector_norm(v.double())) for _, v in peers])
    total = torch.zeros(layout.numel)
    count = torch.zeros(layout.numel)
    for (idx, values), f in zip(peers, factors, strict=True):
        contrib = (values * f if f != 1.0 else values).reshape(-1)
        if idx is None:
            total.add_(layout.from_chunks(contrib.view(layout.buffer_shape)).reshape(-1))
            count.add_(1.0)
        else:
            pos = layout.flat_positions(idx).reshape(-1)
            total.index_add_(0, pos, contrib)
            count.index_add_(0, pos, torch.ones_like(contrib))
    total.div_(len(peers)) if reducer == "mean" else total.div_(count.clamp_min_(1.0))
    return total.view(layout.shape)


@pytest.mark.parametrize(
    ("shape", "topk", "peers"),
    [
        ((96, 200), 17, 5),
        ((256, 192), 64, 9),
        ((130,), 64, 3),
        ((64, 64), 4096, 4),
        ((64, 128), 8, 300),  # int32 counts
    ],
)
@pytest.mark.parametrize("reducer", ["mean_selected", "mean"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("block_elements", [None, 1])  # one block; one tile row per block
def test_scatter_aggregate_is_bit_equal_to_index_add(
    shape, topk, peers, reducer, clip, block_elements, monkeypatch
):
    from sparseloco.chunking import ChunkLayout
    from sparseloco.kernels import reference

    if block_elements:
        monkeypatch.setattr(reference, "AGGREGATE_BLOCK_ELEMENTS", block_elements)
    g = torch.Generator().manual_seed(7)
    layout = ChunkLayout.for_shape(shape, 64)
    k = layout.k(topk)
    records = []
    for _ in range(peers):
        x = torch.randn(layout.buffer_shape, generator=g)
        idx = None if layout.is_dense(topk) else reference.topk_exact(x, k)
        scale = float(torch.rand(1, generator=g)) * 10
        records.append((idx, torch.randn((layout.num_chunks, k), generator=g) * scale))
    want = _index_add_aggregate(layout, records, reducer=reducer, clip_to_median=clip)
    got = reference.aggregate_sparse(layout, records, reducer=reducer, clip_to_median=clip)
    assert got.shape == want.shape
    assert torch.equal(got, want)
