"""The outer optimizers: math of one round, multi-peer sync, state round trips, bad input."""

import threading

import pytest
import torch

from sparseloco import (
    ConfigError,
    DataParallel,
    DiLoCo,
    InProcessHub,
    NonFiniteError,
    OuterLoop,
    SparseLoCo,
    aggregate,
    decode,
)


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 6))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def _batches(seed, n, size=16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 6, generator=torch.Generator().manual_seed(99))
    for _ in range(n):
        x = torch.randn(size, 24, generator=g)
        yield x, x @ w


def _train(model, inner, batches):
    losses = []
    for x, y in batches:
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        inner.step()
        inner.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_swarm(n_peers, make_outer, steps, data_seed=lambda i: 100 + i, sync_every=5):
    hub = InProcessHub([f"peer{i}" for i in range(n_peers)], timeout=30)
    models = [_model() for _ in range(n_peers)]
    results = {}

    def peer(i):
        ex = hub.connect(f"peer{i}")
        inner = torch.optim.AdamW(models[i].parameters(), lr=1e-2)
        outer = make_outer(models[i], ex)
        with OuterLoop(inner, outer, sync_every=sync_every if outer.hook == "post" else 1) as loop:
            losses = _train(models[i], inner, _batches(data_seed(i), steps))
        results[i] = (losses, loop.reports)

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(n_peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return models, results


@pytest.mark.parametrize(
    "make_outer",
    [
        lambda m, ex: SparseLoCo(m.named_parameters(), ex, codec={"topk": 32}),
        lambda m, ex: SparseLoCo(m.named_parameters(), ex, "sparseloco-512m", momentum=0.5),
        lambda m, ex: DiLoCo(m.named_parameters(), ex, lr=0.7),
        lambda m, ex: DataParallel(m.named_parameters(), ex),
    ],
    ids=["sparseloco", "sparseloco-momentum", "diloco", "data-parallel"],
)
def test_peers_with_different_data_stay_bit_identical_and_learn(make_outer):
    models, results = run_swarm(3, make_outer, steps=40)
    flats = [_flat(m) for m in models]
    assert all(torch.equal(flats[0], f) for f in flats[1:])
    for losses, reports in results.values():
        assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
        assert all(r.peers == ["peer0", "peer1", "peer2"] for r in reports)
        assert [r.window for r in reports] == list(range(len(reports)))


def test_one_sparseloco_round_equals_the_formula():
    models = [_model(), _model()]
    hub = InProcessHub(timeout=10)
    exchanges = [hub.connect("a"), hub.connect("b")]
    outers = [
        SparseLoCo(m.named_parameters(), ex, codec={"topk": 8}, lr=0.7)
        for m, ex in zip(models, exchanges, strict=True)
    ]
    theta0 = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    deltas = [{n: theta0[n] - p.detach() for n, p in m.named_parameters()} for m in models]
    reports = [None, None]

    def run(i):
        reports[i] = outers[i].step()

    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    # reconstruct: each peer's message from its fresh error buffer (e was 0, so e = Δ)
    from sparseloco import ErrorFeedback, encode

    msgs = {}
    for peer, d in zip("ab", deltas, strict=True):
        msgs[peer] = encode(d, ErrorFeedback(outers[0].config.codec))
    agg = aggregate(msgs, reducer="mean_selected", clip_to_median=True)
    for n, p in models[0].named_parameters():
        torch.testing.assert_close(p.detach(), theta0[n] - 0.7 * agg[n], rtol=0, atol=1e-6)
        e = outers[0].state[p]["error"]
        sent = decode(msgs["a"])[n]
        from sparseloco.chunking import ChunkLayout

        layout = ChunkLayout.for_shape(p.shape, 64)
        torch.testing.assert_close(layout.from_chunks(e), deltas[0][n] - sent, rtol=0, atol=1e-6)
    assert reports[0].bytes_sent == msgs["a"].nbytes
    assert reports[0].bytes_received == msgs["b"].nbytes
    assert set(reports[0].timings) == {"check", "encode", "publish", "gather", "aggregate_step"}
    assert reports[0].backend == "torch" and "cpu" in reports[0].backend_reason


def test_diloco_round_is_nesterov_sgd_on_the_mean():
    m = _model()
    outer = DiLoCo(m.named_parameters(), InProcessHub().connect("solo"), lr=0.5, momentum=0.9)
    theta0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    shift = {n: torch.full_like(p, 0.01) for n, p in m.named_parameters()}
    for _ in range(2):
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.sub_(shift[n])
        outer.step()
    # round 1: buf = g; θ1 = θ0 − lr (g + μ g). round 2: buf = μ g + g; θ2 = θ1 − lr (g + μ buf)
    for n, p in m.named_parameters():
        g = shift[n]
        theta1 = theta0[n] - 0.5 * (g + 0.9 * g)
        theta2 = theta1 - 0.5 * (g + 0.9 * (0.9 * g + g))
        torch.testing.assert_close(p.detach(), theta2, rtol=0, atol=1e-6)


def _solo_run(steps, state=None, split=None):
    m = _model()
    ex = InProcessHub().connect("solo")
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
    outer = SparseLoCo(m.named_parameters(), ex, codec={"topk": 16}, momentum=0.5, nesterov=True)
    loop = OuterLoop(inner, outer, sync_every=4)
    if state is not None:
        m.load_state_dict(state["model"])
        inner.load_state_dict(state["inner"])
        outer.load_state_dict(state["outer"])
        loop.load_state_dict(state["loop"])
    batches = list(_batches(7, steps))
    batches = batches if split is None else batches[split[0] : split[1]]
    with loop:
        _train(m, inner, batches)
    return m, inner, outer, loop


def test_state_dict_round_trip_mid_training_resumes_bit_identically():
    full, *_ = _solo_run(24)
    m, inner, outer, loop = _solo_run(24, split=(0, 10))
    sd = outer.state_dict()
    assert sd["outer"]["window"] == 2
    state = {
        "model": {k: v.clone() for k, v in m.state_dict().items()},
        "inner": inner.state_dict(),
        "outer": sd,
        "loop": loop.state_dict(),
    }
    resumed, _, outer2, _ = _solo_run(24, state=state, split=(10, 24))
    assert torch.equal(_flat(full), _flat(resumed))
    assert outer2.window == 6


def test_load_state_dict_keeps_buffer_dtypes_and_rejects_mismatch():
    m = _model().to(torch.bfloat16)
    outer = SparseLoCo(m.named_parameters(), InProcessHub().connect("x"), codec={"topk": 8})
    p0 = next(iter(m.parameters()))
    assert "error" not in outer.state[p0]  # created by the first round
    with torch.no_grad():
        p0.add_(0.125)
    outer.step()
    assert outer.state[p0]["error"].dtype == torch.float32
    sd = outer.state_dict()
    fresh = SparseLoCo(
        _model().to(torch.bfloat16).named_parameters(),
        InProcessHub().connect("y"),
        codec={"topk": 8},
    )
    fresh.load_state_dict(sd)
    q0 = next(iter(fresh.param_groups[0]["params"]))
    assert fresh.state[q0]["error"].dtype == torch.float32
    assert torch.equal(fresh.state[q0]["error"], outer.state[p0]["error"])
    with pytest.raises(ConfigError, match="diloco"):
        DiLoCo(_model().named_parameters(), InProcessHub().connect("z")).load_state_dict(sd)
    other = SparseLoCo(torch.nn.Linear(3, 3).named_parameters(), InProcessHub().connect("w"))
    with pytest.raises(ConfigError, match=r"groups|shape"):
        other.load_state_dict(sd)


def test_nonfinite_parameter_raises_and_leaves_state_unchanged():
    m = _model()
    outer = SparseLoCo(m.named_parameters(), InProcessHub().connect("x"), codec={"topk": 8})
    with torch.no_grad():
        m[0].weight.add_(0.1)
    outer.step()
    before = {k: v.clone() for k, v in outer.state[m[0].weight].items()}
    with torch.no_grad():
        m[2].bias[1] = float("inf")
    with pytest.raises(NonFiniteError) as info:
        outer.step()
    assert info.value.tensor == "2.bias"
    for k, v in outer.state[m[0].weight].items():
        assert torch.equal(v, before[k])
    assert outer.window == 1


def test_memory_options_offload_and_bf16_error():
    m = _model()
    outer = SparseLoCo(
        m.named_parameters(), InProcessHub().connect("x"), error_dtype="bfloat16", offload=True
    )
    with torch.no_grad():
        m[0].weight.add_(0.1)
    report = outer.step()
    assert report.update_norm > 0
    st = outer.state[m[0].weight]
    assert st["error"].dtype == torch.bfloat16 and st["theta0"].device.type == "cpu"


def test_constructor_validation():
    ex = InProcessHub().connect("x")
    with pytest.raises(ConfigError, match="nesterov"):
        SparseLoCo(_model().parameters(), ex, nesterov=True)
    with pytest.raises(ConfigError, match="exchange"):
        SparseLoCo(_model().parameters(), object())
    with pytest.raises(ConfigError, match="sync_every=1"):
        OuterLoop(
            torch.optim.SGD(_model().parameters(), lr=0.1),
            DataParallel(_model().parameters(), ex),
            sync_every=5,
        )


class _Unselected:
    """An exchange whose selection leaves this peer out and has no other updates."""

    peer_id = "solo"

    def publish(self, window, payload):
        return payload.nbytes

    def gather(self, window):
        from sparseloco import GatherResult

        return GatherResult(window=window, self_selected=False)


def test_round_without_selected_updates_returns_to_theta0():
    m = _model()
    outer = SparseLoCo(m.named_parameters(), _Unselected(), codec={"topk": 8})
    theta0 = _flat(m).clone()
    with torch.no_grad():
        m[0].weight.add_(0.5)
    report = outer.step()
    assert report.peers == []
    assert report.update_norm == 0.0
    assert torch.equal(_flat(m), theta0)
    assert float(outer.state[m[0].weight]["error"].abs().sum()) > 0  # the residual is kept


def test_apply_takes_the_same_step_as_the_peers():
    """A follower that only applies gathered payloads ends equal to a peer that stepped."""
    models = [_model(), _model()]
    hub = InProcessHub(["a", "b"], timeout=10)
    outers = [
        SparseLoCo(m.named_parameters(), hub.connect(pid), codec={"topk": 8}, lr=0.7)
        for m, pid in zip(models, "ab", strict=True)
    ]
    follower_model = _model()
    follower = SparseLoCo(
        follower_model.named_parameters(), hub.observer(), codec={"topk": 8}, lr=0.7
    )
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ts = [threading.Thread(target=o.step) for o in outers]
    [t.start() for t in ts]
    [t.join() for t in ts]
    gathered = follower.exchange.gather(0)
    assert sorted(gathered.updates) == ["a", "b"]
    norm = follower.apply(gathered.updates)
    assert norm > 0
    assert torch.equal(_flat(follower_model), _flat(models[0]))
    assert all("error" not in follower.state[p] for p in follower_model.parameters())
