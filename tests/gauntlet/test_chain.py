"""The in-memory chain's rules, the bittensor adapter against a fake SDK, and Yuma."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from gauntlet import (
    BittensorChain,
    Chain,
    ChainError,
    InMemorySubnet,
    WeightLimits,
    interpret_response,
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


class FakeSubtensor:
    """The subset of the bittensor SDK's Subtensor the adapter calls; records the calls."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.calls: list[tuple] = []
        self.accept = True
        if version >= 10:
            self.set_commitment = self._set_commitment
        else:
            self.commit = self._commit

    def metagraph(self, netuid):
        self.calls.append(("metagraph", netuid))
        return SimpleNamespace(
            uids=np.array([0, 1, 2]),
            hotkeys=["hk0", "hk1", "hk2"],
            S=np.array([0.0, 5.0, 100.0], dtype=np.float32),
            validator_permit=np.array([False, False, True]),
            block=np.array(1234),
        )

    def get_current_block(self):
        return 1240

    def get_subnet_hyperparameters(self, netuid):
        return SimpleNamespace(
            max_weights_limit=32767,
            min_allowed_weights=1,
            weights_rate_limit=100,
            weights_version=7,
        )

    def get_commitment(self, netuid, uid):
        self.calls.append(("get_commitment", netuid, uid))
        return "data-1" if uid == 1 else ""

    def get_all_commitments(self, netuid):
        return {"hk1": "data-1"}

    def _commit(self, wallet, netuid, data):
        self.calls.append(("commit", wallet.hotkey.ss58_address, netuid, data))
        return None

    def _set_commitment(self, wallet, netuid, data):
        self.calls.append(("set_commitment", wallet.hotkey.ss58_address, netuid, data))
        return SimpleNamespace(success=self.accept, message="ok" if self.accept else "bad")

    def set_weights(self, **kwargs):
        self.calls.append(("set_weights", kwargs))
        if self.version >= 10:
            return SimpleNamespace(success=self.accept, message="" if self.accept else "rate")
        return (self.accept, "" if self.accept else "rate")


WALLET = SimpleNamespace(hotkey=SimpleNamespace(ss58_address="hk2"))


@pytest.mark.parametrize("version", [9, 10])
def test_bittensor_adapter_calls_the_sdk(version):
    fake = FakeSubtensor(version)
    chain = BittensorChain(fake, WALLET, netuid=3)
    assert isinstance(chain, Chain) and chain.hotkey == "hk2"
    mg = chain.metagraph()
    assert mg.uids == [0, 1, 2] and mg.hotkeys == ["hk0", "hk1", "hk2"]
    assert mg.stakes == [0.0, 5.0, 100.0] and mg.block == 1234
    assert mg.validator_permit == [False, False, True]
    assert chain.block() == 1240
    lim = chain.weight_limits()
    assert lim.max_weight_limit == pytest.approx(0.5, abs=1e-4)
    assert (lim.min_allowed_weights, lim.rate_limit, lim.version_key) == (1, 100, 7)
    assert chain.get_commitment("hk1") == "data-1"
    assert chain.get_commitment("hk0") is None and chain.get_commitment("nobody") is None
    assert chain.get_all_commitments() == {"hk1": "data-1"}
    chain.commit("bucket")
    name = "set_commitment" if version >= 10 else "commit"
    assert (name, "hk2", 3, "bucket") in fake.calls
    res = chain.set_weights([1, 2], [65535, 100], version_key=7)
    assert res.success
    kwargs = fake.calls[-1][1]
    assert kwargs["wallet"] is WALLET and kwargs["netuid"] == 3
    assert kwargs["uids"] == [1, 2] and kwargs["weights"] == [65535.0, 100.0]
    assert kwargs["version_key"] == 7
    fake.accept = False
    res = chain.set_weights([1, 2], [1, 1])
    assert not res.success and res.message == "rate"
    if version >= 10:
        with pytest.raises(ChainError, match="rejected"):
            chain.commit("bucket")


def test_interpret_response_and_lazy_import(monkeypatch):
    assert interpret_response((False, "no")).message == "no"
    assert interpret_response(True).success
    with pytest.raises(ChainError):
        interpret_response("weird")
    monkeypatch.setitem(sys.modules, "bittensor", None)  # import raises ImportError
    with pytest.raises(ChainError, match="pip install"):
        BittensorChain.connect(3)
    assert "bittensor" not in {m for m in sys.modules if sys.modules[m] is not None}


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
