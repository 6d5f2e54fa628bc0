"""Config validation, and the scorer's handling of statuses, digests and selection."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gauntlet import (
    AssignmentConfig,
    GauntletConfig,
    GauntletConfigError,
    Scoreboard,
    Scorer,
    SignalConfig,
    WeightsConfig,
    WindowInputs,
    cross_partners,
)
from sparseloco import CodecConfig, CompressedUpdate, ErrorFeedback, encode
from sparseloco.exchange import GatherResult, PeerStatus
from sparseloco.payload import DenseUpdate


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: AssignmentConfig(samples_per_peer=0), "positive integer"),
        (lambda: AssignmentConfig(num_samples=10, samples_per_peer=20), "raise num_samples"),
        (lambda: AssignmentConfig(eval_assigned=100), "lower eval_assigned"),
        (lambda: SignalConfig(sync_max=0.0), "sync_max"),
        (lambda: SignalConfig(copy_overlap=float("nan")), "copy_overlap"),
        (lambda: WeightsConfig(scheme="softmax"), "'power' or 'rank'"),
        (lambda: WeightsConfig(burn_fraction=0.1), "burn_uid"),
        (lambda: GauntletConfig(max_evaluations=0), "max_evaluations"),
        (lambda: GauntletConfig.from_dict({"bogus": 1}), "unknown"),
    ],
)
def test_config_errors_say_how_to_fix(factory, match):
    with pytest.raises(GauntletConfigError, match=match):
        factory()
    assert issubclass(GauntletConfigError, ValueError)


def test_config_round_trips_through_json():
    cfg = GauntletConfig(weights=WeightsConfig(scheme="rank", burn_uid=0, burn_fraction=0.1))
    assert GauntletConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


CODEC = CodecConfig(chunk_size=4, topk=4, backend="torch")
DATA_X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
DATA_Y = DATA_X.sum(dim=1, keepdim=True)
CFG = GauntletConfig(
    assignment=AssignmentConfig(num_samples=64, samples_per_peer=8, eval_assigned=4, eval_random=8)
)


def scorer(**kw) -> Scorer:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)

    def loss(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    def batches(ids):
        return [(DATA_X[list(ids)], DATA_Y[list(ids)])]

    return Scorer(model, loss, batches, seed="s", config=kw.pop("config", CFG), codec=CODEC, **kw)


def payload(seed: int) -> CompressedUpdate:
    g = torch.Generator().manual_seed(seed)
    delta = {"weight": torch.randn(1, 4, generator=g), "bias": torch.randn(1, generator=g)}
    return encode(delta, ErrorFeedback(CODEC))


def gather(window: int, peers: dict) -> GatherResult:
    out = GatherResult(window=window)
    for peer, item in peers.items():
        if isinstance(item, str):
            out.statuses[peer] = PeerStatus(peer, item)
        else:
            out.updates[peer] = item
            out.statuses[peer] = PeerStatus(peer, "ok")
    return out


def test_statuses_digests_and_wrong_shapes():
    sc = scorer()
    digests = {p: sc.expected_digest(p, 0) for p in ["a", "b", "c", "d", "e", "f"]}
    digests["b"] = "0" * 64
    del digests["c"]
    wrong = DenseUpdate({"weight": torch.zeros(2, 2), "bias": torch.zeros(1)})
    inputs = WindowInputs(
        window=0,
        gather=gather(
            0,
            {
                "a": payload(1),
                "b": payload(2),
                "c": payload(3),
                "d": "late",
                "e": "timeout",
                "f": wrong,
                "g": "invalid",
            },
        ),
        eval_seed="e",
        digests=digests,
    )
    report = sc.score_window(inputs)
    status = {p: o.status for p, o in report.outcomes.items()}
    assert status == {
        "a": "evaluated",
        "b": "bad_data",
        "c": "bad_data",
        "d": "late",
        "e": "timeout",
        "f": "invalid",
        "g": "invalid",
    }
    assert report.outcomes["c"].reason == "no proof-of-data digest"
    # failed peers rank below the evaluated one, late above missing-like and invalid
    m = {p: o.match_score for p, o in report.outcomes.items()}
    assert m["a"] > m["d"] > m["e"] > m["f"] == m["b"]
    board = sc.scoreboard
    assert board.peers["b"].failures == {"bad_data": 1}
    assert board.peers["a"].mu > board.peers["g"].mu


def test_max_evaluations_rotates_least_recently_evaluated():
    cfg = GauntletConfig(assignment=CFG.assignment, max_evaluations=2)
    sc = scorer(config=cfg)
    seen = []
    for w in range(2):
        # fresh content every window: the same update twice would be a replay
        peers = {p: payload(10 * w + i) for i, p in enumerate(["a", "b", "c", "d"])}
        digests = {p: sc.expected_digest(p, w) for p in peers}
        rep = sc.score_window(WindowInputs(w, gather(w, peers), f"e{w}", digests))
        seen.append(sorted(p for p, o in rep.outcomes.items() if o.status == "evaluated"))
        assert sum(o.status == "skipped" for o in rep.outcomes.values()) == 2
    assert sorted(seen[0] + seen[1]) == ["a", "b", "c", "d"]


def test_scores_identical_across_fresh_validators_and_restart():
    def run(board=None):
        sc = scorer(scoreboard=board) if board else scorer()
        peers = {p: payload(i) for i, p in enumerate(["a", "b", "c"])}
        digests = {p: sc.expected_digest(p, 0) for p in peers}
        sc.score_window(WindowInputs(0, gather(0, peers), "e", digests))
        return sc.scoreboard

    one, two = run(), run()
    assert one.state_dict() == two.state_dict()
    restored = Scoreboard()
    restored.load_state_dict(json.loads(json.dumps(one.state_dict())))
    assert restored.state_dict() == one.state_dict()


def test_window_steps_are_callable_alone():
    from gauntlet.scorer import decode_all, match_scores

    sc = scorer()
    g = gather(0, {"a": payload(1), "b": "late", "c": DenseUpdate({"weight": torch.zeros(1, 4)})})
    g.statuses["d"] = PeerStatus("d", "ok")  # ok without a payload
    peers, decoded, status = decode_all(g, sc._shapes, CODEC)
    assert peers == ["a", "b", "c", "d"] and sorted(decoded) == ["a"]
    assert {p: k for p, (k, _) in status.items()} == {"b": "late", "c": "invalid", "d": "missing"}
    report = sc.score_window(WindowInputs(0, g, "e", {"a": sc.expected_digest("a", 0)}))
    evaluated = {"a": report.outcomes["a"].evaluation}
    m = match_scores(evaluated, {"b": ("late", ""), "c": ("invalid", "")}, CFG.rating)
    low = min(0.0, evaluated["a"].gain_random)
    assert m == {
        "a": evaluated["a"].gain_random,
        "b": low - CFG.rating.penalty_late,
        "c": low - CFG.rating.penalty_invalid,
    }


def test_cross_peers_caps_each_set_to_k_other_updates():
    from dataclasses import replace

    cfg = GauntletConfig(assignment=CFG.assignment, signals=replace(CFG.signals, cross_peers=3))
    sc = scorer(config=cfg)
    peers = {p: payload(i) for i, p in enumerate(["a", "b", "c", "d", "e"])}
    digests = {p: sc.expected_digest(p, 0) for p in peers}
    rep = sc.score_window(WindowInputs(0, gather(0, peers), "e0", digests))
    want = cross_partners(sorted(peers), 0, "e0", 3)
    for p, o in rep.outcomes.items():
        assert o.status == "evaluated" and sorted(o.evaluation.cross_gains) == want[p]
    for bad in (1, 2, 4, 16, True):
        with pytest.raises(ValueError, match="cross_peers"):
            replace(CFG.signals, cross_peers=bad)
