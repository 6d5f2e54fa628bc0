"""StorageExchange: statuses, deadlines, retries, de-duplication, and SparseLoCo end to end."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch

import sparseloco
from netcomm import (
    Ed25519Signer,
    EnvelopeLimits,
    ExchangeConfig,
    FaultPlan,
    FaultyStorage,
    LocalStorage,
    ModelSpec,
    NetcommConfigError,
    NotEnoughPeersError,
    PeerRecord,
    StaticDirectory,
    StorageExchange,
    open_envelope,
    read_header,
    seal_envelope,
    update_key,
)
from sparseloco.exchange import Exchange

# gather returns as soon as every peer is settled: the default deadline only bounds a test whose
# peers all published (threads, retries), so it is long enough for a loaded CI machine.
FAST = dict(deadline_s=30.0, poll_interval_s=0.02, backoff_s=0.01, backoff_max_s=0.05)


class CountingStorage:
    """Counts reads of each key, to prove objects are downloaded once."""

    def __init__(self, inner):
        self.inner = inner
        self.reads: Counter[str] = Counter()

    def put(self, key, data):
        self.inner.put(key, data)

    def get(self, key):
        self.reads[key] += 1
        return self.inner.get(key)

    def get_range(self, key, start, end):
        self.reads[key] += 1
        return self.inner.get_range(key, start, end)

    def head(self, key):
        return self.inner.head(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def delete(self, key):
        self.inner.delete(key)


def make_net(storage, spec, names, *, wrap=None, **config):
    """Signers, a directory where ``wrap[name]`` (if given) wraps that peer's read storage."""
    wrap = wrap or {}
    signers = {n: Ed25519Signer.from_seed(bytes([i + 1]) * 32) for i, n in enumerate(names)}
    directory = StaticDirectory(
        PeerRecord(n, wrap.get(n, storage), signers[n].public_key) for n in names
    )
    cfg = ExchangeConfig(**{**FAST, **config})
    exchanges = {n: StorageExchange(n, storage, directory, signers[n], spec, cfg) for n in names}
    return signers, directory, exchanges


def test_implements_sparseloco_exchange_protocol(tmp_path, spec):
    _, _, ex = make_net(LocalStorage(tmp_path), spec, ["a", "b"])
    assert isinstance(ex["a"], Exchange)
    assert ex["a"].peer_id == "a"


def test_publish_then_gather_ok_with_exact_payloads(storage, model, spec, kit):
    names = ["p0", "p1", "p2"]
    _, _, ex = make_net(storage, spec, names)
    updates = {n: kit.sparse_update(model, seed=i) for i, n in enumerate(names)}
    sent = {n: ex[n].publish(3, updates[n]) for n in names}
    result = ex["p0"].gather(3)
    assert sorted(result.statuses) == ["p1", "p2"]
    assert {p: s.status for p, s in result.statuses.items()} == {"p1": "ok", "p2": "ok"}
    assert {p: s.nbytes for p, s in result.statuses.items()} == {"p1": sent["p1"], "p2": sent["p2"]}
    for p in ("p1", "p2"):
        assert kit.payload_bytes(result.updates[p]) == kit.payload_bytes(updates[p])
    assert storage.head(update_key("", 3, "p1")).size == sent["p1"]
    # the storage server's own time of each object, from the gather's probe
    for p in ("p1", "p2"):
        assert result.statuses[p].stored_at == storage.head(update_key("", 3, p)).mtime
    assert ex["p0"].gather(4, deadline=0.05).statuses["p1"].stored_at is None


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_gather_reads_each_body_encoding(storage, model, spec, kit, compression):
    _, _, ex = make_net(storage, spec, ["p0", "p1"], compression=compression)
    update = kit.sparse_update(model, seed=5)
    ex["p1"].publish(0, update)
    blob = storage.get(update_key("", 0, "p1"))
    assert read_header(blob, EnvelopeLimits())[0]["compression"] == compression
    result = ex["p0"].gather(0)
    assert result.statuses["p1"].status == "ok"
    assert kit.payload_bytes(result.updates["p1"]) == kit.payload_bytes(update)


def test_missing_peer_returns_at_deadline(tmp_path, model, spec, kit):
    _, _, ex = make_net(LocalStorage(tmp_path), spec, ["a", "b", "ghost"])
    ex["b"].publish(0, kit.sparse_update(model))
    start = time.monotonic()
    result = ex["a"].gather(0, deadline=1.0)  # "b" needs milliseconds of it
    elapsed = time.monotonic() - start
    assert 0.95 <= elapsed < 3.0
    assert result.statuses["b"].status == "ok"
    assert result.statuses["ghost"].status == "missing"
    assert "no object by the deadline" in result.statuses["ghost"].reason
    assert sorted(result.updates) == ["b"]


def test_unknown_peer_is_missing(tmp_path, spec):
    _, _, ex = make_net(LocalStorage(tmp_path), spec, ["a"])
    result = ex["a"].gather(0, peers=["stranger", "a"], deadline=0.2)
    assert list(result.statuses) == ["stranger"]  # itself is left out
    assert result.statuses["stranger"].reason == "not in the peer directory"


def test_late_publisher_is_picked_up_while_polling(tmp_path, model, spec, kit):
    _, _, ex = make_net(LocalStorage(tmp_path), spec, ["a", "b"])
    update = kit.sparse_update(model)
    errors: list[BaseException] = []

    def publish_late() -> None:
        try:
            ex["b"].publish(1, update)
        except BaseException as exc:  # surfaced below: a silent thread failure reads as "missing"
            errors.append(exc)

    timer = threading.Timer(0.3, publish_late)
    timer.start()
    # gather returns as soon as "b" is verified; the long deadline only absorbs a loaded CI.
    result = ex["a"].gather(1, deadline=20.0)
    timer.join()
    assert not errors, errors
    assert result.statuses["b"].status == "ok", result.statuses["b"].reason
    assert kit.payload_bytes(result.updates["b"]) == kit.payload_bytes(update)


def test_cutoff_marks_late(tmp_path, model, spec, kit):
    _, _, ex = make_net(LocalStorage(tmp_path), spec, ["a", "b"])
    ex["b"].publish(1, kit.sparse_update(model))
    result = ex["a"].gather(1, cutoff=time.time() - 60)
    assert result.statuses["b"].status == "late"
    assert result.statuses["b"].nbytes == 0
    assert ex["a"].gather(1, cutoff=time.time() + 60).statuses["b"].status == "ok"


def test_invalid_statuses_name_the_reason(tmp_path, model, spec, kit):
    storage = LocalStorage(tmp_path)
    names = ["a", "forger", "wrongwin", "badmodel", "badshape", "garbage"]
    signers, _, ex = make_net(storage, spec, names)
    update = kit.sparse_update(model)
    mallory = Ed25519Signer.from_seed(b"\x99" * 32)
    forged = seal_envelope(
        update, window=2, publisher="forger", fingerprint=spec.fingerprint, signer=mallory
    )
    storage.put(update_key("", 2, "forger"), forged)
    stale = seal_envelope(
        update,
        window=1,
        publisher="wrongwin",
        fingerprint=spec.fingerprint,
        signer=signers["wrongwin"],
    )
    storage.put(update_key("", 2, "wrongwin"), stale)
    other = torch.nn.Linear(3, 3)
    foreign = seal_envelope(
        kit.sparse_update(other),
        window=2,
        publisher="badmodel",
        fingerprint=ModelSpec.from_module(other).fingerprint,
        signer=signers["badmodel"],
    )
    storage.put(update_key("", 2, "badmodel"), foreign)
    ex["badshape"].publish(2, kit.sparse_update(other))
    storage.put(update_key("", 2, "garbage"), b"not an envelope at all")
    result = ex["a"].gather(2)
    reasons = {p: (s.status, s.reason.split(":")[0]) for p, s in result.statuses.items()}
    assert reasons == {
        "forger": ("invalid", "signature"),
        "wrongwin": ("invalid", "replay"),
        "badmodel": ("invalid", "fingerprint"),
        "badshape": ("invalid", "shape"),
        "garbage": ("invalid", "format"),
    }
    assert result.updates == {}
    # Integrity failures were retried (transit corruption looks the same); others were not.
    assert "after 3 attempts" in result.statuses["forger"].reason
    assert result.statuses["forger"].nbytes == 3 * len(forged)
    assert result.statuses["wrongwin"].nbytes == len(stale)


def test_oversized_object_is_rejected_without_download(tmp_path, model, spec, kit):
    from netcomm import EnvelopeLimits

    counting = CountingStorage(LocalStorage(tmp_path))
    _, _, ex = make_net(
        counting.inner,
        spec,
        ["a", "b"],
        wrap={"b": counting},
        limits=EnvelopeLimits(max_object_bytes=100),
    )
    ex["b"].publish(0, kit.sparse_update(model))
    status = ex["a"].gather(0).statuses["b"]
    assert (status.status, status.reason.split(":")[0]) == ("invalid", "too_large")
    assert counting.reads == Counter()


def test_each_object_is_downloaded_once(tmp_path, model, spec, kit):
    counting = CountingStorage(LocalStorage(tmp_path))
    _, _, ex = make_net(counting.inner, spec, ["a", "b", "c"], wrap={"b": counting, "c": counting})
    ex["b"].publish(4, kit.sparse_update(model, seed=1))
    ex["c"].publish(4, kit.dense_update(model))
    first = ex["a"].gather(4)
    second = ex["a"].gather(4)
    assert [s.status for s in first.statuses.values()] == ["ok", "ok"]
    assert [s.status for s in second.statuses.values()] == ["ok", "ok"]
    assert counting.reads == Counter({update_key("", 4, "b"): 1, update_key("", 4, "c"): 1})
    assert second.bytes_received == 0
    assert kit.payload_bytes(second.updates["b"]) == kit.payload_bytes(first.updates["b"])
    # A replaced object (new etag) is fetched again.
    time.sleep(0.01)
    ex["b"].publish(4, kit.sparse_update(model, seed=2))
    third = ex["a"].gather(4)
    assert counting.reads[update_key("", 4, "b")] == 2
    assert kit.payload_bytes(third.updates["b"]) == kit.payload_bytes(
        kit.sparse_update(model, seed=2)
    )


def test_transient_errors_are_retried(tmp_path, model, spec, kit):
    inner = LocalStorage(tmp_path)
    flaky = FaultyStorage(inner, FaultPlan(server_error=0.3, drop=0.2, truncate=0.1, seed=3))
    names = [f"p{i}" for i in range(6)]
    _, _, ex = make_net(inner, spec, names, wrap={n: flaky for n in names}, attempts=8)
    updates = {n: kit.sparse_update(model, seed=i) for i, n in enumerate(names)}
    for n in names[1:]:
        ex[n].publish(0, updates[n])
    result = ex["p0"].gather(0)
    assert [s.status for s in result.statuses.values()] == ["ok"] * 5
    assert sum(flaky.injected.values()) > 0
    for n in names[1:]:
        assert kit.payload_bytes(result.updates[n]) == kit.payload_bytes(updates[n])


class _DamageFirstRead:
    """Storage whose first ranged read of each object flips a byte of the given offset."""

    def __init__(self, inner, offset: int) -> None:
        self.inner, self.offset, self.damaged = inner, offset, set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_range(self, key, start, end):
        data = self.inner.get_range(key, start, end)
        if key in self.damaged:
            return data
        self.damaged.add(key)
        damaged = bytearray(data)
        damaged[self.offset] ^= 0xFF
        return bytes(damaged)


@pytest.mark.parametrize("offset", [4, 8, 12], ids=["version", "signature-len", "header-len"])
def test_damage_in_transit_before_the_signature_is_retried(tmp_path, model, spec, kit, offset):
    inner = LocalStorage(tmp_path)
    damaging = _DamageFirstRead(inner, offset)
    _, _, ex = make_net(inner, spec, ["a", "b"], wrap={"b": damaging})
    update = kit.sparse_update(model)
    ex["b"].publish(0, update)
    result = ex["a"].gather(0)
    assert result.statuses["b"].status == "ok", result.statuses["b"].reason
    assert damaging.damaged == {update_key("", 0, "b")}
    assert kit.payload_bytes(result.updates["b"]) == kit.payload_bytes(update)


class HoldTracker:
    """Counts objects held by a gather: from the start of a download to the end of its check."""

    def __init__(self, inner, verify_s: float):
        self.inner, self.verify_s = inner, verify_s
        self.lock = threading.Lock()
        self.held = self.most_held = 0
        self.verifying = 0
        self.downloads_during_checks = 0

    def get_range(self, key, start, end):
        with self.lock:
            self.held += 1
            self.most_held = max(self.most_held, self.held)
            self.downloads_during_checks += self.verifying > 0
        return self.inner.get_range(key, start, end)

    def head(self, key):
        return self.inner.head(key)

    def verifier(self, open_envelope):
        def slow_open(*args, **kwargs):
            with self.lock:
                self.verifying += 1
            time.sleep(self.verify_s)
            try:
                return open_envelope(*args, **kwargs)
            finally:
                with self.lock:
                    self.verifying -= 1
                    self.held -= 1

        return slow_open


def test_downloads_overlap_verification_within_the_memory_bound(
    tmp_path, model, spec, kit, monkeypatch
):
    inner = LocalStorage(tmp_path)
    tracker = HoldTracker(inner, verify_s=0.1)
    names = [f"p{i}" for i in range(7)]
    _, _, ex = make_net(
        inner,
        spec,
        names,
        wrap=dict.fromkeys(names, tracker),
        max_concurrency=3,
        verify_threads=1,
    )
    for i, n in enumerate(names[1:]):
        ex[n].publish(0, kit.sparse_update(model, seed=i))
    monkeypatch.setattr("netcomm.exchange.open_envelope", tracker.verifier(open_envelope))
    start = time.monotonic()
    result = ex["p0"].gather(0)
    elapsed = time.monotonic() - start
    assert all(s.status == "ok" for s in result.statuses.values()), result.statuses
    assert tracker.most_held == 3  # max_concurrency: downloading, queued or being verified
    assert tracker.downloads_during_checks >= 2  # later downloads ran while others verified
    assert tracker.held == 0
    assert 6 * 0.1 <= elapsed < 6 * 0.1 + 1.0  # one verify thread: the checks in series


def test_a_reader_bug_in_one_download_costs_only_that_peer(tmp_path, model, spec, kit):
    inner = LocalStorage(tmp_path)

    class Broken(CountingStorage):
        def get_range(self, key, start, end):
            raise RuntimeError("bug in a storage backend")

    _, _, ex = make_net(inner, spec, ["a", "b", "c"], wrap={"c": Broken(inner)})
    ex["b"].publish(0, kit.sparse_update(model, seed=1))
    ex["c"].publish(0, kit.sparse_update(model, seed=2))
    result = ex["a"].gather(0)
    assert result.statuses["b"].status == "ok"
    assert (result.statuses["c"].status, result.statuses["c"].reason) == (
        "invalid",
        "internal: RuntimeError: bug in a storage backend",
    )


def test_slow_peer_times_out_and_others_arrive(tmp_path, model, spec, kit):
    inner = LocalStorage(tmp_path)
    slow = FaultyStorage(inner, FaultPlan(slow=1.0, delay_s=4.0, only="/slow.nce"))
    _, _, ex = make_net(inner, spec, ["a", "b", "slow"], wrap={"slow": slow})
    ex["b"].publish(0, kit.sparse_update(model))
    ex["slow"].publish(0, kit.sparse_update(model))
    start = time.monotonic()
    result = ex["a"].gather(0, deadline=1.0)
    assert time.monotonic() - start < 2.5  # the deadline ends it, not the slow peer's 4 s
    assert result.statuses["b"].status == "ok"
    assert result.statuses["slow"].status in ("timeout", "missing")
    # The head of a slow peer also stalls; whichever phase it is in, nothing is accepted.
    assert "slow" not in result.updates


def test_min_peers(tmp_path, model, spec, kit):
    _, _, ex = make_net(LocalStorage(tmp_path), spec, ["a", "b", "c"])
    ex["b"].publish(0, kit.sparse_update(model))
    with pytest.raises(NotEnoughPeersError) as info:
        ex["a"].gather(0, deadline=1.0, min_peers=2)
    assert info.value.result.statuses["b"].status == "ok"
    assert info.value.result.statuses["c"].status == "missing"
    assert len(ex["a"].gather(0, deadline=1.0, min_peers=1).updates) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("deadline_s", 0),
        ("attempts", 0),
        ("max_concurrency", 0),
        ("verify_threads", 0),
        ("min_peers", -1),
        ("compression_level", 30),
        ("compression", "lz4"),
        ("min_compression_saving", 1.0),
        ("poll_interval_s", float("nan")),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(NetcommConfigError, match=field):
        ExchangeConfig(**{field: value})


def _train_round(exchanges, models, window_steps=2):
    """Run SparseLoCo rounds on every peer concurrently; returns each peer's reports."""
    opts = {
        n: sparseloco.SparseLoCo(models[n].named_parameters(), ex) for n, ex in exchanges.items()
    }
    reports = {n: [] for n in exchanges}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        gen = torch.Generator().manual_seed(sorted(exchanges).index(name))
        try:
            for _ in range(window_steps):
                with torch.no_grad():
                    for p in models[name].parameters():
                        p.add_(torch.randn(p.shape, generator=gen) * 0.01)
                reports[name].append(opts[name].step())
        except BaseException as exc:  # surfaced below, not lost with the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in exchanges]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return reports


def test_sparseloco_over_storage_matches_in_process_hub(storage, kit):
    names = ["p0", "p1", "p2"]
    base = kit.tiny_model(0)
    spec = ModelSpec.from_module(base)

    def fresh():
        models = {n: kit.tiny_model(0) for n in names}
        return models

    net_models = fresh()
    _, _, ex = make_net(storage, spec, names, codec=kit.codec)
    reports = _train_round(ex, net_models)
    hub = sparseloco.InProcessHub(timeout=10)
    hub_models = fresh()
    _train_round({n: hub.connect(n) for n in names}, hub_models)
    for n in names:
        assert [r.peers for r in reports[n]] == [names, names]
        assert all(s.status == "ok" for r in reports[n] for s in r.statuses.values())
        for a, b in zip(net_models[n].parameters(), hub_models[n].parameters(), strict=True):
            assert torch.equal(a, b)
    for a, b in zip(net_models["p0"].parameters(), net_models["p2"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_optimizer_does_not_validate_again_what_the_exchange_validated(
    tmp_path, kit, monkeypatch
):
    names = ["p0", "p1"]
    spec = ModelSpec.from_module(kit.tiny_model(0))
    _, _, ex = make_net(LocalStorage(tmp_path), spec, names, codec=kit.codec)
    calls = Counter()
    validate = sparseloco.optim.validate_payload

    def counted(payload):
        calls[payload.kind] += 1
        validate(payload)

    monkeypatch.setattr(sparseloco.optim, "validate_payload", counted)
    reports = _train_round(ex, {n: kit.tiny_model(0) for n in names}, window_steps=1)
    assert [r.peers for r in reports["p0"]] == [names]
    assert ex["p0"].gather(0).contents_validated  # open_envelope read every byte once
    assert not calls
    # an exchange that does not say so has its payloads validated by the optimizer
    hub = sparseloco.InProcessHub(timeout=10, validate=False)
    models = {n: kit.tiny_model(0) for n in names}
    _train_round({n: hub.connect(n) for n in names}, models, window_steps=1)
    assert calls == {"sparse": 2}


def test_receive_caps_follow_the_model():
    from netcomm import EnvelopeLimits, ModelSpec

    spec = ModelSpec.from_named_tensors({"w": torch.zeros(100, 10), "b": torch.zeros(10)})
    limits = EnvelopeLimits.for_model(spec)
    assert limits.max_decompressed_bytes == 4 * 1010 + 4096 * 3
    assert limits.max_tensors == 16
    tight = EnvelopeLimits(max_object_bytes=1000).tighten(limits)
    assert tight.max_object_bytes == 1000
    assert tight.max_decompressed_bytes == limits.max_decompressed_bytes


def test_exchange_rejects_a_peer_id_with_a_slash(tmp_path):
    from netcomm import (
        Ed25519Signer,
        LocalStorage,
        ModelSpec,
        NetcommConfigError,
        StaticDirectory,
        StorageExchange,
    )

    spec = ModelSpec.from_named_tensors({"w": torch.zeros(2)})
    with pytest.raises(NetcommConfigError, match="must not contain '/'"):
        StorageExchange(
            "/etc", LocalStorage(tmp_path), StaticDirectory(), Ed25519Signer.generate(), spec
        )
