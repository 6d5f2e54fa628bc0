"""PRISM example: which tier drops which candidate, ranking, weights and the winner's config."""

from __future__ import annotations

import json
import math
import shlex

import pytest
import torch
from examples.common.submissions import SubmissionBox, demo_signer, register_miner
from examples.prism.config import PrismConfig
from examples.prism.run import ranked_table, run_round, simulate_command
from examples.prism.static import StaticRejection, check_static, count_params, parse_config
from examples.prism.training import LN2, PrequentialRun, build_model, locked_data

from gauntlet import InMemorySubnet
from netcomm import LocalStorage
from sparseloco.models import GPTConfig
from subnet.cli import main as cli_main

SMALL = PrismConfig(
    seed="test-round",
    corpus_bytes=120_000,
    batch_size=4,
    proxy_steps=3,
    proxy_keep=4,
    train_steps=8,
    train_keep=2,
    bench_steps=12,
    heldout_batches=2,
)


@pytest.fixture(scope="module")
def round_result(tmp_path_factory):
    return run_round(SMALL, tmp_path_factory.mktemp("prism"))


def test_each_gate_drops_the_candidates_built_to_fail_it(round_result):
    by = {r.hotkey: r for r in round_result.ranked}
    assert by["jet"].dropped_at == "signature" and by["jet"].reason == "bad signature"
    assert by["cirrus"].dropped_at == "static" and "parameters > cap 300,000" in by["cirrus"].reason
    assert by["dune"].dropped_at == "static" and "divisible" in by["dune"].reason
    assert (
        by["ember"].dropped_at == "static" and "forbidden fields ['dropout']" in by["ember"].reason
    )
    assert by["fjord"].dropped_at == "dedup"
    assert by["fjord"].reason == "near-duplicate of borealis (similarity 1.00)"
    assert by["gale"].dropped_at == "proxy"  # 6.7k parameters: learns slowest
    tiers = [r.dropped_at for r in round_result.ranked]
    assert tiers.count("proxy") == 3 and tiers.count("train") == 2 and tiers.count(None) == 2


def test_ranking_follows_depth_then_the_score_of_the_last_tier(round_result):
    ranked = round_result.ranked
    depths = [r.depth for r in ranked]
    assert depths == sorted(depths, reverse=True)
    benchmarked = [r for r in ranked if r.dropped_at is None]
    assert benchmarked[0].bench > benchmarked[1].bench
    assert benchmarked[0].bench == pytest.approx(1 / (1 + benchmarked[0].bench_bpb))
    dropped_at_train = [r for r in ranked if r.dropped_at == "train"]
    # tier 3 kept the two best prequential scores
    assert min(r.train for r in benchmarked) >= max(r.train for r in dropped_at_train)
    assert round_result.winner is ranked[0]
    table = ranked_table(ranked)
    assert table.splitlines()[2].split()[:2] == ["1", ranked[0].hotkey] and "winner" in table


def test_weights_go_to_benchmarked_miners_and_the_chain_accepts_them(round_result):
    s = round_result.settlement
    assert s.result.success
    positive = {h for h, w in s.weights.items() if w > 0}
    assert positive == {r.hotkey for r in round_result.ranked if r.dropped_at is None}
    assert max(s.weights, key=s.weights.get) == round_result.winner.hotkey
    assert math.isclose(sum(s.weights.values()), 1.0)


def test_winner_config_round_trips_and_the_printed_command_trains_it(
    round_result, tmp_path, capsys
):
    saved = json.loads(round_result.winner_path.read_text())
    assert GPTConfig(**saved) == round_result.winner.config
    command = simulate_command(round_result.winner_path, tmp_path / "sim")
    assert command == (
        f"sparseloco simulate --model-config {round_result.winner_path} --out {tmp_path / 'sim'}"
    )
    # the printed command, shortened to one small window, trains exactly the winner
    short = ["--windows", "1", "--peers", "2", "--inner-steps", "2", "--quiet"]
    assert cli_main(shlex.split(command)[1:] + short) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["config"]["model"] == saved
    assert summary["params"] == round_result.winner.params == count_params(GPTConfig(**saved))
    assert summary["windows"] == 1 and math.isfinite(summary["heldout_loss_final"])


def test_static_validation_rules():
    with pytest.raises(StaticRejection, match="wrong type"):
        parse_config({"n_layer": True, "n_embd": 64, "n_head": 4}, SMALL)
    with pytest.raises(StaticRejection, match="forbidden"):
        parse_config({"block_size": 4096}, SMALL)
    # values that would crash the round if they reached the model are rejected up front
    base = {"n_layer": 2, "n_embd": 64, "n_head": 4}
    for bad, reason in (
        ({"n_kv_head": 0}, "n_kv_head must be a positive integer or None, got 0"),
        ({"n_kv_head": -1}, "n_kv_head must be a positive integer or None, got -1"),
        ({"mlp_ratio": math.inf}, "mlp_ratio must be finite, > 0 and <= 64.0, got inf"),
        ({"mlp_ratio": math.nan}, "mlp_ratio must be finite, > 0 and <= 64.0, got nan"),
        ({"mlp_ratio": 1e308}, "mlp_ratio must be finite, > 0 and <= 64.0, got 1e+308"),
    ):
        with pytest.raises(StaticRejection) as caught:
            check_static({**base, **bad}, SMALL)
        assert str(caught.value) == f"does not build: {reason}"
    report = check_static({"n_layer": 1, "n_embd": 32, "n_head": 2}, SMALL)
    assert report.params == count_params(report.config)
    same = check_static({"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 2}, SMALL)
    assert same.fingerprint == report.fingerprint
    fewer_kv = check_static({"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1}, SMALL)
    assert fewer_kv.fingerprint != report.fingerprint


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(n_layer=3, n_embd=96, n_head=4, n_kv_head=2, norm="rmsnorm", pos="rope"),
        GPTConfig(n_layer=2, n_embd=64, n_head=4, mlp_ratio=1.5, tie_weights=False),
    ],
)
def test_parameter_count_from_the_config_matches_the_model(cfg):
    assert count_params(cfg) == build_model(cfg, "s").num_params()


def test_prequential_loss_is_recorded_before_each_update_and_is_deterministic():
    gpt = GPTConfig(block_size=64, n_layer=1, n_embd=32, n_head=2)
    data = locked_data(SMALL)
    run = PrequentialRun(gpt, data, SMALL)
    run.advance_to(3)
    x, y = run.batch(0)
    with torch.no_grad():
        _, first = build_model(gpt, SMALL.seed)(x, y)
    assert run.losses[0] == pytest.approx(float(first), rel=1e-6)  # the untrained model's loss
    again = PrequentialRun(gpt, data, SMALL)
    again.advance_to(3)
    assert again.losses == run.losses
    assert run.prequential_bpb() == pytest.approx(sum(run.losses) / 3 / LN2)


def test_tampered_or_moved_records_are_rejected(tmp_path):
    subnet = InMemorySubnet()
    subnet.register("validator", stake=1.0)
    for hk in ("a", "b"):
        register_miner(subnet, hk, demo_signer(hk))
    storage = LocalStorage(tmp_path, fsync=False)
    box = SubmissionBox(storage, "prism")
    key = box.submit("a", 1, {"n_layer": 1}, demo_signer("a"))
    storage.put("prism/0000000002-b.json", storage.get(key))  # a's record under b's name
    tampered = storage.get(key).replace(b'"n_layer":1', b'"n_layer":9')
    storage.put("prism/0000000003-a.json", tampered)
    accepted, rejected = box.collect(subnet.connect("validator"))
    assert [(s.hotkey, s.block, s.body) for s in accepted] == [("a", 1, {"n_layer": 1})]
    assert {(r.hotkey, r.reason) for r in rejected} == {
        ("b", "record does not match its key"),
        ("a", "bad signature"),
    }
