"""Separate processes over a loopback S3 server: SIGKILLed roles resume bit-identically.

A small version of ``benchmarks/reliability.py``'s fault section: 2 peers and a validator,
2 windows. The second run SIGKILLs roles at planned points (a window and a phase) and
restarts them from their checkpoints while 10 % of storage requests fail, are slow or come
back truncated or corrupted.
"""

from __future__ import annotations

import pytest

# Kill points that land on any machine, fast or loaded. With the seeded plan's random delays
# (up to 0.5 s) a fast role can finish this 2-window run before its kill comes due, and the
# kill is skipped. With no delay a kill fires as soon as its role logs the phase, long before
# it could finish. Both peers die as they start saving window 0's checkpoint: a crash mid-save,
# after both published window 0, so they restart side by side and must republish it unchanged.
KILLS = (
    {"role": "peer-0", "window": 0, "phase": "checkpoint", "delay_s": 0.0},
    {"role": "peer-1", "window": 0, "phase": "checkpoint", "delay_s": 0.0},
)


@pytest.mark.slow
def test_killed_roles_resume_identically_under_storage_faults(tmp_path, workerlib, monkeypatch):
    small = dict(peers=2, windows=2, inner_steps=2, deadline_s=90.0)
    ref = workerlib.run_scenario(workerlib.FaultScenario("ref", **small), tmp_path / "ref")
    assert ref["windows_completed"] == ref["windows_expected"] == 6
    assert ref["updates_lost"] == 0 and ref["all_models_equal"]
    # 2 peers + validator, 2 windows: each role gathers the other peers' update per window
    assert ref["ok_payloads_checked"] == 2 * (1 + 1 + 2)

    sc = workerlib.FaultScenario("kill", kills=len(KILLS), fault_rate=0.1, **small)
    monkeypatch.setattr(workerlib, "kill_plan", lambda sc, roles: [dict(k) for k in KILLS])
    run = workerlib.run_scenario(sc, tmp_path / "kill")
    assert run["kills"] == 2 and not run["kills_skipped"] and run["faults_injected"] > 0
    assert run["windows_completed"] == 6
    assert run["corrupt_accepted"] == 0 and run["republished_differently"] == 0
    assert run["updates_lost"] == 0, run["lost"]
    assert run["final_sha256"] == ref["final_sha256"]  # model, AdamW and SparseLoCo state
    assert run["all_models_equal"]  # peers and validator hold the same global model


def test_kill_plan_is_seeded_and_within_the_run(workerlib):
    sc = workerlib.FaultScenario("x", peers=3, windows=5, kills=8, seed=4)
    roles = ["peer-0", "peer-1", "peer-2", "validator"]
    plan = workerlib.kill_plan(sc, roles)
    assert plan == workerlib.kill_plan(sc, roles)
    assert len(plan) == 8 and [k["window"] for k in plan] == sorted(k["window"] for k in plan)
    for k in plan:
        assert 0 <= k["window"] < 4 and 0 <= k["delay_s"] <= 0.5  # never the last window
        assert k["phase"] in workerlib.PHASES[k["role"] == "validator"]
