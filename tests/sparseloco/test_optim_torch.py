"""torch.optim behaviour of the outer optimizers: groups, window, GradScaler, any optimizer."""

from __future__ import annotations

import threading

import pytest
import torch

from sparseloco import ConfigError, DataParallel, DiLoCo, InProcessHub, OuterLoop, SparseLoCo


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(12, 70), torch.nn.Tanh(), torch.nn.Linear(70, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.05)


def _together(fns):
    threads = [threading.Thread(target=f) for f in fns]
    [t.start() for t in threads]
    [t.join() for t in threads]


def test_add_param_group_names_the_group_and_matches_building_it_up_front():
    hub = InProcessHub(["late", "early"], timeout=10)
    models = [_model(), _model()]
    named = [dict(m.named_parameters()) for m in models]
    first = [[(n, p) for n, p in d.items() if n.startswith("0.")] for d in named]
    second = [[(n, p) for n, p in d.items() if n.startswith("2.")] for d in named]
    late = SparseLoCo(first[0], hub.connect("late"), codec={"topk": 8})
    late.add_param_group({"params": second[0], "lr": 0.5})
    early = SparseLoCo(
        [{"params": first[1]}, {"params": second[1], "lr": 0.5}],
        hub.connect("early"),
        codec={"topk": 8},
    )
    assert [g["param_names"] for g in late.param_groups] == [
        ["0.weight", "0.bias"],
        ["2.weight", "2.bias"],
    ]
    for rnd in range(2):
        _perturb(models[0], rnd)
        _perturb(models[1], 100 + rnd)
        _together([late.step, early.step])
    assert late.last_report.peers == ["early", "late"]
    assert torch.equal(_flat(models[0]), _flat(models[1]))
    sd = late.state_dict()
    assert sd["param_groups"][1]["param_names"] == ["2.weight", "2.bias"]
    assert sd["param_groups"][1]["lr"] == 0.5


def test_add_param_group_without_names_and_with_a_taken_name():
    m = _model()
    outer = SparseLoCo([m[0].weight], InProcessHub().connect("solo"), codec={"topk": 8})
    outer.add_param_group({"params": [m[0].bias]})
    assert [g["param_names"] for g in outer.param_groups] == [["0.0"], ["1.0"]]
    with torch.no_grad():
        m[0].bias.add_(0.1)
    assert outer.step().update_norm > 0  # no KeyError: the new parameter has state and name
    with pytest.raises(ConfigError, match="twice"):
        outer.add_param_group({"params": [m[2].weight], "param_names": ["0.0"]})
    with pytest.raises(ConfigError, match="none of them"):
        outer.add_param_group({"params": [("x", m[2].weight), m[2].bias]})


def test_apply_advances_the_window_so_a_catching_up_peer_publishes_the_next_one():
    # c is listed up front (a hub refuses a peer that connects after gathering began);
    # a and b wait out the short timeout for it in the windows it misses.
    hub = InProcessHub(["a", "b", "c"], timeout=1.5)
    models = {p: _model() for p in "abc"}
    outers = {
        p: SparseLoCo(models[p].named_parameters(), hub.connect(p), codec={"topk": 8}) for p in "ab"
    }
    for w in range(2):
        for i, p in enumerate("ab"):
            _perturb(models[p], 10 * w + i)
        _together([outers["a"].step, outers["b"].step])
    outers["c"] = SparseLoCo(models["c"].named_parameters(), hub.connect("c"), codec={"topk": 8})
    for w in range(2):  # c missed windows 0 and 1: replay them
        outers["c"].apply(outers["c"].exchange.gather(w).updates)
    assert outers["c"].window == 2
    assert torch.equal(_flat(models["c"]), _flat(models["a"]))
    for i, p in enumerate("abc"):
        _perturb(models[p], 50 + i)
    _together([o.step for o in outers.values()])
    assert [o.last_report.window for o in outers.values()] == [2, 2, 2]
    assert all(o.last_report.peers == ["a", "b", "c"] for o in outers.values())
    assert torch.equal(_flat(models["c"]), _flat(models["a"]))


def _scaled_training(fused, bad_steps, steps=9, sync_every=4):
    m = _model()
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    outer = SparseLoCo(m.named_parameters(), InProcessHub().connect("solo"), codec={"topk": 8})
    g = torch.Generator().manual_seed(3)
    with OuterLoop(inner, outer, sync_every=sync_every) as loop:
        for i in range(steps):
            x = torch.randn(8, 12, generator=g)
            loss = (m(x) ** 2).mean() * (float("inf") if i in bad_steps else 1.0)
            scaler.scale(loss).backward()
            scaler.step(inner)
            scaler.update()
            inner.zero_grad()
    return loop, inner


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler_skipped_inner_steps_are_not_counted(fused):
    loop, inner = _scaled_training(fused, bad_steps={2, 5})
    taken = int(inner.state[inner.param_groups[0]["params"][0]]["step"])
    assert taken == 7
    assert loop.inner_step_count == 7
    assert [r.window for r in loop.reports] == [0]  # 7 counted steps: one round of 4


def _dp_peer(hub, pid, models, scales, bad_step):
    m = models[pid]
    outer = DataParallel(m.named_parameters(), hub.connect(pid), nonfinite="propagate")
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(int(pid[1:]))
    for i in range(5):
        x = torch.randn(8, 12, generator=g)
        loss = (m(x) ** 2).mean() * (float("inf") if i == bad_step else 1.0)
        scaler.scale(loss).backward()
        outer.step()
        scaler.step(inner)
        scaler.update()
        inner.zero_grad()
    scales[pid] = (scaler.get_scale(), int(inner.state[m[0].weight]["step"]))


def test_data_parallel_with_grad_scaler_skips_in_lockstep():
    hub = InProcessHub(["p0", "p1"], timeout=10)
    models = {"p0": _model(), "p1": _model()}
    scales: dict = {}
    _together(
        [
            lambda: _dp_peer(hub, "p0", models, scales, bad_step=None),
            lambda: _dp_peer(hub, "p1", models, scales, bad_step=2),
        ]
    )
    assert scales["p0"] == scales["p1"] == (2.0**7, 4)  # both skipped step 2, scale halved
    assert torch.equal(_flat(models["p0"]), _flat(models["p1"]))


def test_data_parallel_hook_refuses_a_grad_scaler_it_cannot_keep_in_lockstep():
    m = _model()
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    with OuterLoop(inner, DataParallel(m.named_parameters(), InProcessHub().connect("x"))):
        scaler.scale((m(torch.ones(2, 12)) ** 2).mean()).backward()
        with pytest.raises(ConfigError, match="nonfinite='propagate'"):
            scaler.step(inner)


def _solo_rounds(make_outer, rounds=3):
    m = _model()
    outer = make_outer(m)
    for rnd in range(rounds):
        _perturb(m, rnd)
        outer.step()
    return m, outer


@pytest.mark.parametrize(
    ("builtin", "custom"),
    [
        (
            lambda m: DiLoCo(m.named_parameters(), InProcessHub().connect("x"), lr=0.7),
            lambda m: DiLoCo(
                m.named_parameters(),
                InProcessHub().connect("x"),
                outer_optimizer=lambda ps: torch.optim.SGD(
                    ps, lr=0.7, momentum=0.9, nesterov=True, foreach=False
                ),
            ),
        ),
        (
            lambda m: SparseLoCo(
                m.named_parameters(), InProcessHub().connect("x"), codec={"topk": 8}, momentum=0.5
            ),
            lambda m: SparseLoCo(
                m.named_parameters(),
                InProcessHub().connect("x"),
                codec={"topk": 8},
                outer_optimizer=torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.5),
            ),
        ),
    ],
    ids=["diloco-nesterov-factory", "sparseloco-momentum-instance"],
)
def test_torch_sgd_as_outer_optimizer_equals_the_builtin_step_bit_for_bit(builtin, custom):
    a, _ = _solo_rounds(builtin)
    b, outer = _solo_rounds(custom)
    assert torch.equal(_flat(a), _flat(b))
    sentinel = [torch.full_like(p, 7.0) for p in b.parameters()]
    for p, s in zip(b.parameters(), sentinel, strict=True):
        p.grad = s
    outer.step()
    assert all(p.grad is s for p, s in zip(b.parameters(), sentinel, strict=True))
    assert torch.equal(sentinel[0], torch.full_like(sentinel[0], 7.0))  # the users' .grad kept


def test_any_torch_optimizer_as_outer_with_state_dict_round_trip():
    def make(m):
        return DiLoCo(
            m.named_parameters(),
            InProcessHub().connect("x"),
            outer_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2),
        )

    full, _ = _solo_rounds(make, rounds=4)
    half, outer = _solo_rounds(make, rounds=2)
    sd = outer.state_dict()
    assert sd["outer"]["outer_optimizer"]["state"][0]["step"] == 2
    resumed = _model()
    resumed.load_state_dict(half.state_dict())
    outer2 = make(resumed)
    outer2.load_state_dict(sd)
    for rnd in (2, 3):
        _perturb(resumed, rnd)
        outer2.step()
    assert torch.equal(_flat(full), _flat(resumed))
    nesterov, _ = _solo_rounds(
        lambda m: DiLoCo(m.named_parameters(), InProcessHub().connect("x")), rounds=4
    )
    assert not torch.equal(_flat(full), _flat(nesterov))  # Adam really took the steps
    with pytest.raises(ConfigError, match="outer_optimizer"):
        DiLoCo(_model().named_parameters(), InProcessHub().connect("y")).load_state_dict(sd)


def test_outer_optimizer_must_hold_the_same_parameters():
    m = _model()
    with pytest.raises(ConfigError, match="exactly the parameters"):
        DiLoCo(
            m.named_parameters(),
            InProcessHub().connect("x"),
            outer_optimizer=torch.optim.SGD(m[0].parameters(), lr=0.1),
        )


def test_apply_hands_the_aggregate_it_steps_on_to_on_aggregate():
    from sparseloco.aggregate import aggregate
    from sparseloco.codec import ErrorFeedback, encode
    from sparseloco.config import preset

    cfg = preset("covenant-72b")
    m = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.Linear(96, 64))
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    ups = {
        f"p{i}": encode(
            {n: torch.randn(p.shape, generator=g) for n, p in m.named_parameters()},
            ErrorFeedback(cfg.codec),
        )
        for i, g in enumerate(gens)
    }
    got: dict[str, torch.Tensor] = {}
    SparseLoCo(m.named_parameters(), InProcessHub().connect("v"), cfg).apply(
        ups, on_aggregate=got.update
    )
    ref = aggregate(
        ups, reducer=cfg.reducer, clip_to_median=cfg.clip_to_median, backend=cfg.codec.backend
    )
    assert sorted(got) == sorted(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
