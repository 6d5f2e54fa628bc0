"""The start's own-message step left to the background (``step(defer_message=True)``).

The boundary then starts the window without −v·α·D(m_k); the background round encodes m_k
and computes that step, and ``apply_message()`` adds it to θ and s during the window
(``OuterLoop`` after the first inner step). It must land where the boundary would have put
it, publish the same bytes, leave the global model alone, survive a checkpoint and refuse
to be forgotten.
"""

from __future__ import annotations

import io
import threading

import pytest
import torch

import sparseloco.optim
from sparseloco import (
    BackgroundRoundError,
    CodecConfig,
    ConfigError,
    ErrorFeedback,
    GatherResult,
    OuterLoop,
    OverlapConfig,
    SparseLoCo,
    decode,
    encode,
    iter_aggregate,
)
from sparseloco.serialization import dump_safetensors

RULE = OverlapConfig(extrapolation=0.5, own_weight=0.5, message_weight=0.75)


class Alone:
    """A peer with no other: keeps the bytes of each publish; gather finds only itself."""

    peer_id = "me"

    def __init__(self):
        self.published: list[tuple[int, bytes]] = []

    def publish(self, window, payload):
        self.published.append((window, dump_safetensors(*payload.to_tensors())))
        return payload.nbytes

    def gather(self, window):
        return GatherResult(window=window)


def _model(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 6))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.to(dtype)


def _peer(dtype=torch.float32, rule=RULE, offload=False):
    model = _model(dtype)
    ex = Alone()
    outer = SparseLoCo(
        model.named_parameters(), ex, codec={"topk": 8}, lr=0.7, overlap=rule, offload=offload
    )
    return model, outer, ex


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype), alpha=0.05)


def _theta(model):
    return [p.detach().clone() for p in model.parameters()]


def _state(model, outer, key):
    return [outer.state[p][key].clone() for p in model.parameters()]


def _close(xs, ys, atol=1e-6):
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def _equal(xs, ys):
    assert all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))


@pytest.mark.parametrize("offload", [False, True])
def test_the_deferred_step_lands_where_the_boundary_puts_it(offload):
    """Two windows, step() at the boundary vs deferred + apply_message(): the same
    published bytes, the same global model bit for bit, the same θ and s up to the order
    of the float32 sums."""
    (m_b, boundary, ex_b), (m_d, deferred, ex_d) = _peer(offload=offload), _peer(offload=offload)
    for window in range(2):
        _perturb(m_b, window), _perturb(m_d, window)
        report_b = boundary.step()
        report_d = deferred.step(defer_message=True)
        assert "encode_message" in report_b.timings and "encode_message" not in report_d.timings
        without = _theta(m_d)
        _equal(_state(m_d, deferred, "start"), without)
        assert deferred.apply_message() is True
        assert deferred.apply_message() is False  # added once
        assert not all(torch.equal(a, b) for a, b in zip(_theta(m_d), without, strict=True))
        _close(_theta(m_d), _theta(m_b))
        _equal(_state(m_d, deferred, "start"), _theta(m_d))  # Δ stays the inner steps' alone
        _equal(_state(m_d, deferred, "theta0"), _state(m_b, boundary, "theta0"))
    report_b, report_d = boundary.finish(), deferred.finish()
    assert {"message_wait", "message"} <= set(report_d.timings)
    assert ex_d.published == ex_b.published and [w for w, _ in ex_d.published] == [0, 1]
    _equal(_state(m_d, deferred, "theta0"), _state(m_b, boundary, "theta0"))
    _close(_theta(m_d), _theta(m_b))


def test_a_bfloat16_model_gets_the_step_in_its_dtype():
    (m_b, boundary, _), (m_d, deferred, _) = _peer(torch.bfloat16), _peer(torch.bfloat16)
    _perturb(m_b, 1), _perturb(m_d, 1)
    boundary.step()
    deferred.step(defer_message=True)
    assert deferred.apply_message()
    for x, y in zip(_theta(m_d), _theta(m_b), strict=True):
        assert x.dtype == torch.bfloat16
        # rounded twice (start, then the step) against once at the boundary: within a
        # unit in the last place of the start, far below the step itself (~0.03)
        torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=2**-8)
    _equal(_state(m_d, deferred, "start"), _theta(m_d))
    boundary.finish(), deferred.finish()


def test_without_a_message_term_there_is_nothing_to_defer():
    model, outer, _ = _peer(rule=OverlapConfig(0.5, 0.75, 0.0))
    _perturb(model, 1)
    outer.step(defer_message=True)
    assert outer.apply_message() is False
    _perturb(model, 2)
    outer.step(defer_message=True)  # nothing was pending
    outer.finish()


def test_the_next_boundary_refuses_a_forgotten_step_and_changes_nothing():
    model, outer, ex = _peer()
    _perturb(model, 1)
    outer.step(defer_message=True)
    _perturb(model, 2)
    before = (_theta(model), _state(model, outer, "start"), _state(model, outer, "theta0"))
    with pytest.raises(ConfigError, match=r"apply_message\(\)"):
        outer.step(defer_message=True)
    assert (outer.window, outer.in_flight) == (1, 0)
    _equal(_theta(model), before[0])
    _equal(_state(model, outer, "start"), before[1])
    _equal(_state(model, outer, "theta0"), before[2])
    assert outer.apply_message()
    outer.step(defer_message=True)
    assert outer.apply_message()
    outer.finish()
    assert [w for w, _ in ex.published] == [0, 1]


def test_finish_drops_a_step_not_yet_added():
    """finish() before apply_message() (τ = 1, or the end of training): the aggregate
    replaces the prediction, θ ← Θ₁ + (θ − s), with s the start without the step."""
    model, outer, _ = _peer()
    _perturb(model, 1)
    outer.step(defer_message=True)
    _perturb(model, 2)
    local = [p - s for p, s in zip(_theta(model), _state(model, outer, "start"), strict=True)]
    outer.finish()
    assert outer.apply_message() is False
    theta1 = _state(model, outer, "theta0")
    _close(_theta(model), [t + d for t, d in zip(theta1, local, strict=True)])


def test_a_pending_step_survives_a_checkpoint():
    """state_dict() taken before the step was added: the restored peer adds the same step
    (computed from the saved payload) and goes on bit-identical."""
    model, outer, ex = _peer()
    _perturb(model, 1)
    outer.step(defer_message=True)
    saved = outer.state_dict()
    assert saved["outer"]["in_flight"]["deferred"] is True
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "outer": saved}, buf)
    restored_model, restored, restored_ex = _peer()
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    restored_model.load_state_dict(loaded["model"])
    restored.load_state_dict(loaded["outer"])
    for m, o in ((model, outer), (restored_model, restored)):
        assert o.apply_message()
        _perturb(m, 2)
        o.step(defer_message=True)
        o.apply_message()
        o.finish()
    _equal(_theta(restored_model), _theta(model))
    _equal(_state(restored_model, restored, "error"), _state(model, outer, "error"))
    assert [w for w, _ in restored_ex.published] == [0, 1]  # window 0 published at its boundary
    assert restored_ex.published == ex.published


def test_a_deferred_flag_of_the_wrong_type_is_refused():
    model, outer, _ = _peer()
    _perturb(model, 1)
    outer.step(defer_message=True)
    saved = outer.state_dict()
    outer.apply_message(), outer.finish()
    saved["outer"]["in_flight"]["deferred"] = 1
    _, fresh, _ = _peer()
    with pytest.raises(ConfigError, match="deferred"):
        fresh.load_state_dict(saved)


def test_a_failed_background_encode_is_made_up_in_the_window(monkeypatch):
    """The round's encode fails: apply_message() encodes the message itself and adds the
    step, the next boundary raises the round's failure and its retry publishes that same
    message. The peer ends where one without the failure does."""
    model, outer, ex = _peer()
    clean_model, clean, clean_ex = _peer()
    real, calls = sparseloco.optim.encode_tensor, []

    def fail_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(sparseloco.optim, "encode_tensor", fail_first)
    _perturb(model, 1), _perturb(clean_model, 1)
    outer.step(defer_message=True)
    clean.step(defer_message=True)
    outer.wait_published()  # the round has failed
    assert outer.apply_message() and "message_encode" in outer._inflight.message_times
    assert clean.apply_message()
    _equal(_theta(model), _theta(clean_model))
    _perturb(model, 2), _perturb(clean_model, 2)
    before = _theta(model)
    with pytest.raises(BackgroundRoundError, match="injected"):
        outer.step(defer_message=True)
    _equal(_theta(model), before)
    outer.step(defer_message=True)  # window 0's round, now in the foreground
    clean.step(defer_message=True)
    for peer in (outer, clean):
        assert peer.apply_message()
        peer.finish()
    assert len(calls) > 1 and ex.published == clean_ex.published  # each message once
    _equal(_theta(model), _theta(clean_model))
    _equal(_state(model, outer, "error"), _state(clean_model, clean, "error"))


def test_a_failure_while_making_the_step_leaves_it_pending(monkeypatch):
    """A restored window makes its step in apply_message(); when that fails nothing
    changes, and the next call adds it."""
    model, outer, _ = _peer()
    _perturb(model, 1)
    outer.step(defer_message=True)
    saved = outer.state_dict()
    outer.apply_message(), outer.finish()
    restored_model, restored, _ = _peer()
    restored_model.load_state_dict(model.state_dict())
    restored.load_state_dict(saved)
    before = _theta(restored_model)
    real = sparseloco.optim.decode_tensor

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(sparseloco.optim, "decode_tensor", failing)
    with pytest.raises(RuntimeError, match="injected"):
        restored.apply_message()
    _equal(_theta(restored_model), before)
    monkeypatch.setattr(sparseloco.optim, "decode_tensor", real)
    assert restored.apply_message()
    assert restored.apply_message() is False
    restored.finish()


def test_the_step_uses_the_learning_rate_of_its_boundary():
    (m_b, boundary, _), (m_d, deferred, _) = _peer(), _peer()
    _perturb(m_b, 1), _perturb(m_d, 1)
    boundary.step()
    deferred.step(defer_message=True)
    for group in deferred.param_groups:  # a schedule moving α after the boundary
        group["lr"] = 0.1
    assert deferred.apply_message()
    _close(_theta(m_d), _theta(m_b))
    boundary.finish(), deferred.finish()


def _train(sync_every, manual, **loop_options):
    """12 inner steps of AdamW, through OuterLoop or a hand-written loop doing the same."""
    model, outer, ex = _peer()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(24, 6, generator=torch.Generator().manual_seed(99))
    reports = []

    def inner_step():
        x = torch.randn(16, 24, generator=g)
        ((model(x) - x @ w) ** 2).mean().backward()
        inner.step()
        inner.zero_grad()

    if manual:
        for step in range(1, 13):
            inner_step()
            if step % sync_every == 0:
                reports.append(outer.step(defer_message=True))
            elif step % sync_every == 1:
                outer.apply_message()
        reports.append(outer.finish())
    else:
        loop = OuterLoop(inner, outer, sync_every=sync_every, **loop_options)
        with loop:
            for _ in range(12):
                inner_step()
        reports = loop.reports
    return _theta(model), reports, ex


def test_outer_loop_adds_the_step_after_the_first_inner_step():
    theta, reports, ex = _train(4, manual=False, defer_message=True)
    expected, _, expected_ex = _train(4, manual=True)
    _equal(theta, expected)
    assert ex.published == expected_ex.published
    assert all("encode_message" not in r.timings for r in reports)
    assert len(reports) == 4  # three boundaries and the finish() at the block's end
    assert all({"message_wait", "message"} <= set(r.timings) for r in reports[1:3])
    assert "message" not in reports[3].timings  # the last window had no inner step


def test_outer_loop_with_one_step_windows_adds_the_step_at_the_boundary():
    """No inner step lies between two boundaries to add it after: the loop does not defer."""
    _, reports, _ = _train(1, manual=False, defer_message=True)
    assert all("encode_message" in r.timings for r in reports[:-1])


def test_outer_loop_adds_the_step_at_the_boundary_by_default():
    _, reports, _ = _train(4, manual=False)
    assert all("encode_message" in r.timings for r in reports[:-1])
    assert all("message" not in r.timings for r in reports)


def test_the_window_waits_for_the_message_not_for_the_commit(monkeypatch):
    """The step is ready once the message is encoded: apply_message() returns while the
    background round still commits the error buffers (and so has published nothing)."""
    model, outer, ex = _peer()
    release, real = threading.Event(), sparseloco.optim.commit_tensor

    def held(*args, **kwargs):
        assert release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(sparseloco.optim, "commit_tensor", held)
    _perturb(model, 1)
    outer.step(defer_message=True)
    assert outer.apply_message()
    assert ex.published == []  # the commit, then the upload, are still to come
    release.set()
    outer.finish()
    assert [w for w, _ in ex.published] == [0]


@pytest.mark.parametrize("reducer", ["mean_selected", "mean"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize(
    "codec",
    [
        {"chunk_size": 8, "topk": 4},
        {"chunk_size": 8, "topk": 4, "value_coding": "ranked", "value_bits": 4},
        {"chunk_size": 8, "topk": 4, "index_coding": "rice"},
        {"chunk_size": 8, "topk": 64},  # dense: every entry sent
    ],
)
def test_the_decoded_message_is_its_aggregate_alone(reducer, clip, codec):
    """SparseLoCo's message step decodes its own message instead of aggregating it alone:
    the same values under either reducer, clipped or not (one peer: factor 1, count 1)."""
    g = torch.Generator().manual_seed(3)
    delta = {"w": torch.randn(24, 40, generator=g), "b": torch.randn(40, generator=g)}
    message = encode(delta, ErrorFeedback(CodecConfig(**codec)))
    alone = dict(iter_aggregate({"me": message}, reducer=reducer, clip_to_median=clip))
    for name, decoded in decode(message).items():
        assert torch.equal(decoded, alone[name])


def _restored(model, outer):
    """A fresh peer loaded from ``model``'s and ``outer``'s state, as after a restart."""
    saved = outer.state_dict()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "outer": saved}, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    fresh_model, fresh, _ = _peer()
    fresh_model.load_state_dict(loaded["model"])
    fresh.load_state_dict(loaded["outer"])
    return fresh_model, fresh


def test_a_checkpoint_keeps_the_learning_rate_of_the_boundary():
    (m_ref, ref, _), (model, outer, _) = _peer(), _peer()
    for m, o in ((m_ref, ref), (model, outer)):
        _perturb(m, 1)
        o.step(defer_message=True)
        for group in o.param_groups:  # a schedule moving α after the boundary
            group["lr"] = 0.1
    restored_model, restored = _restored(model, outer)
    assert ref.apply_message() and restored.apply_message()
    _equal(_theta(restored_model), _theta(m_ref))


class FailSecond(dict):
    """The message steps of a flight, failing on the second tensor taken."""

    def __getitem__(self, name):
        self.taken = getattr(self, "taken", set()) | {name}
        if len(self.taken) == 2:
            raise RuntimeError("out of memory (injected)")
        return super().__getitem__(name)


def test_an_interrupted_apply_adds_each_tensor_once_after_a_restart():
    """apply_message() fails after its first tensor: a retry, here or in a peer restarted
    from the state saved then, adds the other tensors only."""
    (m_ref, ref, _), (model, outer, _) = _peer(), _peer()
    for m, o in ((m_ref, ref), (model, outer)):
        _perturb(m, 1)
        o.step(defer_message=True)
    assert ref.apply_message()
    outer._inflight.message_ready.wait()
    outer._inflight.message_steps = FailSecond(outer._inflight.message_steps)
    with pytest.raises(RuntimeError, match="injected"):
        outer.apply_message()
    restored_model, restored = _restored(model, outer)
    assert len(outer.state_dict()["outer"]["in_flight"]["message_left"]) == 3
    outer._inflight.message_steps = dict(outer._inflight.message_steps)  # the fault passed
    for m, o in ((model, outer), (restored_model, restored)):
        assert o.apply_message()
        _equal(_theta(m), _theta(m_ref))
        _equal(_state(m, o, "start"), _state(m_ref, ref, "start"))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("message_scales", {"0.weight": 0.5}),
        ("message_scales", {}),  # none kept
        ("message_scales", None),
        ("message_left", ["x"]),
    ],
)
def test_malformed_message_state_is_refused(key, value):
    model, outer, _ = _peer()
    _perturb(model, 1)
    outer.step(defer_message=True)
    saved = outer.state_dict()
    outer.apply_message(), outer.finish()
    flight = saved["outer"]["in_flight"]
    if value is None:  # a non-finite scale
        value = dict.fromkeys(flight["message_scales"], float("nan"))
    flight[key] = value
    _, fresh, _ = _peer()
    with pytest.raises(ConfigError, match=key):
        fresh.load_state_dict(saved)


class FailingGather(Alone):
    fail = True

    def gather(self, window):
        if self.fail:
            self.fail = False
            raise RuntimeError("gather failed (injected)")
        return super().gather(window)


def test_a_failed_finish_keeps_the_step_pending():
    model = _model()
    ex = FailingGather()
    outer = SparseLoCo(model.named_parameters(), ex, codec={"topk": 8}, lr=0.7, overlap=RULE)
    _perturb(model, 1)
    outer.step(defer_message=True)
    with pytest.raises(BackgroundRoundError, match="injected"):
        outer.finish()
    assert outer.apply_message()  # still pending: the failed finish() changed nothing
    assert outer.finish() is not None
