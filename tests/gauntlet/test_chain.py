"""The in-memory chain's rules, the bittensor adapter's lazy import, and Yuma.

The adapter itself is tested against the real SDK in test_bittensor_chain.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from gauntlet import (
    BittensorChain,
    Chain,
    ChainError,
    InMemorySubnet,
    WeightLimits,
    yuma_consensus,
)


def subnet() -> InMemorySubnet:
    net = InMemorySubnet(netuid=7, limits=WeightLimits(0.6, 2, rate_limit=5, version_key=3))
    for i in range(4):
        net.register(f"m{i}")
    net.register("val", stake=10.0)
    return net


def test_in_memory_chain_enforces_rules():
    net = subnet()
    chain = net.connect("val")
    assert isinstance(chain, Chain)
    mg = chain.metagraph()
    assert mg.uids == [0, 1, 2, 3, 4] and mg.uid_of("val") == 4 and mg.stakes[4] == 10.0
    assert not chain.set_weights([0, 1], [1, 1], version_key=2).success  # old version
    assert not chain.set_weights([0], [1], version_key=3).success  # min_allowed_weights
    res = chain.set_weights([0, 1], [65535, 10], version_key=3)
    assert not res.success and "max_weight_limit" in res.message
    assert not chain.set_weights([0, 0], [1, 1], version_key=3).success
    assert not net.connect("m0").set_weights([1, 2], [1, 1], version_key=3).success  # no stake
    assert chain.set_weights([0, 1], [65535, 65535], version_key=3).success
    assert not chain.set_weights([0, 1], [1, 1], version_key=3).success  # rate limit
    net.advance(5)
    assert chain.set_weights([0, 1, 2], [3, 3, 3], version_key=3).success
    names, _stakes, w = net.weight_matrix()
    assert names == ["val"] and np.allclose(w[0], [1 / 3, 1 / 3, 1 / 3, 0, 0])


def test_commitments():
    net = subnet()
    chain = net.connect("m1")
    chain.commit("bucket:abc")
    assert net.connect("val").get_commitment("m1") == "bucket:abc"
    assert chain.get_all_commitments() == {"m1": "bucket:abc"}
    with pytest.raises(ChainError, match="128"):
        chain.commit("x" * 129)
    with pytest.raises(ChainError, match="not registered"):
        net.connect("stranger").commit("hi")


def test_bittensor_is_imported_lazily(monkeypatch):
    monkeypatch.setitem(sys.modules, "bittensor", None)  # import raises ImportError
    with pytest.raises(ChainError, match="pip install"):
        BittensorChain.connect(3)


def test_yuma_agreement_and_clipping():
    agree = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    res = yuma_consensus(agree, np.array([1.0, 3.0]))
    np.testing.assert_allclose(res.validator_trust, [1.0, 1.0])
    np.testing.assert_allclose(res.incentive, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(res.trust[:2], [1.0, 1.0])
    np.testing.assert_allclose(res.dividends, [0.25, 0.75])
    rogue = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    res = yuma_consensus(rogue, np.array([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(res.consensus, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(res.validator_trust, [1.0, 1.0, 0.0])
    assert res.incentive[2] == 0.0
    with pytest.raises(ValueError):
        yuma_consensus(agree, np.array([1.0]))
