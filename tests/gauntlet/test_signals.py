"""Sync check, copy detection, BMA and ratings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gauntlet import (
    RatingConfig,
    SignalConfig,
    assigned_indicator,
    blame_copies,
    decode_update,
    effective_bma,
    index_overlap,
    ordinal,
    pair_similarities,
    rate_match,
    rating_factor,
    sample_values,
    sketch_cosine,
    sync_positions,
    sync_score,
    update_bma,
    update_sketch,
)
from sparseloco import CodecConfig, ErrorFeedback, encode

SIG = SignalConfig()
CODEC = CodecConfig(chunk_size=8, topk=4, backend="torch")
SHAPES = {"w": (16, 16), "b": (16,)}


def compressed(seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    delta = {n: scale * torch.randn(s, generator=g) for n, s in SHAPES.items()}
    return delta, decode_update(encode(delta, ErrorFeedback(CODEC)), SHAPES, CODEC)


def test_sync_formula():
    own = torch.zeros(10, dtype=torch.float64)
    assert sync_score(own, own.clone(), 0.5, SIG).score == 1.0
    one_round = sync_score(own, torch.full((10,), 0.5), 0.5, SIG)
    assert one_round.x == pytest.approx(1.0)
    assert one_round.score == pytest.approx((1 - 1 / 3) ** 2.5)
    assert sync_score(own, torch.full((10,), 2.0), 0.5, SIG).score == 0.0
    assert sync_score(own, None, 0.5, SIG).score == SIG.sync_missing
    assert sync_score(own, torch.full((10,), math.nan), 0.5, SIG).score == SIG.sync_missing
    assert sync_score(own, torch.zeros(3), 0.5, SIG).score == SIG.sync_missing
    assert sync_score(own, torch.ones(10), None, SIG).score == 1.0  # no reference yet


def test_sync_positions_deterministic_and_valid():
    pos = sync_positions(SHAPES, 4, "s", 50)
    assert pos == sync_positions(SHAPES, 4, "s", 50) != sync_positions(SHAPES, 5, "s", 50)
    assert len(set(pos)) == 50
    assert all(0 <= i < math.prod(SHAPES[n]) for n, i in pos)
    params = {n: torch.arange(math.prod(s), dtype=torch.float32).view(s) for n, s in SHAPES.items()}
    vals = sample_values(params, pos)
    assert [float(v) for v in vals] == [float(i) for _, i in pos]


def test_copy_detection_blames_by_provenance():
    _, a = compressed(0)
    _, b = compressed(1)
    # a copier re-encodes the victim's decoded update with a little noise
    noise = torch.Generator().manual_seed(2)  # not the global RNG: the same noise in any test order
    near = {
        n: d + 0.01 * d.abs().max() * torch.randn(d.shape, generator=noise)
        for n, d in b.dense.items()
    }
    c = decode_update(encode(near, ErrorFeedback(CODEC)), SHAPES, CODEC)
    updates = {"a": a, "b": b, "b-copy": b, "c": c}
    pairs = {(p.a, p.b): p for p in pair_similarities(updates)}
    assert pairs[("b", "b-copy")].identical and pairs[("b", "b-copy")].overlap == 1.0
    assert pairs[("b", "c")].cosine > 0.95 and not pairs[("b", "c")].identical
    assert pairs[("a", "b")].overlap < 0.4 and abs(pairs[("a", "b")].cosine) < 0.5
    # provenance: the copies' updates help b's data as much as their own; times play no part
    fits = {
        ("b", "b"): 0.05, ("b", "b-copy"): 0.01, ("b", "c"): 0.01,
        ("b-copy", "b-copy"): 0.01, ("b-copy", "b"): 0.05, ("b-copy", "c"): 0.005,
        ("c", "c"): 0.01, ("c", "b"): 0.04, ("c", "b-copy"): 0.005,
    }  # fmt: skip
    blamed = blame_copies(list(pairs.values()), fits, SIG)
    assert sorted(blamed) == ["b-copy", "c"]
    assert blamed["b-copy"].source == "b" and blamed["c"].source == "b"
    assert (blamed["c"].fit_own, blamed["c"].fit_source) == (0.01, 0.04)
    # the storage server's times play no part while provenance is decisive
    late_b = {"b": 99.0, "b-copy": 1.0, "c": 1.0}
    assert sorted(blame_copies(list(pairs.values()), fits, SIG, late_b)) == ["b-copy", "c"]
    # look-alikes that each fit their own data clearly better: nobody is blamed
    fits |= {("b-copy", "b-copy"): 0.08, ("c", "c"): 0.07}
    assert sorted(blame_copies(list(pairs.values()), fits, SIG)) == []
    # fits within noise of each other (c: 0.069 on b's data vs 0.07 on its own): the later
    # stored object is blamed, whichever it is; without times, the larger margin
    fits[("c", "b")] = 0.069
    pair_bc = [pairs[("b", "c")]]
    assert sorted(blame_copies(pair_bc, fits, SIG, {"b": 10.0, "c": 11.0})) == ["c"]
    assert sorted(blame_copies(pair_bc, fits, SIG, {"b": 11.0, "c": 10.0})) == ["b"]
    assert sorted(blame_copies(pair_bc, fits, SIG, {"b": 10.0, "c": 10.0})) == ["c"]
    assert sorted(blame_copies(pair_bc, fits, SIG)) == ["c"]


def test_index_overlap_value():
    _, a = compressed(0)
    assert index_overlap(a, a) == 1.0
    _, b = compressed(5)
    assert set(a.keys) == {"w", "b"}  # 1-D rows of 8 keep 4: sparse too
    shared = 0.0
    for name in a.keys:
        chunks, k = a.kept[name]
        for c in range(chunks):
            ia = {int(x) for x in a.keys[name] if x // 64 == c} if name == "w" else None
            ib = {int(x) for x in b.keys[name] if x // 64 == c} if name == "w" else None
            if name == "b":
                ia = {int(x) for x in a.keys[name] if x // 8 == c}
                ib = {int(x) for x in b.keys[name] if x // 8 == c}
            shared += len(ia & ib) / k
    total_chunks = a.kept["w"][0] + a.kept["b"][0]
    assert index_overlap(a, b) == pytest.approx(shared / total_chunks)
    assert 0.0 < index_overlap(a, b) < 1.0


def test_bma_update_clip_and_warmup():
    raw = SignalConfig(bma_debias=False, bma_full=1.0)  # Gauntlet's moving average as is
    bma = 0.0
    for _ in range(2):
        bma = update_bma(bma, 1, raw)
    assert bma == pytest.approx(0.0975)
    assert effective_bma(bma, 2, 2, raw) == pytest.approx(0.0975)  # still warming up
    assert effective_bma(bma, 3, 3, raw) == 0.0  # below threshold after warm-up
    assert update_bma(0.01, -1, raw) == 0.0


def test_bma_decay_one_never_moves_and_does_not_divide_by_zero():
    frozen = SignalConfig(bma_decay=1.0)
    assert update_bma(0.0, 1.0, frozen) == 0.0
    assert effective_bma(0.0, 5, 5, frozen) == 0.0


def test_numeric_signal_fields_reject_bools():
    for name in ("assigned_scale", "bma_full", "replay_cosine", "bma_decay"):
        with pytest.raises(ValueError, match=name):
            SignalConfig(**{name: True})


def test_assigned_reference_is_cross_or_random():
    assert SignalConfig().assigned_reference == "cross"
    for bad in ("median", "", 1, None):
        with pytest.raises(ValueError, match="assigned_reference"):
            SignalConfig(assigned_reference=bad)


def test_debiased_bma_is_the_mean_indicator_and_saturates():
    # two +1: the raw average 0.0975 is the mean (1.0) debiased; it is far past bma_full
    bma = update_bma(update_bma(0.0, 1.0, SIG), 1.0, SIG)
    assert effective_bma(bma, 2, 2, SIG) == 1.0
    # +1, +1, −1 after warm-up: raw 0.0426 would be zeroed, the debiased mean 0.30 is not
    third = update_bma(bma, -1.0, SIG)
    assert 0.0426 < third < 0.0427
    assert effective_bma(third, 3, 3, SIG) == pytest.approx(third / (1 - 0.95**3) / 0.5)
    # a coin flip's mean (b = ±0.05) is zeroed once past warm-up
    coin = 0.0
    for b in (0.05, -0.05, 0.05, -0.05):
        coin = update_bma(coin, b, SIG)
    assert effective_bma(coin, 4, 4, SIG) == 0.0


@pytest.mark.parametrize(
    ("g_rand", "g_own", "scale", "want"),
    [
        (0.010, 0.011, 0.1, pytest.approx(1 / 1.1)),  # 9% advantage of the own effect
        (0.010, 0.0105, 0.1, pytest.approx(0.5 / 1.05)),
        (0.011, 0.010, 0.1, pytest.approx(-1 / 1.1)),
        (0.010, 0.009, 0.0, -1.0),  # Gauntlet's sign rule
        (0.010, 0.012, 0.0, 1.0),
        (0.010, 0.010, 0.0, -1.0),  # a tie shows nothing
        (-0.004, 0.023, 0.1, 1.0),  # hurts random data but fits its own: trained on it
        (0.0, 0.0, 0.1, -1.0),  # changes nothing
        (float("nan"), 0.01, 0.1, -1.0),
        (0.01, float("inf"), 0.1, -1.0),
    ],
)
def test_assigned_indicator(g_rand, g_own, scale, want):
    assert assigned_indicator(g_rand, g_own, 0.0, scale) == want


def test_anchor_matches_keep_equal_helpers_together_beside_a_strong_one():
    """The free-for-all alone sinks the weakest of equal helpers (and all of them beside a
    peer twice as good); one-on-one matches against the anchor credit each helper itself."""
    rng = np.random.default_rng(1)
    peers = ["p0", "p1", "p2", "p3", "strong"]
    spreads = {False: [], True: []}
    for matches in (False, True):
        cfg = RatingConfig(anchor_matches=matches)
        for _ in range(20):
            ratings: dict[str, tuple[float, float]] = {}
            for _ in range(6):
                noise = 1 + 0.25 * rng.standard_normal(len(peers))
                scores = {
                    p: float(n) * (2.0 if p == "strong" else 1.0)
                    for p, n in zip(peers, noise, strict=True)
                }
                ratings.update(rate_match(ratings, scores, cfg))
            f = {p: rating_factor(*ratings[p], cfg) for p in peers}
            honest = [f[p] for p in peers[:4]]
            spreads[matches].append(max(honest) / min(honest) if min(honest) > 0 else math.inf)
            if matches:
                assert f["strong"] > max(honest)  # quality still pays
    assert sum(x > 3 for x in spreads[False]) >= 5  # the pitfall
    assert max(spreads[True]) < 2.0


def test_ratings_match_and_fresh_pitfall():
    cfg = RatingConfig()
    fresh = (cfg.mu, cfg.sigma)
    assert ordinal(*fresh, cfg) == pytest.approx(0.0)
    new = rate_match({}, {"a": 0.3, "b": 0.1, "c": -1.0}, cfg)
    assert new["a"][0] > cfg.mu > new["c"][0]
    assert ordinal(*new["c"], cfg) < 0
    assert rating_factor(*new["c"], cfg) == 0.0  # clamped, not negative
    shifted = RatingConfig(transform="shift", shift=10.0)
    assert rating_factor(*new["c"], shifted) == pytest.approx(ordinal(*new["c"], cfg) + 10.0)
    lone = RatingConfig(null_anchor=False)
    assert rate_match(new, {"a": 1.0}, lone) == {"a": new["a"]}  # one player: no match
    assert rate_match({}, {"b": 0.1, "a": 0.3, "c": -1.0}, cfg) == new  # order-free


def test_null_anchor_lets_equally_good_peers_all_rise():
    """Without the anchor, equal helpers split a zero-sum ranking; with it, all of them rise."""
    peers = [f"p{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    results = {}
    for anchor in (False, True):
        cfg = RatingConfig(null_anchor=anchor)
        ratings: dict[str, tuple[float, float]] = {}
        for _ in range(8):  # equally good: positive gains, ranked by noise
            scores = {p: float(0.01 + 0.005 * rng.standard_normal()) for p in peers}
            scores = {p: max(v, 1e-4) for p, v in scores.items()}
            ratings.update(rate_match(ratings, scores, cfg))
        results[anchor] = [rating_factor(*ratings[p], cfg) for p in peers]
    assert sum(f == 0.0 for f in results[False]) >= 2  # the pitfall the anchor removes
    assert all(f > 0.0 for f in results[True])
    # doing nothing or harm loses to the anchor, alone or among helpers, for as long as it lasts
    cfg = RatingConfig()
    window = {"helper": 0.01, "helper2": 0.012, "freerider": 0.0, "harm": -0.01}
    mixed: dict[str, tuple[float, float]] = {}
    for _ in range(10):
        mixed.update(rate_match(mixed, window, cfg))
        assert rating_factor(*mixed["freerider"], cfg) == rating_factor(*mixed["harm"], cfg) == 0
        assert min(rating_factor(*mixed[p], cfg) for p in ("helper", "helper2")) > 0
    assert mixed["freerider"][0] < cfg.mu
    alone: dict[str, tuple[float, float]] = {}
    for _ in range(30):
        alone.update(rate_match(alone, {"freerider": 0.0}, cfg))
        assert rating_factor(*alone["freerider"], cfg) == 0.0


def test_update_sketch_estimates_cosine():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) < 0.05)}
    b = {"w": torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) < 0.05)}
    sa = update_sketch(a)
    assert sa == update_sketch({"w": a["w"].clone()})  # deterministic, public hash
    assert sketch_cosine(sa, update_sketch({"w": 3.0 * a["w"]})) == pytest.approx(1.0)
    # one tensor scaled up scores as before (each is evaluated at its own length): same sketch
    two = {"w": a["w"], "v": b["w"]}
    skewed = {"w": a["w"], "v": 1e3 * b["w"]}
    assert sketch_cosine(update_sketch(two), update_sketch(skewed)) == pytest.approx(1.0)
    assert abs(sketch_cosine(sa, update_sketch(b))) < 0.25  # unrelated: ~1/sqrt(256)
    # the same values under another name hash elsewhere
    assert abs(sketch_cosine(sa, update_sketch({"v": a["w"]}))) < 0.25
    assert update_sketch({"w": torch.zeros(3)}) is None
