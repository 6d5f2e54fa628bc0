"""The real roles SIGKILLed at chosen points and restarted: a small ``reliability.py`` faults run.

Every node is its own ``sparseloco miner|validator`` process on a local SQLite chain whose
clock does not wait for anyone (``benchmarks/reliability_faults.py``). The harness reads the
nodes' positions from their storage and checkpoints and their recovery from their
``history.jsonl``; these tests check both that machinery (quick) and what the roles do when
killed (slow).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from netcomm import CheckpointStore, LocalStorage, StorageError, update_key
from subnet.protocol import PROOFS, UPDATES
from subnet.sim import SimConfig
from subnet.sim.launch import START_BLOCK
from subnet.sim.plan import node_specs
from subnet.storage import open_own_storage

WINDOW_S = 5.0


class _Clock:
    """Stands in for the chain: only the block number is read."""

    def __init__(self) -> None:
        self.window = -1

    def block(self) -> int:
        return START_BLOCK + self.window * 4 if self.window >= 0 else 0


def test_positions_come_from_storage_checkpoints_and_the_chain(tmp_path, faultlib):
    specs = {s.hotkey: s for s in node_specs(SimConfig(peers=1, windows=3, out=tmp_path))}
    clock = _Clock()
    miner = faultlib.Observer(specs["peer-0"], clock)
    validator = faultlib.Observer(specs["validator"], clock)
    own = open_own_storage(specs["peer-0"].config.storage, "peer-0")
    assert miner.position() == (-1, "done") and validator.position() == (-1, "done")
    own.put(update_key(PROOFS, 0, "peer-0"), b"proof")
    assert miner.position() == (0, "train") and not miner.reached(0, "published")
    own.put(update_key(UPDATES, 0, "peer-0"), b"update")
    assert miner.position() == (0, "published") and miner.reached(0, "train")
    mine = CheckpointStore(LocalStorage(tmp_path / "nodes" / "peer-0"), "checkpoints")
    mine.save(1, {"w": torch.zeros(1)})
    assert miner.position() == (0, "published")  # done once the window is logged too
    _log(tmp_path, "peer-0", {"window": 0, "train_loss": 3.0})
    assert miner.position() == (0, "done") and not miner.reached(1, "train")
    clock.window = 1  # window 0 closed: the validator is scoring it
    assert validator.position() == (0, "scoring")
    CheckpointStore(validator.storage, "checkpoints").save(1, {"w": torch.zeros(1)})
    clock.window = 0
    assert validator.position() == (0, "scoring")
    _log(tmp_path, "validator", {"window": 0, "statuses": {}})
    assert validator.position() == (0, "done") and not validator.reached(1, "scoring")
    assert miner.recovered({"window": 2, "train_loss": 3.0, "out_of_sync": None})
    assert not miner.recovered({"window": 2, "replayed": True, "aggregated": []})
    assert not miner.recovered({"window": 2, "train_loss": 3.0, "out_of_sync": "differs"})
    assert validator.recovered({"window": 2, "statuses": {}})
    assert not validator.recovered({"event": "start", "next_window": 2})


def test_nodes_store_through_the_fault_proxy_and_the_supervisor_reads_past_it(tmp_path, faultlib):
    sc = faultlib.FaultScenario("s3", peers=1, windows=2, storage_faults=1.0)
    with faultlib.loopback_s3(faultlib.FaultPlan(drop=1.0, methods=_EVERY)) as s3:
        specs = {s.hotkey: s for s in node_specs(faultlib.sim_config(sc, tmp_path, s3))}
        cfg = specs["peer-0"].config.storage
        assert cfg.kind == "s3" and cfg.endpoint_url == s3.proxy.url
        through_proxy = open_own_storage(cfg, "peer-0", {"max_attempts": 1})
        with pytest.raises(StorageError):
            through_proxy.put(update_key(PROOFS, 0, "peer-0"), b"proof")
        miner = faultlib.Observer(specs["peer-0"], _Clock(), s3)
        miner.storage.put(update_key(PROOFS, 0, "peer-0"), b"proof")
        assert miner.position() == (0, "train")
        assert s3.proxy.injected["drop"] == 1


_EVERY = frozenset({"GET", "HEAD", "PUT"})


def _log(out, node, event):
    (out / "nodes" / node).mkdir(parents=True, exist_ok=True)
    with (out / "nodes" / node / "history.jsonl").open("a") as f:
        f.write(json.dumps(event) + "\n")


def test_kill_plan_is_seeded_and_within_the_run(tmp_path, faultlib):
    sc = faultlib.FaultScenario("x", peers=3, windows=6, kills=8, seed=4)
    specs = node_specs(SimConfig(peers=3, windows=6, out=tmp_path))
    plan = faultlib.kill_plan(sc, specs)
    assert plan == faultlib.kill_plan(sc, specs) and len(plan) == 8
    # scenarios that differ in downtime or storage faults kill at the same points
    other = dataclasses.replace(sc, name="z", storage_faults=0.2)
    assert faultlib.kill_plan(other, specs) == plan
    assert [k.window for k in plan] == sorted(k.window for k in plan)
    roles = {s.hotkey: s.config.role for s in specs}
    for k in plan:
        assert 0 <= k.window < 4 and 0 <= k.delay_s <= 0.3  # a window left to recover in
        assert k.phase in faultlib.PHASES[roles[k.node]]
    chosen = (faultlib.KillPoint("peer-0", 1, "train"),)
    assert faultlib.kill_plan(faultlib.FaultScenario("y", points=chosen), specs) == list(chosen)


def _history(out, node):
    lines = (out / "nodes" / node / "history.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, faultlib):
    """A miner killed while training and the validator killed between windows, both
    restarted at once; a miner killed after publishing (before its checkpoint) and restarted
    once that window has closed, so it must replay it."""
    points = (
        faultlib.KillPoint("peer-0", 1, "published", down_s=WINDOW_S),
        faultlib.KillPoint("peer-1", 1, "train"),
        faultlib.KillPoint("validator", 1, "done"),
    )
    sc = faultlib.FaultScenario("kill", peers=2, windows=4, window_s=WINDOW_S, points=points)
    out = tmp_path_factory.mktemp("killed")
    return out, faultlib.run_scenario(sc, out)


@pytest.mark.slow
def test_every_killed_node_recovers_and_ends_on_the_validators_model(killed_run):
    _, run = killed_run
    assert run["kills"] == 3 and not run["kills_skipped"], run["kills_skipped"]
    assert run["kills_recovered"] == 3, run["kill_points"]
    assert run["unexpected_exits"] == []
    landed = {p["node"]: p for p in run["kill_points"]}
    assert landed["peer-0"]["phase"] == "published" and landed["peer-1"]["phase"] == "train"
    # every node ends on one model, the one the validator published with its last set
    assert run["all_models_equal"], run["final"]
    assert run["validator_model_is_published_state"]
    assert run["chain"]["committed"] and run["chain"]["weights_set_windows"] >= 1


@pytest.mark.slow
def test_a_miner_killed_after_publishing_replays_its_own_update(killed_run):
    out, run = killed_run
    killed = next(p for p in run["kill_points"] if p["node"] == "peer-0")
    assert killed["update_aggregated"]  # its update was out when it died: the swarm used it
    replay = [e for e in _history(out, "peer-0") if e.get("replayed")]
    assert replay and replay[0]["window"] == killed["window"]
    assert "peer-0" in replay[0]["aggregated"]


@pytest.mark.slow
def test_replays_are_in_sync(killed_run):
    _, run = killed_run
    assert run["replays"] >= 1 and run["replays_in_sync"] == run["replays"], run["out_of_sync"]
    assert run["out_of_sync"] == [] and run["resyncs_failed"] == 0


@pytest.mark.slow
def test_a_validator_down_past_its_window_does_not_crash_the_miners(tmp_path, faultlib):
    points = (faultlib.KillPoint("validator", 1, "scoring", down_s=1.5 * WINDOW_S),)
    sc = faultlib.FaultScenario("outage", peers=2, windows=5, window_s=WINDOW_S, points=points)
    run = faultlib.run_scenario(sc, tmp_path)
    assert run["kills"] == 1 and run["kill_points"][0]["windows_lost"] >= 1  # it skipped
    assert run["unexpected_exits"] == [], run["unexpected_exits"]
    assert run["all_models_equal"], run["final"]


@pytest.mark.slow
def test_a_miner_down_for_two_windows_replays_both_in_sync(tmp_path, faultlib):
    points = (faultlib.KillPoint("peer-0", 1, "published", down_s=2 * WINDOW_S),)
    sc = faultlib.FaultScenario("replay", peers=2, windows=5, window_s=WINDOW_S, points=points)
    run = faultlib.run_scenario(sc, tmp_path)
    assert run["kills"] == 1 and run["kill_points"][0]["windows_lost"] >= 2
    assert run["unexpected_exits"] == []
    assert run["replays"] >= 2 and run["replays_in_sync"] == run["replays"], run["out_of_sync"]
    assert run["out_of_sync"] == []
    assert run["all_models_equal"], run["final"]
