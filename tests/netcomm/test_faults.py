"""Real HTTP faults between the S3 client and the loopback server, through FaultProxy."""

from __future__ import annotations

import time

import pytest

from netcomm import (
    Ed25519Signer,
    ExchangeConfig,
    FaultPlan,
    FaultProxy,
    NetcommConfigError,
    PeerRecord,
    StaticDirectory,
    StorageExchange,
    TransientStorageError,
)

FAST = dict(poll_interval_s=0.05, backoff_s=0.01, backoff_max_s=0.05, attempts=6)


def build(s3_factory, spec, names, proxied, plan, *, read_timeout_s=10.0, **config):
    """Peers publish straight to the server; the gatherer reads ``proxied`` peers via the proxy.

    The proxy rolls its dice once per request, so a client timeout (a retry) on a loaded
    machine would add a roll: the read timeout stays far above a loopback round trip.
    """
    direct = s3_factory()
    proxy = FaultProxy(direct.config.endpoint_url, plan).start()
    through = s3_factory(endpoint=proxy.url, read_timeout_s=read_timeout_s, max_attempts=2)
    signers = {n: Ed25519Signer.from_seed(bytes([i + 7]) * 32) for i, n in enumerate(names)}
    directory = StaticDirectory(
        PeerRecord(n, through if n in proxied else direct, signers[n].public_key) for n in names
    )
    cfg = ExchangeConfig(**{**FAST, **config})
    ex = {n: StorageExchange(n, direct, directory, signers[n], spec, cfg) for n in names}
    return proxy, ex


def test_random_fault_mix_never_accepts_corruption(s3_factory, model, spec, kit):
    names = [f"p{i}" for i in range(7)]
    plan = FaultPlan(
        drop=0.1,
        server_error=0.1,
        truncate=0.1,
        corrupt=0.15,
        seed=11,
        methods=frozenset({"GET", "HEAD"}),
    )
    proxy, ex = build(s3_factory, spec, names, set(names), plan, deadline_s=20.0)
    updates = {n: kit.sparse_update(model, seed=i) for i, n in enumerate(names)}
    for n in names[1:]:
        ex[n].publish(5, updates[n])
    start = time.monotonic()
    result = ex["p0"].gather(5)
    assert time.monotonic() - start < 20.5
    proxy.stop()
    assert sum(proxy.injected.values()) >= 3
    assert set(result.statuses) == set(names[1:])
    for peer, status in result.statuses.items():
        assert status.status in ("ok", "invalid", "timeout"), status
        if status.status == "ok":
            assert kit.payload_bytes(result.updates[peer]) == kit.payload_bytes(updates[peer])
    # With 6 attempts per object and ~45 % faulty requests, most peers get through.
    assert sum(s.status == "ok" for s in result.statuses.values()) >= 4


def test_always_corrupted_peer_is_invalid_others_ok(s3_factory, model, spec, kit):
    names = ["a", "b", "c"]
    plan = FaultPlan(corrupt=1.0, only="/c.nce")
    proxy, ex = build(s3_factory, spec, names, {"b", "c"}, plan, attempts=3)
    ex["b"].publish(0, kit.sparse_update(model, seed=1))
    ex["c"].publish(0, kit.sparse_update(model, seed=2))
    result = ex["a"].gather(0, deadline=10.0)
    proxy.stop()
    assert result.statuses["b"].status == "ok"
    c = result.statuses["c"]
    assert c.status == "invalid"
    assert c.reason.split(":")[0] in ("checksum", "signature", "format", "decompress")
    assert "after 3 attempts" in c.reason
    assert proxy.injected["corrupt"] == 3
    assert list(result.updates) == ["b"]


def test_truncated_bodies_are_retried_by_the_s3_client(s3_factory, model, spec, kit):
    names = ["a", "b"]
    plan = FaultPlan(truncate=0.5, seed=2)
    proxy, ex = build(s3_factory, spec, names, {"b"}, plan, attempts=10)
    update = kit.sparse_update(model)
    ex["b"].publish(0, update)
    result = ex["a"].gather(0, deadline=10.0)
    proxy.stop()
    assert result.statuses["b"].status == "ok"
    assert kit.payload_bytes(result.updates["b"]) == kit.payload_bytes(update)


def test_server_errors_exhaust_storage_retries(s3_factory):
    direct = s3_factory()
    direct.put("k", b"payload")
    with FaultProxy(direct.config.endpoint_url, FaultPlan(server_error=1.0)) as proxy:
        through = s3_factory(endpoint=proxy.url, max_attempts=3)
        with pytest.raises(TransientStorageError, match="503"):
            through.get("k")
    assert proxy.injected["server_error"] == 3


def test_slow_responses_hit_the_deadline(s3_factory, model, spec, kit):
    names = ["a", "b", "slow"]
    plan = FaultPlan(slow=1.0, delay_s=4.0, only="/slow.nce", methods=frozenset({"GET"}))
    # a short read timeout ends the abandoned download soon after the test
    proxy, ex = build(s3_factory, spec, names, {"slow"}, plan, read_timeout_s=1.0)
    ex["b"].publish(0, kit.sparse_update(model))
    ex["slow"].publish(0, kit.sparse_update(model))
    start = time.monotonic()
    result = ex["a"].gather(0, deadline=1.0)
    elapsed = time.monotonic() - start
    proxy.stop()
    assert elapsed < 2.5  # the deadline, not the slow peer's 4 s, ends the gather
    assert result.statuses["b"].status == "ok"
    assert result.statuses["slow"].status == "timeout"
    assert "slow" not in result.updates


def test_dropped_connections_recover(s3_factory):
    direct = s3_factory()
    direct.put("k", b"x" * 1000)
    with FaultProxy(direct.config.endpoint_url, FaultPlan(drop=0.5, seed=5)) as proxy:
        through = s3_factory(endpoint=proxy.url, max_attempts=12)
        assert all(through.get("k") == b"x" * 1000 for _ in range(6))
    assert proxy.injected["drop"] >= 1


def test_fault_plan_and_proxy_validation():
    with pytest.raises(NetcommConfigError, match="sum to at most 1"):
        FaultPlan(drop=0.6, corrupt=0.6)
    with pytest.raises(NetcommConfigError, match="loopback"):
        FaultProxy("http://example.com:80", FaultPlan())
