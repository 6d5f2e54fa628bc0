"""Evaluation: the update step, clip factors, gains, and the exact restore of the model."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from gauntlet import (
    EvalConfig,
    Evaluator,
    assigned_indicator,
    cross_indicators,
    cross_partners,
    reference_factors,
    relative_gain,
    update_norms,
    window_reference,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.lin(x)))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def make() -> tuple[Net, list, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    batches = [(torch.randn(8, 4), torch.randn(8, 3)) for _ in range(2)]
    net.train()
    mse(net, batches[0]).backward()
    opt.step()  # optimizer state and .grad exist and must survive evaluation
    return net, batches, opt


def test_model_optimizer_and_rng_restored_bit_for_bit():
    net, batches, opt = make()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt_state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state.items()}
    update = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    rng = torch.get_rng_state()
    ev = Evaluator(net, mse, EvalConfig(eval_mode=False), optimizer=opt)
    norms = update_norms({"a": update})
    factors = reference_factors(norms, window_reference(norms, ["a"]))
    base = ev.baseline(batches, {"a": batches[:1]})
    res = ev.evaluate("a", update, factors["a"], base, batches, batches[:1])
    assert res.loss_random_after != res.loss_random_before
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in net.named_parameters():
        assert torch.equal(p.grad, grads[n])
    for k, v in opt.state.items():
        for kk, vv in v.items():
            assert torch.equal(vv, opt_state[k][kk])
    assert torch.equal(torch.get_rng_state(), rng)


def test_step_is_clipped_scaled_and_matches_manual():
    net, batches, _ = make()
    cfg = EvalConfig(outer_lr=0.5, step_scale=0.2)
    ev = Evaluator(net, mse, cfg)
    small = {n: 0.01 * torch.ones_like(p) for n, p in net.named_parameters()}
    big = {n: 100.0 * torch.ones_like(p) for n, p in net.named_parameters()}
    mid = {n: 0.02 * torch.ones_like(p) for n, p in net.named_parameters()}
    norms = update_norms({"big": big, "mid": mid, "small": small})
    factors = reference_factors(norms, window_reference(norms, ["big", "mid"]))
    # every update is applied at the smallest norm of the reference set (mid's)
    assert factors["mid"]["lin.weight"] == 1.0
    assert factors["small"]["lin.weight"] == pytest.approx(2.0)
    assert factors["big"]["lin.weight"] == pytest.approx(0.02 / 100.0)
    base = ev.baseline(batches, {"big": batches})
    res = ev.evaluate("big", big, factors["big"], base, batches, batches)
    manual = Net()
    manual.load_state_dict(net.state_dict())
    with torch.no_grad():
        for n, p in manual.named_parameters():
            p.sub_(big[n], alpha=cfg.step * factors["big"][n])
    manual.eval()
    expect = sum(float(mse(manual, b).detach()) for b in batches) / len(batches)
    assert res.loss_random_after == pytest.approx(expect, rel=1e-6)
    assert res.gain_random == pytest.approx((base.random - expect) / base.random, rel=1e-6)


def test_zero_update_has_zero_gain_and_negative_indicator():
    net, batches, _ = make()
    ev = Evaluator(net, mse)
    zero = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    base = ev.baseline(batches, {"z": batches[:1]})
    res = ev.evaluate("z", zero, {}, base, batches, batches[:1])
    assert res.gain_random == 0.0 and res.gain_assigned == 0.0 and res.indicator == -1


def test_huge_update_yields_nonfinite_flag():
    net, batches, _ = make()
    ev = Evaluator(net, mse)
    huge = {n: torch.full_like(p, 3e38) for n, p in net.named_parameters()}
    base = ev.baseline(batches, {"h": batches})
    res = ev.evaluate("h", huge, {}, base, batches, batches)
    assert not res.finite and res.indicator == -1


def test_relative_gain():
    assert relative_gain(2.0, 1.0) == 0.5
    assert relative_gain(0.0, -1.0, floor=0.5) == 2.0
    assert math.isnan(relative_gain(1.0, math.inf))


def _additive(s: dict[str, float], e: dict[str, float], delta: dict[str, float]) -> dict:
    """G[x][y] = s_x + e_y + δ_x·[x = y]: update strength, set easiness, own-data advantage."""
    return {x: {y: s[x] + e[y] + (delta[x] if x == y else 0.0) for y in s} for x in s}


PEERS = ["a", "b", "c", "d", "e", "f"]
STRENGTH = dict(zip(PEERS, [0.010, 0.006, 0.008, 0.012, 0.007, 0.009], strict=True))
EASE = dict(zip(PEERS, [0.000, 0.004, -0.003, 0.002, 0.001, -0.002], strict=True))


def test_cross_indicator_reads_own_data_advantage_not_strength_or_easiness():
    delta = {p: 0.002 for p in PEERS} | {"c": 0.0, "e": -0.001}  # c, e trained on other data
    table = _additive(STRENGTH, EASE, delta)
    for ease_random in (-0.004, 0.0, 0.005):  # how easy the shared random set happens to be
        rand = {p: STRENGTH[p] + ease_random for p in PEERS}
        got = cross_indicators(table, rand, 0.0, 0.0)
        assert got == {p: (-1.0 if p in "ce" else 1.0) for p in PEERS}
        # Gauntlet's reading of the same table: set and random-set easiness decide instead
        old = {p: assigned_indicator(rand[p], table[p][p], 0.0, 0.0) for p in PEERS}
        assert old != got
    soft = cross_indicators(table, {p: STRENGTH[p] for p in PEERS}, 0.0, 1.0)
    for p in PEERS:  # exactly δ over the largest gain in play
        others = statistics.median(STRENGTH[q] for q in PEERS if q != p)
        size = max(abs(table[p][p]), STRENGTH[p], others)
        assert soft[p] == pytest.approx(delta[p] / size, rel=1e-9)


def test_one_peer_cannot_move_another_peers_indicator_or_raise_its_own():
    delta = {p: 0.002 for p in PEERS}
    table = _additive(STRENGTH, EASE, delta)
    rand = {p: STRENGTH[p] for p in PEERS}
    base = cross_indicators(table, rand, 0.0, 0.0)
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        # "a" sends anything on the other peers' (public) sets: hurts one, overfits another
        wild = (torch.rand(len(PEERS), generator=gen, dtype=torch.float64) - 0.5) * 0.2
        bent = {
            **table,
            "a": {
                y: (table["a"][y] if y == "a" else float(w))
                for y, w in zip(PEERS, wild, strict=True)
            },
        }
        got = cross_indicators(bent, rand, 0.0, 0.0)
        assert got == base  # nobody's sign moves, "a"'s included
    # without an own-data advantage, degrading every other set does not lift "a"
    plain = _additive(STRENGTH, EASE, delta | {"a": 0.0})
    bent = {**plain, "a": {y: (plain["a"][y] if y == "a" else -0.05) for y in PEERS}}
    assert cross_indicators(bent, rand, 0.0, 0.1)["a"] <= 0.0


def test_cross_indicator_ignores_shifts_common_to_every_update():
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(4, 4, generator=gen, dtype=torch.float64) * 0.01
    peers = ["p0", "p1", "p2", "p3"]
    table = {x: {y: float(g[i, j]) for j, y in enumerate(peers)} for i, x in enumerate(peers)}
    rand = {x: float(g[i, (i + 1) % 4]) for i, x in enumerate(peers)}
    base = cross_indicators(table, rand, 0.0, 0.0)
    shifted = {x: {y: v + 0.003 for y, v in row.items()} for x, row in table.items()}
    assert cross_indicators(shifted, {p: v + 0.003 for p, v in rand.items()}, 0.0, 0.0) == base
    assert set(base.values()) == {-1.0, 1.0}


def test_cross_indicator_beats_the_random_set_under_common_noise():
    """Windows whose random set is easier or harder for every update (the common noise seen
    on the tiny model): the cross indicator keeps honest peers positive in far more windows
    than the random-set one, and the other-data peer's mean stays near 0."""
    gen = torch.Generator().manual_seed(1)
    peers = [f"p{i}" for i in range(5)]
    cross_pos, rand_pos, liar, honest = 0, 0, 0.0, 0.0

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    for _ in range(200):
        s, e = 0.01 + 0.002 * noise(5), 0.003 * noise(5)
        common = 0.004 * float(noise(1))
        table = {
            x: {
                y: float(s[i] + e[j] + 0.0005 * noise(1)) + (0.002 if i == j and i else 0.0)
                for j, y in enumerate(peers)
            }
            for i, x in enumerate(peers)
        }
        rand = {x: float(s[i] + 0.0005 * noise(1)) + common for i, x in enumerate(peers)}
        cross = cross_indicators(table, rand, 0.0, 0.1)
        old = {x: assigned_indicator(rand[x], table[x][x], 0.0, 0.1) for x in peers}
        cross_pos += sum(cross[x] > 0 for x in peers[1:])
        rand_pos += sum(old[x] > 0 for x in peers[1:])
        liar += cross["p0"] / 200
        honest += sum(cross[x] for x in peers[1:]) / 800
    assert cross_pos >= 0.85 * 800 and rand_pos < 0.75 * 800
    assert abs(liar) < 0.15 and honest > 0.6


def test_cross_indicator_leaves_out_broken_and_empty_updates():
    peers = ["a", "b", "c"]
    table = _additive(
        dict(zip(peers, [0.01, 0.008, 0.009], strict=True)),
        dict(zip(peers, [0.0, 0.002, -0.001], strict=True)),
        {"a": 0.002, "b": 0.0, "c": 0.002},
    )
    rand = {"a": 0.01, "b": 0.008, "c": 0.009}
    base = cross_indicators(table, rand, 0.0, 0.1)
    for bad, bad_rand in (
        ({y: math.nan for y in [*peers, "z"]}, 0.01),
        ({y: 0.0 for y in [*peers, "z"]}, 0.0),
        ({y: 0.01 for y in [*peers, "z"]}, math.inf),
    ):
        with_bad = {x: {**row, "z": -0.05} for x, row in table.items()} | {"z": bad}
        got = cross_indicators(with_bad, rand | {"z": bad_rand}, 0.0, 0.1)
        assert got["z"] == -1.0 and {p: got[p] for p in peers} == base
    # a peer left alone beside broken ones is judged on its own gains (Gauntlet's rule)
    alone = {"a": {"a": 0.012, "z": 0.0}, "z": {"a": math.nan, "z": math.nan}}
    got = cross_indicators(alone, {"a": 0.01, "z": 0.0}, 0.0, 0.1)
    assert got == {"a": assigned_indicator(0.01, 0.012, 0.0, 0.1), "z": -1.0}
    for rows, rand in (
        ({"a": {"b": 0.1}, "b": {"b": 0.1}}, {"a": 0.1, "b": 0.1}),  # no own gain
        ({"a": {"a": 0.1, "c": 0.1}, "b": {"b": 0.1}}, {"a": 0.1, "b": 0.1}),  # unknown set
        ({"a": {"a": 0.1}}, {}),  # no random gain
    ):
        with pytest.raises(ValueError, match="own peer"):
            cross_indicators(rows, rand, 0.0, 0.1)


def _peer_inputs(net: nn.Module, peers: list[str], seed: int) -> tuple[dict, dict, dict]:
    """Random updates, one assigned batch each and the clip factors, for ``peers``."""
    gen = torch.Generator().manual_seed(seed)
    updates = {
        p: {n: torch.randn(q.shape, generator=gen) for n, q in net.named_parameters()}
        for p in peers
    }
    sets = {
        p: [(torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen))] for p in peers
    }
    norms = update_norms(updates)
    return updates, sets, reference_factors(norms, window_reference(norms, peers))


def test_evaluate_many_cross_scores_every_update_on_every_assigned_set():
    net, batches, _ = make()
    ev = Evaluator(net, mse, EvalConfig(eval_mode=True))
    peers = ["a", "b", "c"]
    updates, sets, factors = _peer_inputs(net, peers, seed=3)
    base = ev.baseline(batches, sets)
    everyone = {p: [q for q in peers if q != p] for p in peers}
    crossed = ev.evaluate_many(updates, factors, base, batches, sets, scale=0.1, partners=everyone)
    plain = ev.evaluate_many(updates, factors, base, batches, sets, scale=0.1)
    table = {}
    for p in peers:
        one = ev.evaluate(p, updates[p], factors[p], base, batches, sets[p], scale=0.1)
        assert one.cross_gains == {} and plain[p] == one
        # the own-set and random-set numbers are those of a plain evaluation
        assert crossed[p].gain_assigned == one.gain_assigned
        assert crossed[p].gain_random == one.gain_random
        assert sorted(crossed[p].cross_gains) == sorted(set(peers) - {p})
        for q, g in crossed[p].cross_gains.items():
            alone = ev.evaluate(p, updates[p], factors[p], base, batches, sets[q], scale=0.1)
            assert g == relative_gain(base.assigned[q], alone.loss_assigned_after)
        table[p] = {**crossed[p].cross_gains, p: crossed[p].gain_assigned}
    rand = {p: crossed[p].gain_random for p in peers}
    assert {p: crossed[p].indicator for p in peers} == cross_indicators(table, rand, 0.0, 0.1)
    # a peer whose set no other update was scored on: the random set alone is its reference
    alone = ev.evaluate_many(
        {"a": updates["a"]}, {"a": factors["a"]}, base, batches, sets, scale=0.1, partners={"a": []}
    )
    assert alone["a"] == plain["a"]
    with pytest.raises(KeyError, match="partners"):
        ev.evaluate_many(updates, factors, base, batches, sets, partners={p: [p] for p in peers})


def test_cross_partners_cover_every_set_k_times_and_follow_the_seed():
    peers = [f"p{i:02d}" for i in range(12)]
    assert cross_partners(peers[:4], 3, "h", 16) == {
        p: [q for q in peers[:4] if q != p] for p in peers[:4]
    }
    a = cross_partners(peers, 3, "hash-a", 4)
    assert a == cross_partners(list(reversed(peers)), 3, "hash-a", 4)  # order-free
    assert all(len(v) == 4 and p not in v for p, v in a.items())
    cover = {p: sum(p in v for v in a.values()) for p in peers}
    assert set(cover.values()) == {4}
    assert a != cross_partners(peers, 3, "hash-b", 4) != cross_partners(peers, 4, "hash-a", 4)


@pytest.mark.parametrize("k", [0, 2, 4])
def test_threads_give_bit_identical_results_and_restore_the_model(k):
    net, batches, opt = make()
    peers = [f"p{i}" for i in range(5)]
    updates, sets, factors = _peer_inputs(net, peers, seed=4)
    partners = cross_partners(peers, 0, "seed", k) if k else None
    before = {name: v.clone() for name, v in net.state_dict().items()}
    one = Evaluator(net, mse, EvalConfig(), optimizer=opt)
    base = one.baseline(batches, sets)
    want = one.evaluate_many(updates, factors, base, batches, sets, scale=0.1, partners=partners)
    for threads in (2, 3, 8):
        ev = Evaluator(net, mse, EvalConfig(), optimizer=opt, threads=threads)
        assert ev.baseline(batches, sets) == base
        got = ev.evaluate_many(updates, factors, base, batches, sets, scale=0.1, partners=partners)
        assert got == want and list(got) == peers
        assert all(torch.equal(before[n], v) for n, v in net.state_dict().items())
    with pytest.raises(ValueError, match="eval_mode"):
        Evaluator(net, mse, EvalConfig(eval_mode=False), threads=2)
    with pytest.raises(ValueError, match="threads"):
        Evaluator(net, mse, threads=0)


def test_cross_indicator_needs_three_helpful_other_updates():
    """With one or two others a single peer would decide the median, and an update that does
    not help the random set is no reference: below three, Gauntlet's rule judges the peer."""
    table = _additive(STRENGTH, EASE, {p: 0.002 for p in PEERS})
    rand = {p: STRENGTH[p] for p in PEERS}
    small = {x: {y: table[x][y] for y in "abc"} for x in "abc"}
    got = cross_indicators(small, {p: rand[p] for p in "abc"}, 0.0, 0.1)
    assert got == {p: assigned_indicator(rand[p], table[p][p], 0.0, 0.1) for p in "abc"}
    # "d", "e", "f" send updates that hurt the random set: they leave every median, so with
    # only a, b, c helpful each of these is judged on its own gains again
    hurt = rand | {p: -0.01 for p in "def"}
    bent = {x: dict(table[x]) for x in PEERS} | {
        p: {y: 0.05 if y in "abc" else table[p][y] for y in PEERS} for p in "def"
    }
    got = cross_indicators(bent, hurt, 0.0, 0.1)
    assert {p: got[p] for p in "abc"} == {
        p: assigned_indicator(rand[p], table[p][p], 0.0, 0.1) for p in "abc"
    }
