"""Peer discovery from commitments: who is listed, who is left out and why."""

from __future__ import annotations

from functools import partial

from gauntlet import InMemorySubnet
from netcomm import Ed25519Signer, LocalStorage
from subnet import ChainDirectory, Locator, encode_commitment
from subnet.commitments import IDENTITY_KEY, identity_document, key_digest
from subnet.storage import open_peer_storage


def announce(subnet, root, hotkey, role="miner", *, prefix=None, seed=0, stake=0.0):
    signer = Ed25519Signer.from_seed(bytes([seed]) * 32)
    prefix = prefix or hotkey
    LocalStorage(root / prefix).put(IDENTITY_KEY, identity_document(hotkey, signer.public_key))
    subnet.register(hotkey, stake=stake)
    loc = Locator("local", role, key_digest(signer.public_key), prefix=prefix)
    subnet.connect(hotkey).commit(encode_commitment(loc))
    return signer


def directory(subnet, root) -> ChainDirectory:
    return ChainDirectory(subnet.connect("reader"), partial(open_peer_storage, local_root=root))


def test_lists_verified_miners_and_the_top_validator(tmp_path):
    subnet = InMemorySubnet()
    signers = {hk: announce(subnet, tmp_path, hk, seed=i) for i, hk in enumerate(["m1", "m0"])}
    announce(subnet, tmp_path, "v-small", "validator", seed=5, stake=10.0)
    announce(subnet, tmp_path, "v-big", "validator", seed=6, stake=20.0)
    d = directory(subnet, tmp_path)
    d.refresh()
    assert d.hotkeys("miner") == ["m0", "m1"]
    assert d.top_validator() == "v-big"
    channel = d.channel("proof")
    assert channel.peers() == ["m0", "m1"]
    record = channel.lookup("m0")
    assert record.public_key == signers["m0"].public_key and record.prefix == "proof"
    assert channel.lookup("v-big") is None and channel.lookup("nobody") is None
    assert d.problems == {}


def test_bad_commitments_and_identities_are_left_out(tmp_path):
    subnet = InMemorySubnet()
    announce(subnet, tmp_path, "good", seed=1)
    # A copier commits the good miner's locator: the identity there names "good".
    subnet.register("copier")
    subnet.connect("copier").commit(subnet.commitments["good"][1])
    subnet.register("garbage")
    subnet.connect("garbage").commit("hello")
    # A miner whose identity file does not exist (yet).
    subnet.register("early")
    loc = Locator("local", "miner", key_digest(bytes(32)), prefix="early")
    subnet.connect("early").commit(encode_commitment(loc))
    # Committed, then deregistered: no longer in the metagraph.
    announce(subnet, tmp_path, "gone", seed=3)
    subnet.hotkeys.remove("gone")
    d = directory(subnet, tmp_path)
    d.refresh()
    assert d.hotkeys("miner") == ["good"]
    assert sorted(d.problems) == ["copier", "early", "garbage"]
    assert "names 'good', not 'copier'" in d.problems["copier"]
    assert "Base85" in d.problems["garbage"] or "format" in d.problems["garbage"]

    # The late miner writes its identity; the next refresh picks it up.
    signer = announce(subnet, tmp_path, "early", seed=4)
    d.refresh()
    assert d.hotkeys("miner") == ["early", "good"]
    assert d.channel().lookup("early").public_key == signer.public_key


def test_unchanged_commitments_are_not_read_again(tmp_path):
    subnet = InMemorySubnet()
    announce(subnet, tmp_path, "m0", seed=1)
    d = directory(subnet, tmp_path)
    d.refresh()
    first = d.entry("m0")
    (tmp_path / "m0" / IDENTITY_KEY).unlink()  # would fail if it were read again
    d.refresh()
    assert d.entry("m0").storage is first.storage and d.problems == {}
    announce(subnet, tmp_path, "m0", seed=2)  # a new key: a new commitment
    d.refresh()
    assert d.entry("m0").public_key != first.public_key
