"""Score normalization, the u16 conversion and the chain's limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gauntlet import (
    U16_MAX,
    WeightsConfig,
    WeightsError,
    cap_weights,
    normalize_scores,
    rank_profile,
    to_u16,
)


def test_power_normalization():
    scores = {"a": 3.0, "b": 1.0, "c": 0.0, "d": -2.0}
    w = normalize_scores(scores, WeightsConfig())
    assert w == {"a": pytest.approx(0.75), "b": pytest.approx(0.25), "c": 0.0, "d": 0.0}
    w = normalize_scores(scores, WeightsConfig(power=2.0))
    assert w == {"a": pytest.approx(0.9), "b": pytest.approx(0.1), "c": 0.0, "d": 0.0}
    assert normalize_scores({"a": 0.0}, WeightsConfig()) == {"a": 0.0}


def test_rank_profile_bands():
    cfg = WeightsConfig(scheme="rank")
    prof = rank_profile(40, cfg)
    assert sum(prof[:20]) == pytest.approx(0.75) and sum(prof[20:30]) == pytest.approx(0.25)
    assert prof[0] == pytest.approx(2 * prof[19]) and prof[30:] == [0.0] * 10
    assert prof[21] == pytest.approx(0.8 * prof[20])
    assert sum(rank_profile(5, cfg)) == pytest.approx(1.0)
    w = normalize_scores({"x": 1.0, "y": 2.0, "z": 2.0}, cfg)
    assert w["y"] > w["z"] > w["x"]  # ties broken by id


def test_cap_redistributes_instead_of_truncating():
    w = cap_weights([0.7, 0.2, 0.1, 0.0], 0.4)
    assert w[0] == pytest.approx(0.4)
    assert w[1] == pytest.approx(0.4) and w[2] == pytest.approx(0.2)
    assert sum(w) == pytest.approx(1.0) and w[3] == 0.0
    spread = cap_weights([1.0, 0.0, 0.0, 0.0], 0.3)
    assert spread == pytest.approx([0.3, 0.7 / 3, 0.7 / 3, 0.7 / 3])
    with pytest.raises(WeightsError, match="cannot hold"):
        cap_weights([1.0, 0.0], 0.4)


@settings(max_examples=60, deadline=None)
@given(
    raw=st.lists(st.floats(0, 10), min_size=3, max_size=30),
    limit=st.floats(0.1, 1.0),
    min_allowed=st.integers(0, 3),
)
def test_to_u16_respects_chain_rules(raw, limit, min_allowed):
    uids = list(range(len(raw)))
    weights = dict(enumerate(raw))
    if sum(raw) == 0 or len(raw) * limit < 1:
        with pytest.raises(WeightsError):
            to_u16(weights, uids, max_weight_limit=limit, min_allowed_weights=min_allowed)
        return
    cw = to_u16(weights, uids, max_weight_limit=limit, min_allowed_weights=min_allowed)
    total = sum(cw.values)
    assert all(0 < v <= U16_MAX for v in cw.values) and cw.uids == sorted(cw.uids)
    assert len(cw.values) >= min_allowed
    if len(cw.values) > 1:
        assert max(v * U16_MAX // total for v in cw.values) <= int(limit * U16_MAX)
    assert max(cw.values) >= U16_MAX - 2 or len(cw.values) == 1 or limit < 1


def test_burn_and_min_allowed():
    cw = to_u16({1: 1.0}, [0, 1, 2, 3], burn_uid=0, burn_fraction=0.25, min_allowed_weights=3)
    assert cw.uids == [0, 1, 2] and cw.values[:2] == [round(0.25 / 0.75 * U16_MAX), U16_MAX]
    assert cw.values[2] == 1
    assert to_u16({}, [0, 1], burn_uid=1).uids == [1]
    with pytest.raises(WeightsError, match="not registered"):
        to_u16({9: 1.0}, [0, 1])
    with pytest.raises(WeightsError, match="min_allowed"):
        to_u16({0: 1.0}, [0, 1], min_allowed_weights=3)
