"""Atomic rounds: a failed step() or apply() changes nothing, and a retry equals a clean round.

A failure is injected at every tensor position (an exception from that tensor's aggregate, a
corrupt tensor in another peer's payload) and after publishing (the gather raises). Params,
grads, θ₀, error and momentum buffers and the window are compared byte for byte. Overlapped
rounds (``overlap=True``) are held to the same, with the in-flight round (its window and
payload) and the start point s compared too, and a failure of the background gather raised
at the next boundary.

The error-feedback commit after publishing decodes the published message (e ← β·e + Δ −
D(sent)) and so cannot fail or mismatch there: it is checked to leave the encoder's own
buffers bit for bit, and to keep committing when the encoder is not deterministic.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import sparseloco.optim
from sparseloco import (
    BackgroundRoundError,
    CompressedUpdate,
    ConfigError,
    CorruptUpdateError,
    DataParallel,
    DenseUpdate,
    DiLoCo,
    ErrorFeedback,
    ExchangeError,
    GatherResult,
    NonFiniteError,
    OverlapConfig,
    PeerStatus,
    SparseLoCo,
    decode_tensor,
    encode,
    encode_tensor,
    payload_from_tensors,
)
from sparseloco.chunking import ChunkLayout
from sparseloco.config import PRESETS
from sparseloco.serialization import dump_safetensors, load_safetensors

NAMES = ["0.bias", "0.weight", "2.bias", "2.weight"]  # sorted: the aggregation order
METHODS = {
    "sparseloco": lambda m, ex: SparseLoCo(
        m.named_parameters(), ex, codec={"topk": 8}, momentum=0.9, nesterov=True, lr=0.7
    ),
    "sparseloco-offload": lambda m, ex: SparseLoCo(
        m.named_parameters(), ex, codec={"topk": 8}, momentum=0.5, offload=True
    ),
    "diloco": lambda m, ex: DiLoCo(m.named_parameters(), ex),
    "data-parallel": lambda m, ex: DataParallel(m.named_parameters(), ex),
}
OVERLAPPED = {
    "sparseloco": lambda m, ex: SparseLoCo(
        m.named_parameters(),
        ex,
        codec={"topk": 8},
        momentum=0.9,
        nesterov=True,
        lr=0.7,
        overlap=True,
    ),
    # v = 0: the message is encoded in the background, not at the boundary
    "sparseloco-v0": lambda m, ex: SparseLoCo(
        m.named_parameters(),
        ex,
        codec={"topk": 8},
        overlap=OverlapConfig(extrapolation=0.5, own_weight=0.75, message_weight=0.0),
    ),
    "sparseloco-offload": lambda m, ex: SparseLoCo(
        m.named_parameters(), ex, codec={"topk": 8}, momentum=0.5, offload=True, overlap=True
    ),
    "diloco": lambda m, ex: DiLoCo(m.named_parameters(), ex, overlap=True),
}


class Scripted:
    """This peer's exchange: records published bytes; gather returns ``others`` or raises.

    ``by_window`` (what gather returns per window) and ``fail_windows`` pin what a gather
    running on a background thread sees, whenever it runs.
    """

    def __init__(self) -> None:
        self.peer_id = "me"
        self.others: dict = {}
        self.by_window: dict[int, dict] = {}
        self.fail: Exception | None = None
        self.fail_windows: set[int] = set()
        self.fail_publish = False
        self.published: list[tuple[int, bytes]] = []

    def publish(self, window, payload):
        if self.fail_publish:
            raise ExchangeError("storage refused the upload (injected)")
        self.published.append((window, dump_safetensors(*payload.to_tensors())))
        return payload.nbytes

    def gather(self, window):
        if self.fail is not None:
            raise self.fail
        if window in self.fail_windows:
            raise ExchangeError(f"storage unreachable in window {window} (injected)")
        others = self.by_window.get(window, self.others)
        statuses = {p: PeerStatus(p, "ok") for p in others}
        return GatherResult(window=window, updates=dict(others), statuses=statuses)


def _model():
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 70), torch.nn.Tanh(), torch.nn.Linear(70, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def _perturb(model, outer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            if isinstance(outer, DataParallel):
                p.grad = noise
            else:
                p.add_(noise, alpha=0.05)


def _peer_payload(method, model, seed):
    """Another peer's (valid) payload for this round."""
    g = torch.Generator().manual_seed(seed)
    tensors = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    if method.startswith("sparseloco"):
        return encode(tensors, ErrorFeedback(dataclasses.replace(_codec(), topk=8)))
    return DenseUpdate(tensors=tensors)


def _codec():
    return SparseLoCo(_model().parameters(), Scripted()).config.codec


def _corrupt(payload, name):
    """``payload`` with tensor ``name`` made unusable (NaN table / NaN values)."""
    tensors = dict(payload.tensors)
    if isinstance(payload, DenseUpdate):
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        return DenseUpdate(tensors=tensors)
    ct = tensors[name]
    tensors[name] = dataclasses.replace(ct, table=torch.full_like(ct.table, float("nan")))
    return dataclasses.replace(payload, tensors=tensors)


def _snapshot(model, outer):
    snap: dict[str, object] = {"window": outer.window}
    for n, p in model.named_parameters():
        snap[f"param/{n}"] = p.detach().clone()
        if p.grad is not None:
            snap[f"grad/{n}"] = p.grad.clone()
        for key, value in outer.state[p].items():
            snap[f"{key}/{n}"] = value.clone()
    return snap


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.device == y.device, key
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), key
        else:
            assert x == y, key


def _setup(method, others=("b",)):
    """A peer after one committed round, perturbed for round 2, with its other peers."""
    model, ex = _model(), Scripted()
    outer = METHODS[method](model, ex)
    ex.others = {"b": _peer_payload(method, model, 1)}
    _perturb(model, outer, 10)
    outer.step()
    _perturb(model, outer, 11)
    ex.others = {p: _peer_payload(method, model, 2 + i) for i, p in enumerate(others)}
    return model, outer, ex


def _reference(method):
    model, outer, ex = _setup(method)
    outer.step()
    return _snapshot(model, outer), ex.published[-1]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("position", range(len(NAMES)))
def test_failing_aggregate_at_any_tensor_changes_nothing_and_retry_is_clean(method, position):
    model, outer, ex = _setup(method)
    before = _snapshot(model, outer)
    real = outer._aggregate_tensor

    def failing(name, updates, device):
        if name == NAMES[position]:
            raise RuntimeError("out of memory (injected)")
        return real(name, updates, device)

    outer._aggregate_tensor = failing
    with pytest.raises(RuntimeError, match="injected"):
        outer.step()
    _assert_identical(_snapshot(model, outer), before)
    del outer._aggregate_tensor
    outer.step()
    expected, published = _reference(method)
    _assert_identical(_snapshot(model, outer), expected)
    assert ex.published[-2] == ex.published[-1] == published  # the retry resent the same bytes


@pytest.mark.parametrize("method", sorted(METHODS))
def test_failing_gather_after_publishing_changes_nothing(method):
    model, outer, ex = _setup(method)
    before = _snapshot(model, outer)
    ex.fail = ExchangeError("storage unreachable (injected)")
    with pytest.raises(ExchangeError):
        outer.step()
    _assert_identical(_snapshot(model, outer), before)
    ex.fail = None
    outer.step()
    expected, published = _reference(method)
    _assert_identical(_snapshot(model, outer), expected)
    assert ex.published[-2] == ex.published[-1] == published


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("position", range(len(NAMES)))
def test_bad_tensor_in_a_gathered_payload_excludes_that_peer_only(method, position):
    model, outer, ex = _setup(method, others=("b", "c"))
    ex.others["c"] = _corrupt(ex.others["c"], NAMES[position])
    report = outer.step()
    assert report.statuses["c"].status == "invalid"
    assert NAMES[position] in report.statuses["c"].reason
    assert report.peers == ["b", "me"]
    expected, _ = _reference(method)  # the same round with peer b alone
    _assert_identical(_snapshot(model, outer), expected)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("position", range(len(NAMES)))
def test_apply_with_a_bad_tensor_raises_before_changing_anything(method, position):
    model, outer, ex = _setup(method)
    good = ex.others["b"]
    before = _snapshot(model, outer)
    with pytest.raises((CorruptUpdateError, NonFiniteError)) as info:
        outer.apply({"b": good, "c": _corrupt(good, NAMES[position])})
    assert info.value.tensor == NAMES[position]
    _assert_identical(_snapshot(model, outer), before)
    outer.apply({"b": good})
    assert outer.window == before["window"] + 1


def _overlapped_setup(method, others=("b",), fail=(), corrupt=None, poison=None):
    """An overlapped peer at its third boundary: window 0 applied, window 1 in flight.

    Window 1's background round fails if 1 is in ``fail`` (the gather); ``corrupt`` names
    a tensor spoilt in peer c's payload, ``poison`` one whose aggregate raises.
    """
    model, ex = _model(), Scripted()
    outer = OVERLAPPED[method](model, ex)
    ex.fail_windows = set(fail)
    ex.by_window = {
        0: {"b": _peer_payload(method, model, 1)},
        1: {p: _peer_payload(method, model, 2 + i) for i, p in enumerate(others)},
        2: {},
    }
    if corrupt is not None:
        ex.by_window[1]["c"] = _corrupt(ex.by_window[1]["c"], corrupt)
    if poison is not None:
        real, theirs = outer._aggregate_tensor, ex.by_window[1]["b"]

        def failing(name, updates, device):
            if name == poison and updates.get("b") is theirs:  # window 1's aggregate only
                raise RuntimeError("out of memory (injected)")
            return real(name, updates, device)

        outer._aggregate_tensor = failing
    for seed in (10, 11, 12):
        if seed > 10:
            outer.step()
        _perturb(model, outer, seed)
    return model, outer, ex


def _overlapped_snapshot(model, outer):
    # state_dict() first: it waits until the round in flight has committed the error buffers
    flight = outer.state_dict()["outer"].get("in_flight")
    snap = _snapshot(model, outer)  # θ, θ₀, s, error and momentum buffers, window
    snap["in_flight"] = None if flight is None else flight["window"]
    if flight is not None:
        snap["in_flight_payload"] = dump_safetensors(flight["tensors"], flight["meta"])
    return snap


def _published(outer, ex, window):
    """The bytes published for ``window``, once its background round is done."""
    outer.finish()
    return [blob for w, blob in ex.published if w == window]


def _overlapped_reference(method):
    model, outer, ex = _overlapped_setup(method)
    outer.step()
    return _overlapped_snapshot(model, outer), _published(outer, ex, 2)


def _retry_is_clean(method, model, outer, ex):
    outer.step()
    expected, published = _overlapped_reference(method)
    _assert_identical(_overlapped_snapshot(model, outer), expected)
    assert set(_published(outer, ex, 2)) == set(published)


@pytest.mark.parametrize("method", sorted(OVERLAPPED))
@pytest.mark.parametrize("position", range(len(NAMES)))
def test_overlapped_failing_aggregate_changes_nothing_and_retry_is_clean(method, position):
    model, outer, ex = _overlapped_setup(method, poison=NAMES[position])
    before = _overlapped_snapshot(model, outer)
    with pytest.raises(BackgroundRoundError, match="injected") as info:
        outer.step()  # the background aggregate of window 1 failed
    assert (info.value.window, info.value.phase) == (1, "aggregate")
    _assert_identical(_overlapped_snapshot(model, outer), before)
    with pytest.raises(BackgroundRoundError, match="at the boundary"):  # now in the foreground
        outer.step()
    _assert_identical(_overlapped_snapshot(model, outer), before)
    assert not [w for w, _ in ex.published if w == 2]  # a failed boundary publishes nothing
    del outer._aggregate_tensor
    _retry_is_clean(method, model, outer, ex)


@pytest.mark.parametrize("method", sorted(OVERLAPPED))
def test_background_gather_failure_raises_at_the_next_boundary_and_changes_nothing(method):
    model, outer, ex = _overlapped_setup(method, fail=[1])  # window 1's gather fails
    before = _overlapped_snapshot(model, outer)
    with pytest.raises(BackgroundRoundError, match="injected") as info:
        outer.step()
    assert (info.value.window, info.value.phase) == (1, "gather")
    assert isinstance(info.value.__cause__, ExchangeError)
    _assert_identical(_overlapped_snapshot(model, outer), before)
    ex.fail_windows.clear()
    _retry_is_clean(method, model, outer, ex)


def test_background_publish_failure_is_raised_and_the_retry_publishes_again():
    model, outer, ex = _overlapped_setup("sparseloco")
    outer.finish()
    ex.fail_publish = True
    _perturb(model, outer, 13)
    outer.step()  # window 2 is encoded; its publish fails in the background
    before = _overlapped_snapshot(model, outer)
    with pytest.raises(BackgroundRoundError, match="publish") as info:
        outer.finish()
    assert (info.value.window, info.value.phase) == (2, "publish")
    _assert_identical(_overlapped_snapshot(model, outer), before)
    ex.fail_publish = False
    outer.finish()
    assert [w for w, _ in ex.published] == [0, 1, 2]


def _fail_second(monkeypatch, failing):
    """``failing`` (a function sparseloco.optim calls) raises on the second tensor it sees."""
    real, seen = getattr(sparseloco.optim, failing), []

    def fail_second(name, *args, **kwargs):
        seen.append(name)
        if len(seen) == 2:
            raise RuntimeError("out of memory (injected)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(sparseloco.optim, failing, fail_second)


def _window_2(model, outer, monkeypatch=None, failing="commit_tensor"):
    """Finish the set-up's window 1, then train and step window 2 (with ``monkeypatch``,
    ``failing`` raises on the second tensor it sees, in the background round)."""
    outer.finish()
    if monkeypatch is not None:
        _fail_second(monkeypatch, failing)
    _perturb(model, outer, 13)
    outer.step()


def test_failed_encode_at_the_boundary_changes_nothing_and_the_retry_is_clean(monkeypatch):
    """The overlapped boundary encodes its window's message (the start rule needs it)
    before it changes anything: a failure there leaves every tensor as it was and the
    retry publishes what a clean run does."""
    model, outer, ex = _overlapped_setup("sparseloco")
    outer.finish()
    _perturb(model, outer, 13)
    before = _overlapped_snapshot(model, outer)
    _fail_second(monkeypatch, "encode_tensor")
    with pytest.raises(RuntimeError, match="injected"):
        outer.step()
    _assert_identical(_overlapped_snapshot(model, outer), before)
    monkeypatch.undo()
    outer.step()
    clean_model, clean, clean_ex = _overlapped_setup("sparseloco")
    _window_2(clean_model, clean)
    assert _published(outer, ex, 2) == _published(clean, clean_ex, 2)
    _assert_identical(_overlapped_snapshot(model, outer), _overlapped_snapshot(clean_model, clean))


def test_a_failed_encode_after_a_round_run_at_the_boundary_does_not_run_it_again(monkeypatch):
    """A restarted peer runs the in-flight round at its next boundary (publish, gather,
    aggregate); if the encode after it fails, the retry reuses that round: window 1 is
    published once, and the peer ends where one that never stopped does."""
    model, outer, _ = _overlapped_setup("sparseloco")
    saved = outer.state_dict()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    restarted_model, restarted, restarted_ex = _overlapped_setup("sparseloco")
    restarted.finish()
    restarted_model.load_state_dict(params)
    restarted.load_state_dict(saved)
    before = len(restarted_ex.published)
    _fail_second(monkeypatch, "encode_tensor")
    with pytest.raises(RuntimeError, match="injected"):
        restarted.step()
    monkeypatch.undo()
    restarted.step()
    outer.step()
    assert [w for w, _ in restarted_ex.published[before:]].count(1) == 1
    _assert_identical(
        _overlapped_snapshot(restarted_model, restarted), _overlapped_snapshot(model, outer)
    )


def test_the_boundary_times_its_encode_only_when_the_start_needs_the_message():
    for method, expected in (("sparseloco", True), ("sparseloco-v0", False)):
        _, outer, _ = _overlapped_setup(method)
        assert ("encode_message" in outer.step().timings) is expected


@pytest.mark.parametrize(
    ("method", "failing"),
    [
        ("sparseloco-v0", "encode_tensor"),
        ("sparseloco-v0", "commit_tensor"),
        ("sparseloco", "commit_tensor"),  # encoded at the boundary
    ],
)
def test_failed_background_encode_or_commit_is_finished_exactly_once(monkeypatch, method, failing):
    """A window whose encode (or error-buffer commit) failed in the background keeps its Δ
    for what is not done; the retry (here, and in a peer restarted from that state)
    encodes nothing twice, commits only the rest and publishes what a clean run does."""
    model, outer, ex = _overlapped_setup(method)
    _window_2(model, outer, monkeypatch, failing)
    saved = outer.state_dict()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    flight = saved["outer"]["in_flight"]
    done_before = 0 if failing == "encode_tensor" else 1  # the commit failed on the second
    assert flight["window"] == 2 and len(flight["deltas"]) == len(NAMES) - done_before
    assert ("tensors" in flight) == (failing == "commit_tensor")
    with pytest.raises(BackgroundRoundError, match="injected") as info:
        outer.finish()
    assert (info.value.window, info.value.phase) == (2, "encode")
    monkeypatch.undo()
    clean_model, clean, clean_ex = _overlapped_setup(method)
    _window_2(clean_model, clean)
    expected = _published(clean, clean_ex, 2)
    restarted_model, restarted, restarted_ex = _overlapped_setup(method)
    restarted.finish()
    restarted_model.load_state_dict(params)
    restarted.load_state_dict(saved)
    for m, o, e in ((model, outer, ex), (restarted_model, restarted, restarted_ex)):
        assert _published(o, e, 2) == expected  # finished at the boundary this time
        _assert_identical(_overlapped_snapshot(m, o), _overlapped_snapshot(clean_model, clean))


def test_load_state_dict_refuses_while_a_round_runs_in_the_background():
    model, outer, _ = _overlapped_setup("sparseloco")
    outer.finish()
    gate = threading.Event()
    outer.exchange.gather = lambda window: gate.wait(10) and None
    saved = outer.state_dict()
    _perturb(model, outer, 13)
    outer.step()  # window 2's round now waits in gather
    with pytest.raises(ConfigError, match="still running"):
        outer.load_state_dict(saved)
    gate.set()


@pytest.mark.parametrize("method", sorted(OVERLAPPED))
def test_failing_finish_changes_nothing_and_retry_is_clean(method):
    model, outer, ex = _overlapped_setup(method, fail=[1])
    before = _overlapped_snapshot(model, outer)
    with pytest.raises(BackgroundRoundError):
        outer.finish()
    _assert_identical(_overlapped_snapshot(model, outer), before)
    ex.fail_windows.clear()
    outer.finish()
    assert outer.in_flight is None and outer.window == before["window"]
    clean_model, clean, _ = _overlapped_setup(method)
    clean.finish()
    _assert_identical(_overlapped_snapshot(model, outer), _overlapped_snapshot(clean_model, clean))


@pytest.mark.parametrize("method", sorted(OVERLAPPED))
@pytest.mark.parametrize("position", range(len(NAMES)))
def test_overlapped_bad_tensor_in_a_gathered_payload_excludes_that_peer_only(method, position):
    model, outer, _ = _overlapped_setup(method, others=("b", "c"), corrupt=NAMES[position])
    report = outer.step()
    assert report.applied_window == 1
    assert report.statuses["c"].status == "invalid"
    assert NAMES[position] in report.statuses["c"].reason
    assert report.peers == ["b", "me"]
    expected, _ = _overlapped_reference(method)  # the same round with peer b alone
    _assert_identical(_overlapped_snapshot(model, outer), expected)


def _bits(t):
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _delta(outer, p):
    return outer.state[p]["start" if outer.overlap else "theta0"].float() - p.detach().float()


@pytest.mark.parametrize("options", ["", "bf16-error-offload", "overlap"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_commit_leaves_the_error_buffers_the_encoder_made(preset, options):
    """After every round each error buffer equals, bit for bit, the one encode_tensor leaves
    on a copy of it, and the published message is that encode's."""
    model, ex = _model(), Scripted()
    kwargs = {
        "": {},
        "bf16-error-offload": {"error_dtype": "bfloat16", "offload": True},
        "overlap": {"overlap": True},
    }[options]
    outer = SparseLoCo(model.named_parameters(), ex, preset, **kwargs)
    codec = outer.config.codec
    named = dict(model.named_parameters())
    expected_messages = []
    for rnd in range(3):
        _perturb(model, outer, 20 + rnd)
        expected, tensors = {}, {}
        for name, p in named.items():
            error = outer.state[p].get("error")
            work = outer._zero_error(p) if error is None else error.clone()
            tensors[name] = encode_tensor(name, _delta(outer, p), work, codec)
            expected[name] = work
        expected_messages.append(CompressedUpdate(codec=codec, tensors=tensors))
        outer.step()
        outer.state_dict()  # an overlapped round commits the buffers in the background
        for name, p in named.items():
            got = outer.state[p]["error"]
            assert got.dtype == expected[name].dtype and got.device == expected[name].device
            assert torch.equal(_bits(got), _bits(expected[name])), (name, rnd)
    outer.finish()
    published = [blob for _, blob in sorted(ex.published, key=lambda wb: wb[0])]
    assert published == [dump_safetensors(*m.to_tensors()) for m in expected_messages]


def _noisy_encoder(monkeypatch):
    """Make the optimizer's encoder nondeterministic: each call encodes Δ plus fresh noise,
    so no two calls on the same input give the same message."""
    real, noise = encode_tensor, torch.Generator().manual_seed(7)

    def noisy(name, delta, error, config):
        return real(name, delta + 1e-3 * torch.randn(delta.shape, generator=noise), error, config)

    monkeypatch.setattr(sparseloco.optim, "encode_tensor", noisy)
    return noisy


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
@pytest.mark.parametrize("method", ["sparseloco", "sparseloco-offload"])
def test_nondeterministic_encoder_commits_what_was_published(monkeypatch, method, overlap):
    """The old commit re-encoded and raised after publishing when the second encode
    differed, with earlier tensors' buffers already changed. Now every buffer becomes
    β·e + Δ − D(sent) for the message actually published, and the round completes."""
    model, ex = _model(), Scripted()
    outer = (OVERLAPPED if overlap else METHODS)[method](model, ex)
    _perturb(model, outer, 10)
    outer.step()
    noisy = _noisy_encoder(monkeypatch)
    codec = outer.config.codec
    probe = torch.randn(64, 64)
    first, second = (noisy("w", probe, torch.zeros(1, 4096), codec) for _ in range(2))
    assert not torch.equal(first.codes, second.codes) or not torch.equal(first.table, second.table)

    _perturb(model, outer, 11)
    named = dict(model.named_parameters())
    outer.state_dict()  # window 0's error buffers are committed (in the background if overlapped)
    before = {n: outer.state[p]["error"].clone() for n, p in named.items()}
    deltas = {n: _delta(outer, p) for n, p in named.items()}
    report = outer.step()  # no UpdateError after publishing
    assert report.window == 1
    outer.finish()
    (blob,) = [blob for w, blob in ex.published if w == 1]
    sent = payload_from_tensors(*load_safetensors(blob))
    for name, p in named.items():
        layout = ChunkLayout.for_shape(p.shape, codec.chunk_size)
        acc = layout.from_chunks(before[name]) * codec.error_decay + deltas[name]
        want = acc - decode_tensor(name, sent.tensors[name], codec)
        assert torch.equal(_bits(layout.from_chunks(outer.state[p]["error"])), _bits(want)), name
