"""Security checks: forgeries and replays, namespaces and the storage root, secrets in logs.

Already covered elsewhere and not repeated here: another key's signature, a peer's own old
window, a foreign model and garbage objects in a gather
(``tests/netcomm/test_exchange.py::test_invalid_statuses_name_the_reason``); every single-byte
change (``tests/netcomm/test_envelope.py``); symlinks planted in a local root and the key
grammar (``tests/netcomm/test_storage.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from netcomm import (
    Ed25519Signer,
    ExchangeConfig,
    InvalidKeyError,
    LocalStorage,
    ModelSpec,
    NetcommConfigError,
    PeerRecord,
    S3Config,
    S3Storage,
    StaticDirectory,
    StorageError,
    StorageExchange,
    seal_envelope,
    update_key,
)
from sparseloco import CodecConfig, ErrorFeedback, encode

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY-9f3a"
TOKEN = "FQoGZXIvYXdzEXAMPLE-session-token-41c7"
FAST = ExchangeConfig(deadline_s=5.0, poll_interval_s=0.02, backoff_s=0.01, backoff_max_s=0.02)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))


def _update(model: torch.nn.Module, seed: int):
    gen = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    return encode(deltas, ErrorFeedback(CodecConfig()))


class RecordingStorage:
    """A storage that records every write and delete it is asked for."""

    def __init__(self, inner: LocalStorage) -> None:
        self.inner = inner
        self.writes: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        self.writes.append(key)
        self.inner.put(key, data)

    def delete(self, key: str) -> None:
        self.writes.append(f"delete:{key}")
        self.inner.delete(key)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _net(storage, names: list[str]):
    spec = ModelSpec.from_module(_model())
    signers = {n: Ed25519Signer.from_seed(bytes([i + 1]) * 32) for i, n in enumerate(names)}
    directory = StaticDirectory(
        PeerRecord(n, storage, signers[n].public_key, prefix=f"peers/{n}") for n in names
    )
    ex = {
        n: StorageExchange(n, storage, directory, signers[n], spec, FAST, prefix=f"peers/{n}")
        for n in names
    }
    return spec, signers, ex


def test_forged_copied_and_replayed_updates_are_rejected(tmp_path):
    """Mallory shares the bucket and its write access: whatever she writes is never accepted."""
    storage = LocalStorage(tmp_path)
    spec, signers, ex = _net(storage, ["alice", "bob", "carol", "mallory"])
    model = _model()
    ex["alice"].publish(3, _update(model, 1))
    genuine = storage.get(update_key("peers/alice", 3, "alice"))
    # 1. alice's genuine window-3 object replayed as her window-4 update
    storage.put(update_key("peers/alice", 4, "alice"), genuine)
    # 2. alice's genuine object copied into mallory's own slot (a copier)
    storage.put(update_key("peers/mallory", 4, "mallory"), genuine)
    # 3. carol's slot overwritten with an envelope naming carol, signed with mallory's key
    forged = seal_envelope(
        _update(model, 2),
        window=4,
        publisher="carol",
        fingerprint=spec.fingerprint,
        signer=signers["mallory"],
    )
    storage.put(update_key("peers/carol", 4, "carol"), forged)
    result = ex["bob"].gather(4)
    reasons = {p: (s.status, s.reason.split(":")[0]) for p, s in result.statuses.items()}
    assert reasons == {
        "alice": ("invalid", "replay"),
        "mallory": ("invalid", "peer"),
        "carol": ("invalid", "signature"),
    }
    assert result.updates == {}
    # the genuine window is still accepted exactly as published
    assert set(ex["bob"].gather(3, peers=["alice"]).updates) == {"alice"}


def test_publish_writes_only_its_own_key_and_gather_writes_nothing(tmp_path):
    storage = RecordingStorage(LocalStorage(tmp_path))
    _, _, ex = _net(storage, ["alice", "bob", "carol"])
    model = _model()
    for i, name in enumerate(["alice", "bob", "carol"]):
        storage.writes.clear()
        ex[name].publish(0, _update(model, i))
        assert storage.writes == [f"peers/{name}/updates/000000000000/{name}.nce"]
    storage.writes.clear()
    result = ex["alice"].gather(0)
    assert set(result.updates) == {"bob", "carol"}
    assert storage.writes == []


HOSTILE_IDS = ["../bob", "..", "bob/../alice", "a\\..\\b", ".hidden", "", "a\x00b", "x" * 1100]


@pytest.mark.parametrize("peer_id", [*HOSTILE_IDS, "/etc"])
def test_hostile_peer_ids_cannot_name_keys_outside_their_namespace(tmp_path, peer_id):
    storage = LocalStorage(tmp_path / "root")
    key = Ed25519Signer.from_seed(b"\x05" * 32)
    spec = ModelSpec.from_module(_model())
    with pytest.raises((InvalidKeyError, NetcommConfigError, ValueError)):
        PeerRecord(peer_id, storage, key.public_key)
    if peer_id != "/etc":  # StorageExchange strips the slash (see docs/reliability.md)
        with pytest.raises((InvalidKeyError, ValueError)):
            StorageExchange(peer_id, storage, StaticDirectory(), key, spec, FAST)
    with pytest.raises(InvalidKeyError):
        PeerRecord("bob", storage, key.public_key, prefix=f"peers/{peer_id or '..'}/x")
    assert not (tmp_path / "bob").exists() and list(tmp_path.iterdir()) == [tmp_path / "root"]


@pytest.mark.parametrize(
    "key", ["../escape", "a/../../escape", "/abs/escape", "a//b", "a/./b", "a/.tmp-x", "~/x"]
)
def test_storage_keys_cannot_escape_the_root(tmp_path, key):
    root = tmp_path / "root"
    storage = LocalStorage(root)
    with pytest.raises(InvalidKeyError):
        storage.put(key, b"x")
    with pytest.raises(InvalidKeyError):
        storage.get(key)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []


def test_secrets_do_not_appear_in_reprs_or_errors(caplog):
    cfg = S3Config(
        bucket="b",
        endpoint_url="http://127.0.0.1:9",  # discard port: nothing listens there
        access_key_id="AKIDEXAMPLE",
        secret_access_key=SECRET,
        session_token=TOKEN,
        connect_timeout_s=0.2,
        read_timeout_s=0.2,
        max_attempts=1,
    )
    storage = S3Storage(cfg)
    record = PeerRecord("alice", storage, b"\x01" * 32)
    for text in (repr(cfg), str(cfg), repr(storage), repr(record)):
        assert SECRET not in text and TOKEN not in text
    caplog.set_level(logging.INFO)
    with pytest.raises(StorageError) as info:
        storage.get("peers/alice/x")
    text = "\n".join([str(info.value), repr(info.value), caplog.text])
    assert "Could not connect" in text
    assert SECRET not in text and TOKEN not in text
    # botocore's own DEBUG logs carry the canonical request, x-amz-security-token included,
    # but never the secret key
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError):
        storage.get("peers/alice/x")
    assert caplog.records and SECRET not in caplog.text
    storage.close()


def test_secrets_do_not_appear_in_logs_of_real_s3_traffic(moto_url, caplog):
    cfg = S3Config(
        bucket="secrets-check",
        endpoint_url=moto_url,
        access_key_id="AKIDEXAMPLE",
        secret_access_key=SECRET,
        max_attempts=1,
    )
    caplog.set_level(logging.DEBUG)
    with S3Storage(cfg) as storage:
        storage.create_bucket()
        storage.put("k", b"payload")
        assert storage.get("k") == b"payload"
    assert len(caplog.records) > 10
    assert SECRET not in caplog.text


def test_local_root_symlink_to_outside_is_refused(tmp_path):
    """A planted symlink inside the root does not let a key reach outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    (root / "peers").mkdir(parents=True)
    Path(root / "peers" / "bob").symlink_to(outside, target_is_directory=True)
    storage = LocalStorage(root)
    with pytest.raises(InvalidKeyError):
        storage.put("peers/bob/updates/x.nce", b"x")
    assert list(outside.iterdir()) == []
