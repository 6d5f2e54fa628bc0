"""A short version of the main job: real storage, signed envelopes, validator, adversaries."""

import json

import pytest

from sparseloco.errors import ConfigError
from sparseloco.models.gpt import GPTConfig
from subnet.sim import SimConfig, run
from subnet.sim.plan import node_specs


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    cfg = SimConfig(
        peers=3,
        windows=4,
        inner_steps=5,
        batch_size=8,
        model=GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32),
        adversaries=("free-rider", "poisoner", "copier"),
        corpus_bytes=300_000,
        validators=2,
        window_s=4.0,  # room for 8 processes on a loaded 2-core machine
        out=out,
    )
    return run(cfg, progress=False, echo=False)


def test_loss_decreases_and_files_are_written(short_run):
    s = short_run.summary
    assert s["heldout_loss_final"] < s["heldout_loss_initial"] - 0.3
    for name in ("metrics.jsonl", "summary.json", "peers.jsonl", "loss.png", "weights.png"):
        assert (short_run.out / name).stat().st_size > 0
    lines = (short_run.out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["window"] for x in lines] == [0, 1, 2, 3]
    assert json.loads((short_run.out / "summary.json").read_text())["windows"] == 4


def test_every_honest_update_gathered_and_adversaries_unpaid(short_run):
    s = short_run.summary
    records = [json.loads(x) for x in (short_run.out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        for peer in ("peer-0", "peer-1", "peer-2"):
            assert r["validator"][peer]["status"] == "evaluated"
        assert r["validator"]["adv-copier"]["status"] == "copy"
        assert not any(p.startswith("adv-poisoner") for p in r["aggregated"])
    assert s["honest_gathered_every_window"]
    assert s["adversary_weight_total"] == 0.0
    assert s["compression_vs_fp32"] > 20


def test_honest_peers_take_all_the_weight(short_run):
    weights = short_run.summary["final_weights"]
    assert sum(weights[p] for p in ("peer-0", "peer-1", "peer-2")) == pytest.approx(1.0)


def test_every_node_is_its_own_process_and_two_validators_agree(short_run):
    s = short_run.summary
    nodes = {"validator-0", "validator-1", "peer-0", "peer-1", "peer-2"}
    nodes |= {"adv-free-rider", "adv-poisoner", "adv-copier"}
    assert set(s["peak_rss_mb_per_node"]) == nodes
    assert all(100 < mb < 2000 for mb in s["peak_rss_mb_per_node"].values())
    assert 0 < s["peak_pss_mb"] < sum(s["peak_rss_mb_per_node"].values()) + 1000
    for node in nodes:
        assert (short_run.out / "nodes" / f"{node}.toml").exists()
        assert (short_run.out / "logs" / f"{node}.log").exists()
    assert s["validators_agree"] is True


def test_peers_stay_in_sync_with_the_validator(short_run):
    records = [json.loads(x) for x in (short_run.out / "metrics.jsonl").read_text().splitlines()]
    for r in records[1:]:
        for peer in ("peer-0", "peer-1", "peer-2"):
            assert r["validator"][peer]["sync"] == pytest.approx(1.0)


def test_bad_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown adversary"):
        SimConfig(adversaries=("sybil",), out=tmp_path)
    with pytest.raises(ConfigError, match="preset"):
        SimConfig(preset="nope", out=tmp_path)
    for bad in ({"apply_after": 3}, {"overlap": True, "apply_after": 10}, {"apply_wait": False}):
        with pytest.raises(ConfigError, match="apply_after"):
            SimConfig(**bad, out=tmp_path)


def test_overlap_and_evaluation_sizes_reach_the_nodes(tmp_path):
    cfg = SimConfig(
        adversaries=("noise",),
        overlap=True,
        apply_after=4,
        apply_wait=False,
        eval_samples=16,
        out=tmp_path,
    )
    specs = node_specs(cfg)
    miners = [s.config.miner for s in specs if s.config.role == "miner"]
    assert len(miners) == 5
    assert all((m.overlap, m.apply_after, m.apply_wait) == (True, 4, False) for m in miners)
    (validator,) = [s.config.validator for s in specs if s.config.role == "validator"]
    assert (validator.eval_assigned, validator.eval_random) == (16, 16)


def test_run_over_a_loopback_s3_server(tmp_path, monkeypatch, moto_url):
    from netcomm import S3Config, S3Storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    S3Storage(S3Config(bucket="swarm", endpoint_url=moto_url)).create_bucket()
    cfg = SimConfig(
        peers=2,
        windows=2,
        inner_steps=3,
        model=GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32),
        corpus_bytes=200_000,
        storage="s3://swarm/run-1",
        s3_endpoint=moto_url,
        window_s=3.0,
        out=tmp_path,
    )
    s = run(cfg, progress=False, echo=False).summary
    keys = [
        o.key for o in S3Storage(S3Config(bucket="swarm", endpoint_url=moto_url)).list("run-1/")
    ]
    assert s["honest_gathered_every_window"]
    assert s["heldout_loss_final"] < s["heldout_loss_initial"]
    assert any("/updates/000000000001/peer-1.nce" in k for k in keys)
    assert any(k.endswith("checkpoints/latest.json") for k in keys)
    assert not (tmp_path / "storage").exists()


def test_skipping_idle_time_changes_nothing_the_nodes_compute(tmp_path):
    """The default run (the chain skips ahead when every node waits) and a --real-time run
    train the same models: only the waiting is gone."""
    base = dict(
        peers=2,
        windows=3,
        inner_steps=3,
        model=GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32),
        corpus_bytes=200_000,
        aggregate="all",  # the set each miner steps on does not depend on the scores
        window_s=4.0,  # real time: room for a loaded CI machine to keep every update on time
    )
    fast = run(SimConfig(**base, out=tmp_path / "skip"), progress=False, echo=False).summary
    slow = run(
        SimConfig(**base, skip_idle=False, out=tmp_path / "real"), progress=False, echo=False
    ).summary
    assert fast["heldout_curve"] == slow["heldout_curve"]
    assert fast["honest_gathered_every_window"] and slow["honest_gathered_every_window"]
