"""Two miners and a validator over a loopback S3 server and the in-memory chain.

Each node has its own bucket, announced through a chain commitment with read-only keys.
The test advances the chain one window at a time once every live miner has published, so
the run is deterministic. Mid-run:

* miner A stops after window 1 and restarts at once from its checkpoint (no window missed);
* the validator stops after window 2 and restarts from its bucket checkpoint;
* miner B stops after window 3, misses window 4 and restarts in window 5, replaying 4;
* at the end a new miner C starts from the validator's model checkpoint.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import pytest
import torch

from gauntlet import InMemorySubnet
from netcomm import CheckpointError, ObjectNotFoundError, S3Config, S3Storage, update_key
from subnet import (
    Miner,
    MinerSettings,
    Secret,
    StorageConfig,
    Validator,
    decode_commitment,
    gpt_task,
    open_chain,
)

WINDOWS = 6
TIMEOUT_S = 60


def _state(miner: Miner) -> dict[str, object]:
    return {
        "model": {k: v.clone() for k, v in miner.model.state_dict().items()},
        "inner": miner.inner.state_dict(),
        "outer": miner.outer.state_dict(),
    }


def _assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class Driver:
    """Runs nodes as threads and moves the chain window by window."""

    def __init__(self, subnet: InMemorySubnet, blocks_per_window: int) -> None:
        self.subnet = subnet
        self.bpw = blocks_per_window
        self.threads: dict[str, threading.Thread] = {}
        self.errors: list[BaseException] = []
        self.nodes: list[Miner | Validator] = []

    def start(self, node: Miner | Validator, until: int) -> None:
        def work() -> None:
            try:
                node.run(until_window=until)
            except BaseException as exc:
                self.errors.append(exc)

        self.nodes.append(node)
        self.threads[node.hotkey] = threading.Thread(target=work, daemon=True)
        self.threads[node.hotkey].start()

    def join(self, hotkey: str) -> None:
        self.threads[hotkey].join(TIMEOUT_S)
        assert not self.threads[hotkey].is_alive(), f"{hotkey} did not finish"
        self._check()

    def wait(self, what: str, predicate) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not predicate():
            self._check()
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.01)

    def _check(self) -> None:
        if self.errors:
            self.stop()
            raise self.errors[0]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop.set()

    def set_window(self, window: int) -> None:
        self.subnet.block = window * self.bpw


def _published(miner: Miner, window: int) -> bool:
    try:
        miner.storage.head(update_key("", window, miner.hotkey))
    except ObjectNotFoundError:
        return False
    return True


@pytest.fixture
def network(tmp_path, moto_url, kit, one_thread):
    # The loopback S3 server outlives a test: fresh buckets keep tests from resuming each
    # other's checkpoints.
    run = uuid.uuid4().hex[:8]
    buckets = {
        "miner-a": f"bucket-a-{run}",
        "miner-b": f"bucket-b-{run}",
        "miner-c": f"bucket-c-{run}",
        "val": f"bucket-v-{run}",
    }
    configs = {}
    for hotkey, bucket in buckets.items():
        S3Storage(
            S3Config(
                bucket=bucket,
                endpoint_url=moto_url,
                access_key_id="testing",
                secret_access_key="testing",
            )
        ).create_bucket()
        storage = StorageConfig(
            kind="s3",
            bucket=bucket,
            endpoint_url=moto_url,
            access_key_id="writer",
            secret_access_key=Secret("writer-secret"),
            read_access_key_id="reader",
            read_secret_access_key=Secret("reader-secret"),
        )
        role = "validator" if hotkey == "val" else "miner"
        configs[hotkey] = kit.node_config(role, hotkey, tmp_path / hotkey, storage)
    subnet = InMemorySubnet(netuid=1)
    task = gpt_task(kit.run)

    def make(hotkey: str, miner: MinerSettings | None = None, **sections: object):
        cfg = configs[hotkey].replace(**sections)
        cfg = cfg if miner is None else cfg.replace(miner=miner)
        cls = Validator if cfg.role == "validator" else Miner
        return cls(cfg, task, open_chain(cfg, subnet), s3_options=kit.s3_options)

    return subnet, make


def test_run_with_restarts_keeps_every_model_equal(network):
    subnet, make = network
    driver = Driver(subnet, 10)
    driver.set_window(0)
    val, a, b = make("val"), make("miner-a"), make("miner-b")
    driver.start(val, until=2)
    driver.start(a, until=1)
    driver.start(b, until=3)
    live = {"miner-a": a, "miner-b": b}
    retired: list[Miner] = []
    first_val_history: list[dict] = []

    for w in range(WINDOWS):
        driver.wait(
            f"updates of window {w}", lambda w=w: all(_published(m, w) for m in live.values())
        )
        driver.set_window(w + 1)
        driver.wait(f"validator on window {w}", lambda w=w, v=val: (v.next_window or 0) > w)
        if w == 1:  # miner A restarts from its checkpoint before window 2 is trained
            driver.join("miner-a")
            retired.append(a)
            before = _state(a)
            a = live["miner-a"] = make("miner-a")
            assert a.next_window == 2
            _assert_same(before, _state(a), "miner-a")
            driver.start(a, until=WINDOWS - 1)
        if w == 2:  # the validator restarts from the checkpoint in its bucket
            driver.join("val")
            first_val_history = val.history
            board, model = val.scoreboard.state_dict(), val.model.state_dict()
            val = make("val")
            assert val.next_window == 3
            assert val.scoreboard.state_dict() == board
            _assert_same(model, val.model.state_dict(), "validator model")
            driver.start(val, until=WINDOWS - 1)
        if w == 3:  # miner B goes down and misses window 4
            driver.join("miner-b")
            retired.append(live.pop("miner-b"))
        if w == 4:  # ... and comes back in window 5
            b = live["miner-b"] = make("miner-b")
            assert b.next_window == 4
            driver.start(b, until=WINDOWS - 1)
    for hotkey in ("val", "miner-a", "miner-b"):
        driver.join(hotkey)

    # Every model took the same outer steps: the restarted miners equal the validator, bit
    # for bit, and each other.
    reference = dict(val.model.named_parameters())
    for miner in (a, b):
        for name, p in miner.model.named_parameters():
            assert torch.equal(p, reference[name]), (miner.hotkey, name)

    # A new miner without a checkpoint joins from the validator's latest model checkpoint.
    c = make("miner-c")
    assert c.next_window == WINDOWS
    for name, p in c.model.named_parameters():
        assert torch.equal(p, reference[name]), name

    # Every miner aggregated exactly the set the validator accepted, in every window it trained.
    accepted = {r["window"]: r["accepted"] for r in first_val_history + val.history}
    assert sorted(accepted) == list(range(WINDOWS))
    trained = [r for m in (*retired, a, b) for r in m.history if "train_loss" in r]
    assert len(trained) == 2 * WINDOWS - 1  # B missed window 4
    for record in trained:
        assert record["aggregated"] == accepted[record["window"]], record

    # B replayed window 4 from A's update (the validator's accepted set), then trained 5.
    assert b.history[0] == {"window": 4, "replayed": True, "aggregated": ["miner-a"]}
    assert b.history[1]["window"] == 5 and b.history[1]["aggregated"] == ["miner-a", "miner-b"]

    # The validator scored every window; B was missing only in window 4.
    statuses = {r["window"]: r["statuses"] for r in val.history}
    assert sorted(statuses) == [3, 4, 5]  # the restarted validator's windows
    assert statuses[4] == {"miner-a": "evaluated", "miner-b": "missing"}
    assert statuses[3] == statuses[5] == {"miner-a": "evaluated", "miner-b": "evaluated"}
    assert val.history[-1]["heldout_loss"] < val.history[0]["heldout_loss"]

    # Weights went on chain every second window, for registered miner uids only.
    block, weights = subnet.weights["val"]
    assert block == 6 * 10
    uids = subnet.metagraph().hotkey_to_uid()
    assert set(weights) <= {uids["miner-a"], uids["miner-b"]} and weights

    # Commitments point readers at each node's own bucket with its read-only keys.
    for node in (a, b, val):
        loc = decode_commitment(subnet.commitments[node.hotkey][1])
        assert (loc.bucket, loc.read_access_key_id) == (node.cfg.storage.bucket, "reader")
        assert loc.read_secret_access_key == Secret("reader-secret")
        assert loc.role == ("validator" if node is val else "miner")


def test_a_miner_out_of_sync_knows_it_and_resyncs(network):
    """B's model drifts after window 1 and B loses A's update in window 2: each time B says
    so in its history and re-syncs from the validator's checkpoint; the validator publishes
    every verified update (``aggregate = "valid"``) and every node steps on that set."""
    subnet, make = network
    driver = Driver(subnet, 10)
    driver.set_window(0)
    val, a, b = make("val"), make("miner-a"), make("miner-b")
    val.cfg = val.cfg.replace(validator=dataclasses.replace(val.cfg.validator, aggregate="valid"))
    step, gather = b.outer.step, b.exchange.gather

    def drifting_step():
        report = step()
        if report.window == 1:
            with torch.no_grad():
                next(b.model.parameters()).add_(1e-3)
        return report

    def lossy_gather(window, peers=None, **kw):
        if window == 2:
            peers = [p for p in peers if p != "miner-a"]
        return gather(window, peers=peers, **kw)

    b.outer.step = drifting_step
    b.exchange.gather = lossy_gather
    for node in (val, a, b):
        driver.start(node, until=3)
    for w in range(4):
        driver.wait(f"updates of {w}", lambda w=w: _published(a, w) and _published(b, w))
        driver.set_window(w + 1)
        driver.wait(f"validator on window {w}", lambda w=w: (val.next_window or 0) > w)
    for hotkey in ("val", "miner-a", "miner-b"):
        driver.join(hotkey)

    problems = {r["window"]: r["out_of_sync"] for r in b.history}
    assert problems == {
        0: None,
        1: "its model differs from the validator's",
        2: "could not use the update(s) of miner-a",
        3: None,
    }
    assert all(r["out_of_sync"] is None for r in a.history)
    chosen = {r["window"]: r["aggregated"] for r in val.history}
    assert all(chosen[w] == ["miner-a", "miner-b"] for w in range(4))
    assert [r["aggregated"] for r in a.history] == [chosen[w] for w in range(4)]
    reference = dict(val.model.named_parameters())
    for miner in (a, b):
        for name, p in miner.model.named_parameters():
            assert torch.equal(p, reference[name]), (miner.hotkey, name)


@pytest.mark.parametrize("wait", [True, False], ids=["b waits", "b applies when arrived"])
def test_overlapped_miners_restart_catch_up_and_end_on_the_validators_model(network, wait):
    """Miners with ``miner.overlap``: A applies each aggregate at the next window's end, B
    one inner step into it (waiting there for it, or from there on once it has arrived:
    ``miner.apply_wait``). A is stopped right after its window-1 boundary (its checkpoint
    holds window 1's round in flight) and restarts; B stops after window 2, misses window 3
    and comes back in window 4 (replaying 3). Every node ends on the validator's model and
    no miner is ever out of sync."""
    subnet, make = network
    at_end = MinerSettings(overlap=True)
    early = MinerSettings(overlap=True, apply_after=1, apply_wait=wait)
    driver = Driver(subnet, 10)
    driver.set_window(0)
    val, a, b = make("val"), make("miner-a", at_end), make("miner-b", early)
    driver.start(val, until=WINDOWS - 1)
    driver.start(a, until=WINDOWS - 1)
    driver.start(b, until=2)
    live = {"miner-a": a, "miner-b": b}
    miners = [a, b]
    for w in range(WINDOWS):
        driver.wait(
            f"updates of window {w}", lambda w=w: all(_published(m, w) for m in live.values())
        )
        if w == 1:  # A waits for window 2 with window 1's round still in flight
            a.stop.set()
            driver.join("miner-a")
            a = live["miner-a"] = make("miner-a", at_end)
            assert (a.next_window, a.outer.in_flight) == (2, 1)
            miners.append(a)
            driver.start(a, until=WINDOWS - 1)
        driver.set_window(w + 1)
        driver.wait(f"validator on window {w}", lambda w=w, v=val: (v.next_window or 0) > w)
        if w == 2:  # B applied window 2's aggregate and stopped
            driver.join("miner-b")
            del live["miner-b"]
        if w == 3:  # window 4 has started: B is back
            b = live["miner-b"] = make("miner-b", early)
            assert (b.next_window, b.outer.in_flight) == (3, None)
            miners.append(b)
            driver.start(b, until=WINDOWS - 1)
    for hotkey in ("val", "miner-a", "miner-b"):
        driver.join(hotkey)

    reference = dict(val.model.named_parameters())
    for miner in (a, b):
        assert miner.outer.in_flight is None  # the run ends on the last aggregate
        for name, p in miner.model.named_parameters():
            assert torch.equal(p, reference[name]), (miner.hotkey, name)
    accepted = {r["window"]: r["accepted"] for r in val.history}
    records = [r for m in miners for r in m.history]
    assert all(r.get("out_of_sync") is None for r in records), records
    applied = [r for r in records if r.get("applied_window") is not None]
    for record in applied:  # each applied window's set is the one the validator accepted
        assert record["aggregated"] == accepted[record["applied_window"]], record
    assert {r["applied_window"] for r in applied if "train_loss" in r} == set(range(WINDOWS - 1))
    assert a.history[0]["window"] == 2 and a.history[0]["applied_window"] == 1
    assert b.history[0] == {"window": 3, "replayed": True, "aggregated": ["miner-a"]}


def test_a_miner_starting_late_from_the_initial_weights_replays_window_0(network):
    """B is built during window 0, before the validator has any checkpoint, and starts only
    after window 0 closed: it replays window 0 from the run's initial weights instead of
    training window 1 on a stale model."""
    subnet, make = network
    driver = Driver(subnet, 10)
    driver.set_window(0)
    val, a = make("val"), make("miner-a")
    b = make("miner-b")
    assert b.next_window == 0
    driver.start(val, until=2)
    driver.start(a, until=2)
    for w in range(3):
        waiting = (a,) if w == 0 else (a, b)
        driver.wait(f"updates of {w}", lambda w=w, ms=waiting: all(_published(m, w) for m in ms))
        driver.set_window(w + 1)
        driver.wait(f"validator on window {w}", lambda w=w: (val.next_window or 0) > w)
        if w == 0:
            driver.start(b, until=2)
    for hotkey in ("val", "miner-a", "miner-b"):
        driver.join(hotkey)
    assert b.history[0] == {"window": 0, "replayed": True, "aggregated": ["miner-a"]}
    assert all(r.get("out_of_sync") is None for r in b.history), b.history
    reference = dict(val.model.named_parameters())
    for name, p in b.model.named_parameters():
        assert torch.equal(p, reference[name]), name


def test_a_validator_reads_a_damaged_checkpoint_pointer_again(network, monkeypatch):
    _, make = network
    val = make("val")
    val.checkpoints.save(
        3, val.model.state_dict(), meta={"window": 3, "scoreboard": val.scoreboard.state_dict()}
    )
    real, damaged = S3Storage.get, []

    def flaky(self, key):
        if key.endswith("checkpoints/latest.json") and len(damaged) < 2:
            damaged.append(key)
            return b"{not json"
        return real(self, key)

    monkeypatch.setattr(S3Storage, "get", flaky)
    assert make("val").next_window == 3 and len(damaged) == 2
    damaged.clear()
    monkeypatch.setattr("subnet.validator.RESUME_ATTEMPTS", 2)
    with pytest.raises(CheckpointError, match="latest pointer"):
        make("val")


def test_overlapped_miners_count_the_set_timeout_from_the_window_close(network, kit):
    """The aggregation set of window w exists only after w closes; an overlapped miner's
    background round starts waiting at its boundary, long before. A 1 s timeout and windows
    that close 2 s after every update is out must still leave every miner in sync."""
    _, make = network
    driver = Driver(network[0], 10)
    driver.set_window(0)
    quick = dataclasses.replace(kit.exchange, selection_timeout_s=1.0)
    val, a = make("val"), make("miner-a", MinerSettings(overlap=True), exchange=quick)
    driver.start(val, until=2)
    driver.start(a, until=2)
    for w in range(3):
        driver.wait(f"update of {w}", lambda w=w: _published(a, w))
        time.sleep(2.0)
        driver.set_window(w + 1)
        driver.wait(f"validator on window {w}", lambda w=w: (val.next_window or 0) > w)
    driver.join("val")
    driver.join("miner-a")
    assert all(r.get("out_of_sync") is None for r in a.history), a.history


def test_a_stopped_overlapped_miner_returns_while_it_waits_for_an_aggregate(network):
    """Stopping a miner whose aggregate never comes (no validator) ends its run quietly,
    also while it waits for that aggregate at its ``apply_after`` step."""
    _, make = network
    driver = Driver(network[0], 10)
    driver.set_window(0)
    a = make("miner-a", MinerSettings(overlap=True, apply_after=1))
    driver.start(a, until=5)
    driver.wait("update of 0", lambda: _published(a, 0))
    driver.set_window(1)  # a trains window 1 and waits for window 0's set at step 1
    time.sleep(1.0)
    a.stop.set()
    driver.join("miner-a")  # raises the thread's error, if any
