"""Overlapped rounds: the one-round-delayed outer step keeps every peer on one global model.

Peers run as threads on an :class:`InProcessHub`; a scripted exchange pins the update rule
and error feedback to hand-computed values, and a gated exchange shows that ``step()``
returns while the gather is still running.
"""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch

from sparseloco import (
    ConfigError,
    DenseUpdate,
    DiLoCo,
    ErrorFeedback,
    GatherResult,
    InProcessHub,
    OuterLoop,
    OverlapConfig,
    PeerStatus,
    SparseLoCo,
    decode,
    encode,
)
from sparseloco.serialization import dump_safetensors

N_PEERS = 3
METHODS = {
    "sparseloco": lambda m, ex, **kw: SparseLoCo(
        m.named_parameters(), ex, codec={"topk": 32}, **kw
    ),
    "sparseloco-nesterov": lambda m, ex, **kw: SparseLoCo(
        m.named_parameters(), ex, codec={"topk": 32}, momentum=0.5, nesterov=True, lr=0.7, **kw
    ),
    "sparseloco-torch-sgd": lambda m, ex, **kw: SparseLoCo(
        m.named_parameters(),
        ex,
        codec={"topk": 32},
        outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.8, momentum=0.3),
        **kw,
    ),
    "diloco": lambda m, ex, **kw: DiLoCo(m.named_parameters(), ex, lr=0.7, **kw),
}


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


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _swarm(method, *, overlap, steps=20, sync_every=5, apply_after=None):
    """N peers on different data; returns models, per-peer θ₀ after every round, reports."""
    hub = InProcessHub([f"peer{i}" for i in range(N_PEERS)], timeout=30, keep_windows=16)
    models = [_model() for _ in range(N_PEERS)]
    theta0s: dict[int, list[torch.Tensor]] = {}
    reports: dict[int, list] = {}

    def peer(i):
        outer = METHODS[method](models[i], hub.connect(f"peer{i}"), overlap=overlap)
        inner = torch.optim.AdamW(models[i].parameters(), lr=1e-2)
        seen = theta0s.setdefault(i, [])

        def on_round(report):
            seen.append(_flat(outer.state[p]["theta0"] for p in models[i].parameters()))

        loop = OuterLoop(
            inner, outer, sync_every=sync_every, on_round=on_round, apply_after=apply_after
        )
        with loop:
            for x, y in _batches(100 + i, steps):
                ((models[i](x) - y) ** 2).mean().backward()
                inner.step()
                inner.zero_grad()
        reports[i] = loop.reports

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(N_PEERS)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return hub, models, theta0s, reports


@pytest.mark.parametrize("method", sorted(METHODS))
def test_overlapped_peers_share_the_global_model_and_end_bit_identical(method):
    hub, models, theta0s, reports = _swarm(method, overlap=True)
    _check_swarm(method, hub, models, theta0s)
    for rs in reports.values():
        assert [r.window for r in rs] == [0, 1, 2, 3, 3]  # the last is finish()
        assert [r.applied_window for r in rs] == [None, 0, 1, 2, 3]
        assert all(r.peers == ["peer0", "peer1", "peer2"] for r in rs[1:])
        assert {"wait", "step", "publish", "gather", "aggregate"} <= set(rs[1].timings)


@pytest.mark.parametrize("method", ["sparseloco-nesterov", "diloco"])
def test_streaming_overlap_applies_each_aggregate_tau_steps_into_the_next_window(method):
    hub, models, theta0s, reports = _swarm(method, overlap=True, apply_after=2)
    _check_swarm(method, hub, models, theta0s)
    for rs in reports.values():  # boundaries and finish() calls, in order
        assert [r.applied_window for r in rs] == [None, 0, None, 1, None, 2, None, 3]
        assert [r.window for r in rs] == [0, 0, 1, 1, 2, 2, 3, 3]


def _check_swarm(method, hub, models, theta0s):
    flats = [_flat(m.parameters()) for m in models]
    assert all(torch.equal(flats[0], f) for f in flats[1:])  # after finish(): one model
    for i in range(1, N_PEERS):  # θ₀ after every boundary, not only at the end
        assert all(torch.equal(a, b) for a, b in zip(theta0s[0], theta0s[i], strict=True))
    assert torch.equal(theta0s[0][-1], flats[0])

    # a follower applying g₀, g₁, … in order holds the same model, bit for bit
    follower = _model()
    outer = METHODS[method](follower, hub.observer())
    observer = hub.observer()
    for window in range(4):
        outer.apply(observer.gather(window).updates)
    assert torch.equal(_flat(follower.parameters()), flats[0])


def test_overlapped_sparseloco_learns_as_well_as_blocking_at_equal_steps():
    x, y = next(_batches(999, 1, size=256))  # held out
    loss = {}
    for overlap in (False, True):
        _, models, _, _ = _swarm("sparseloco", overlap=overlap, steps=40)
        with torch.no_grad():
            loss[overlap] = float(((models[0](x) - y) ** 2).mean())
    with torch.no_grad():
        start = float(((_model()(x) - y) ** 2).mean())
    assert loss[True] != loss[False]  # another trajectory (the delay) ...
    assert loss[True] < 0.3 * start and loss[True] < 1.1 * loss[False]  # ... as good


class Scripted:
    """This peer's exchange; gather(w) returns ``by_window[w]`` (other peers' payloads)."""

    def __init__(self, by_window):
        self.peer_id = "me"
        self.by_window = by_window
        self.published: list[tuple[int, object]] = []

    def publish(self, window, payload):
        self.published.append((window, payload))
        return payload.nbytes

    def gather(self, window):
        others = self.by_window[window]
        statuses = {p: PeerStatus(p, "ok") for p in others}
        return GatherResult(window=window, updates=dict(others), statuses=statuses)


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.05)


def _dense(model, seed):
    g = torch.Generator().manual_seed(seed)
    return DenseUpdate(
        {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    )


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _diloco(model, others, rule):
    return DiLoCo(
        model.named_parameters(),
        Scripted(others),
        lr=0.5,
        momentum=0.0,
        nesterov=False,
        overlap=rule,
    )


@pytest.mark.parametrize(
    "rule", [True, OverlapConfig.local(), OverlapConfig(0.3, 0.6, 0.0), OverlapConfig(0.3, 0.6)]
)
def test_overlapped_diloco_follows_the_delayed_update_rule(rule):
    """DiLoCo's message is Δ itself (float32 on the wire), so D(m_k) = Δ_k."""
    a, w, v = (
        (0.0, 1.0, 0.0)
        if rule is True
        else (rule.extrapolation, rule.own_weight, rule.message_weight)
    )
    model = _model()
    others = {k: {"b": _dense(model, 50 + k)} for k in range(2)}
    outer = _diloco(model, others, rule)
    theta0 = _params(model)  # Θ₀ = s₀
    _perturb(model, 1)
    d0 = {n: theta0[n] - p for n, p in _params(model).items()}  # Δ₀ = s₀ − θ
    ended = _params(model)
    outer.step()  # publishes Δ₀, nothing to apply: θ ← Θ₀ − v·α·Δ₀ − w·Δ₀ (local: θ stays)
    s1 = _params(model)
    for n, p in s1.items():
        if (w, v) == (1.0, 0.0):
            assert torch.equal(p, ended[n])
        torch.testing.assert_close(p, theta0[n] - (w + 0.5 * v) * d0[n], rtol=0, atol=1e-6)
    _perturb(model, 2)
    d1 = {n: s1[n] - p for n, p in _params(model).items()}  # Δ₁ = s₁ − θ
    outer.step()  # Θ₁ = Θ₀ − α·mean(Δ₀, B₀);  θ ← Θ₁ + a·(Θ₁ − Θ₀) − v·α·Δ₁ − w·Δ₁
    theta1 = {n: theta0[n] - 0.5 * (d0[n] + others[0]["b"].tensors[n]) / 2 for n in theta0}
    for n, p in _params(model).items():
        start = theta1[n] + a * (theta1[n] - theta0[n]) - (w + 0.5 * v) * d1[n]
        torch.testing.assert_close(p, start, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            outer.state[dict(model.named_parameters())[n]]["theta0"], theta1[n], rtol=0, atol=1e-6
        )
    assert outer.in_flight == 1
    outer.finish()  # Θ₂ = Θ₁ − α·mean(Δ₁, B₁);  θ ← Θ₂ (no inner steps since the boundary)
    named = dict(model.named_parameters())
    for n, p in _params(model).items():
        theta2 = theta1[n] - 0.5 * (d1[n] + others[1]["b"].tensors[n]) / 2
        torch.testing.assert_close(p, theta2, rtol=0, atol=1e-6)
        assert torch.equal(p, outer.state[named[n]]["theta0"])
        assert torch.equal(p, outer.state[named[n]]["start"])
    assert outer.in_flight is None and outer.finish() is None


def test_a_window_after_a_mid_window_finish_starts_from_the_prediction_too():
    """finish() τ steps in keeps its step Θ₀ → Θ₁ (state "last_step", saved with the
    state) for the next boundary: θ ← Θ₁ + a·(Θ₁ − Θ₀) − v·α·Δ₁ − w·Δ₁."""
    a, w, v = 0.3, 0.6, 0.4
    model = _model()
    others = {k: {"b": _dense(model, 70 + k)} for k in range(2)}
    outer = _diloco(model, others, OverlapConfig(a, w, v))
    theta0 = _params(model)
    _perturb(model, 1)
    d0 = {n: theta0[n] - p for n, p in _params(model).items()}
    outer.step()  # θ ← Θ₀ − v·α·Δ₀ − w·Δ₀ = s₁
    s1 = _params(model)
    _perturb(model, 2)  # τ inner steps into window 1
    before = _params(model)
    outer.finish()  # Θ₁ = Θ₀ − α·mean(Δ₀, B₀);  θ ← Θ₁ + (θ − s₁);  s₁ ← Θ₁
    theta1 = {n: theta0[n] - 0.5 * (d0[n] + others[0]["b"].tensors[n]) / 2 for n in theta0}
    for n, p in _params(model).items():
        torch.testing.assert_close(p, theta1[n] + before[n] - s1[n], rtol=0, atol=1e-6)
    _perturb(model, 3)  # the rest of window 1
    d1 = {n: theta1[n] - p for n, p in _params(model).items()}  # Δ₁ = s₁ − θ
    saved = outer.state_dict()
    copy = _model()
    copy.load_state_dict(model.state_dict())
    resumed = _diloco(copy, others, OverlapConfig(a, w, v))
    resumed.load_state_dict(saved)
    outer.step()  # nothing in flight: θ ← Θ₁ + a·(Θ₁ − Θ₀) − v·α·Δ₁ − w·Δ₁
    resumed.step()
    for (n, p), q in zip(_params(model).items(), copy.parameters(), strict=True):
        start = theta1[n] + a * (theta1[n] - theta0[n]) - (w + 0.5 * v) * d1[n]
        torch.testing.assert_close(p, start, rtol=0, atol=1e-6)
        assert torch.equal(p, q)  # the kept step came back with the state
    assert all("last_step" not in outer.state[p] for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_message_term_is_the_own_sparse_message_decoded(dtype):
    """SparseLoCo with a = 0, w = 0, v = 1 starts window 1 from Θ₀ − α·D(m₀): the step the
    message it published would make alone, its top-k values only (zero elsewhere); a
    bfloat16 model gets it rounded once to its dtype."""
    model = _model().to(dtype)
    ex = Scripted({})
    rule = OverlapConfig(extrapolation=0.0, own_weight=0.0, message_weight=1.0)
    outer = SparseLoCo(model.named_parameters(), ex, codec={"topk": 8}, lr=0.7, overlap=rule)
    theta0 = _params(model)
    _perturb(model, 5)
    outer.step()
    outer.wait_published()
    ((window, sent),) = ex.published
    decoded = decode(sent)
    assert window == 0
    assert any(int(t.count_nonzero()) < t.numel() for t in decoded.values())
    for n, p in _params(model).items():
        expected = (theta0[n].float() - 0.7 * decoded[n]).to(dtype)
        if dtype == torch.float32:
            torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
        else:
            assert p.dtype == dtype
            torch.testing.assert_close(p, expected)


def test_error_feedback_under_the_delay_sees_each_window_once():
    """Published messages and error buffers equal a standalone ErrorFeedback run over
    Δ₀, Δ₁, … (each window's own progress from its start point), bit for bit."""
    model = _model()
    others = {w: {"b": _dense(model, 60 + w)} for w in range(4)}
    ex = Scripted({})
    outer = SparseLoCo(model.named_parameters(), ex, codec={"topk": 8}, overlap=True)
    for w in range(4):
        ex.by_window[w] = {"b": encode(others[w]["b"].tensors, ErrorFeedback(outer.config.codec))}
    ef = ErrorFeedback(outer.config.codec)
    named = dict(model.named_parameters())
    expected = []
    for w in range(4):
        _perturb(model, 10 + w)
        delta = {n: outer.state[p]["start"] - p.detach() for n, p in named.items()}
        expected.append(encode(delta, ef))
        outer.step()  # the round encodes and commits the buffers in the background
        state = outer.state_dict()["state"]  # ... which state_dict() waits for
        for i, n in enumerate(named):
            assert torch.equal(state[i]["error"], ef.buffers[n])
    outer.finish()  # the last publish is done
    assert [w for w, _ in sorted(ex.published, key=lambda x: x[0])] == [0, 1, 2, 3]
    for (_, sent), exp in zip(sorted(ex.published, key=lambda x: x[0]), expected, strict=True):
        assert dump_safetensors(*sent.to_tensors()) == dump_safetensors(*exp.to_tensors())


class Gated(Scripted):
    """gather(w) blocks until ``release`` is set."""

    def __init__(self, by_window):
        super().__init__(by_window)
        self.release = threading.Event()
        self.started = threading.Event()

    def gather(self, window):
        self.started.set()
        assert self.release.wait(10)
        return super().gather(window)


def test_step_returns_while_the_gather_runs_and_applies_it_at_the_next_boundary():
    model = _model()
    ex = Gated({0: {"b": _dense(model, 7)}})
    outer = DiLoCo(model.named_parameters(), ex, overlap=True)
    _perturb(model, 1)
    report = outer.step()
    assert report.applied_window is None and outer.in_flight == 0
    assert ex.started.wait(10) and not ex.release.is_set()  # gather running, step returned
    _perturb(model, 2)
    threading.Timer(0.2, ex.release.set).start()
    ex.by_window[1] = {"b": _dense(model, 8)}
    report = outer.step()
    assert report.applied_window == 0 and report.peers == ["b", "me"]
    assert report.timings["wait"] >= 0.1  # this boundary waited for the gather
    ex.release.set()


def test_state_dict_carries_the_in_flight_round():
    def build():
        model = _model()
        others = {w: {"b": _dense(model, 70 + w)} for w in range(3)}
        outer = DiLoCo(model.named_parameters(), Scripted(others), momentum=0.9, overlap=True)
        return model, outer

    def boundary(model, outer, seed):
        _perturb(model, seed)
        outer.step()

    model, outer = build()
    boundary(model, outer, 1)
    boundary(model, outer, 2)  # window 1 in flight
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "outer": outer.state_dict()}, buf)
    assert outer.state_dict()["outer"]["in_flight"]["window"] == 1
    boundary(model, outer, 3)
    outer.finish()

    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed, other = build()
    resumed.load_state_dict(saved["model"])
    other.load_state_dict(saved["outer"])
    assert other.in_flight == 1 and other.window == 2
    boundary(resumed, other, 3)  # gathers window 1 in the foreground, then as before
    other.finish()
    assert torch.equal(_flat(resumed.parameters()), _flat(model.parameters()))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        for key, value in outer.state[p].items():
            assert torch.equal(value, other.state[q][key]), key


class SlowPublish(Scripted):
    """publish blocks until ``release`` is set."""

    def __init__(self, by_window):
        super().__init__(by_window)
        self.release = threading.Event()

    def publish(self, window, payload):
        assert self.release.wait(10)
        return super().publish(window, payload)


def test_wait_published_returns_once_the_upload_is_done():
    model = _model()
    ex = SlowPublish({0: {"b": _dense(model, 7)}})
    outer = DiLoCo(model.named_parameters(), ex, overlap=True)
    assert outer.wait_published(timeout=0)  # nothing in flight
    _perturb(model, 1)
    outer.step()
    assert not outer.wait_published(timeout=0.2)  # still uploading
    ex.release.set()
    assert outer.wait_published(timeout=10) and [w for w, _ in ex.published] == [0]
    outer.finish()


def test_apply_after_without_waiting_applies_once_the_round_has_arrived():
    model = _model()
    ex = Gated({w: {"b": _dense(model, 40 + w)} for w in range(3)})
    outer = DiLoCo(model.named_parameters(), ex, overlap=True)
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ConfigError, match="apply_after"):
        OuterLoop(inner, outer, sync_every=4, wait=False)
    loop = OuterLoop(inner, outer, sync_every=4, apply_after=1, wait=False)
    batches = _batches(1, 16)

    def train(steps):
        for _ in range(steps):
            x, y = next(batches)
            ((model(x) - y) ** 2).mean().backward()
            inner.step()
            inner.zero_grad()

    with loop:
        train(4)  # boundary: window 0 in flight, its gather held at the gate
        train(2)  # steps 1 and 2 of window 1 go on without it
        assert outer.in_flight == 0 and [r.applied_window for r in loop.reports] == [None]
        ex.release.set()
        for _ in range(1000):
            if outer.round_ready():
                break
            threading.Event().wait(0.01)
        train(1)  # the first step after it arrived applies it
        assert outer.in_flight is None and loop.reports[-1].applied_window == 0
        train(1)  # boundary: window 1's round starts, nothing left to apply there
        assert loop.reports[-1].applied_window is None and outer.in_flight == 1


def test_global_parameters_are_the_global_model_not_the_local_one():
    model = _model()
    others = {w: {"b": _dense(model, 7 + w)} for w in range(2)}
    outer = DiLoCo(model.named_parameters(), Scripted(others), overlap=True)
    for seed in (1, 2):  # window 0 applied at the second boundary, window 1 in flight
        _perturb(model, seed)
        outer.step()
    theta = dict(model.named_parameters())
    named = dict(outer.global_parameters())
    assert list(named) == list(theta)
    for name, p in theta.items():  # Θ = θ₀; the parameters carry window 1's own progress
        assert named[name] is outer.state[p]["theta0"] and not torch.equal(named[name], p)
    outer.finish()
    for name, value in outer.global_parameters():  # nothing local left: θ = Θ
        assert torch.equal(value, theta[name])


def test_mode_checks():
    inner = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="overlap=True"):
        OuterLoop(inner, DiLoCo(_model().named_parameters(), Scripted({})), apply_after=2)
    overlapped = DiLoCo(_model().named_parameters(), Scripted({}), overlap=True)
    with pytest.raises(ConfigError, match="apply_after"):
        OuterLoop(inner, overlapped, sync_every=5, apply_after=6)
    model = _model()
    blocking = DiLoCo(model.named_parameters(), Scripted({}))
    overlapped = DiLoCo(_model().named_parameters(), Scripted({0: {}}), overlap=True)
    with pytest.raises(ConfigError, match="overlap"):
        overlapped.load_state_dict(blocking.state_dict())
    with pytest.raises(ConfigError, match="overlap"):
        blocking.load_state_dict(overlapped.state_dict())
    overlapped.step()
    with pytest.raises(ConfigError, match="finish"):
        overlapped.apply({})
    overlapped.finish()
    overlapped.apply({})
    assert overlapped.window == 2


@pytest.mark.parametrize(
    "fields",
    [{"extrapolation": -0.1}, {"own_weight": 1.5}, {"extrapolation": True}, {"own_weight": "1"}],
)
def test_overlap_config_refuses_values_outside_its_range(fields):
    with pytest.raises(ConfigError):
        OverlapConfig(**fields)


def test_overlap_must_be_a_bool_or_an_overlap_config():
    model = _model()
    with pytest.raises(ConfigError, match="OverlapConfig"):
        SparseLoCo(model.named_parameters(), Scripted({}), overlap=1)
    outer = SparseLoCo(model.named_parameters(), Scripted({}), overlap=True)
    assert outer.overlap and outer.overlap_config == OverlapConfig()
    assert SparseLoCo(model.named_parameters(), Scripted({})).overlap_config is None
    diloco = DiLoCo(model.named_parameters(), Scripted({}), overlap=True)
    assert diloco.overlap_config == OverlapConfig.local()


def test_loading_a_state_without_a_kept_step_drops_the_one_held():
    """A finish() keeps its step for the next boundary; loading an earlier state (which has
    none) must not leave it behind, or the next step differs from a fresh process's."""
    rule = OverlapConfig(0.5, 0.75)
    model = _model()
    others = {k: {"b": _dense(model, 80 + k)} for k in range(3)}
    outer = _diloco(model, others, rule)
    _perturb(model, 1)
    outer.step()
    saved = copy.deepcopy(outer.state_dict())  # as a checkpoint holds it (torch's is live)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _perturb(model, 2)
    outer.finish()
    assert all("last_step" in outer.state[p] for p in model.parameters())
    model.load_state_dict(weights)
    outer.load_state_dict(saved)
    assert all("last_step" not in outer.state[p] for p in model.parameters())
