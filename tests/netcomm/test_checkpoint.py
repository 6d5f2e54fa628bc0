"""Checkpoints through any storage: round trips, crash safety, and joining by the latest one."""

from __future__ import annotations

import pytest
import torch

import sparseloco
from netcomm import CheckpointError, CheckpointStore, LocalStorage


def trained(kit, momentum=0.9):
    model = kit.tiny_model(3)
    hub = sparseloco.InProcessHub(timeout=1)
    opt = sparseloco.SparseLoCo(model.named_parameters(), hub.connect("p"), momentum=momentum)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        opt.step()
    return model, opt


def assert_tree_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_tree_equal(x, y)
    else:
        assert a == b


def test_roundtrip_sparseloco_state(storage, kit):
    model, opt = trained(kit)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "outer"}
    assert set(sd["state"][0]) == {"theta0", "error", "momentum_buffer"}
    ef = {"x": torch.arange(6.0).reshape(2, 3)}
    store = CheckpointStore(storage)
    store.save(7, model.state_dict(), sd, ef, meta={"tokens": 123, "run": "x"})
    ck = store.load()
    assert ck.step == 7 and store.latest_step() == 7 and store.steps() == [7]
    assert_tree_equal(ck.model, dict(model.state_dict()))
    assert_tree_equal(ck.optimizer, sd)
    assert_tree_equal(ck.error_feedback, ef)
    assert ck.meta == {"tokens": 123, "run": "x"}


def test_new_peer_joins_from_latest(storage, kit):
    model, opt = trained(kit)
    store = CheckpointStore(storage, prefix="run-1/ckpt")
    store.save(1, model.state_dict(), opt.state_dict())
    store.save(2, model.state_dict(), opt.state_dict())
    joiner = kit.tiny_model(99)
    joiner_opt = sparseloco.SparseLoCo(
        joiner.named_parameters(), sparseloco.InProcessHub().connect("j"), momentum=0.9
    )
    ck = store.load()
    joiner.load_state_dict(ck.model)
    joiner_opt.load_state_dict(ck.optimizer)
    assert ck.step == 2 and joiner_opt.window == opt.window == 2
    for a, b in zip(joiner.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    for pa, pb in zip(joiner.parameters(), model.parameters(), strict=True):
        for key in ("theta0", "error", "momentum_buffer"):
            assert torch.equal(joiner_opt.state[pa][key], opt.state[pb][key])


class CrashingStorage(LocalStorage):
    """Fails the n-th put, as a process killed mid-save would."""

    def __init__(self, root, fail_at: int):
        super().__init__(root)
        self.fail_at = fail_at
        self.puts = 0

    def put(self, key, data):
        self.puts += 1
        if self.puts == self.fail_at:
            raise OSError("killed")
        super().put(key, data)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_crash_mid_save_keeps_previous_latest(tmp_path, kit, fail_at):
    model, opt = trained(kit)
    good = CheckpointStore(LocalStorage(tmp_path))
    good.save(1, model.state_dict(), opt.state_dict())
    crashing = CheckpointStore(CrashingStorage(tmp_path, fail_at))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="killed"):
        crashing.save(2, model.state_dict(), opt.state_dict())  # 4 puts: 2 files, manifest, latest
    ck = good.load()
    assert ck.step == 1
    assert good.steps() == ([1, 2] if fail_at == 4 else [1])


def test_corrupted_file_is_detected(tmp_path, kit):
    model, _ = trained(kit)
    storage = LocalStorage(tmp_path)
    store = CheckpointStore(storage)
    store.save(0, model.state_dict())
    key = "checkpoints/000000000000/model.safetensors"
    data = bytearray(storage.get(key))
    data[-1] ^= 1
    storage.put(key, bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        store.load()


def test_no_checkpoint_and_unsupported_values(tmp_path, kit):
    store = CheckpointStore(LocalStorage(tmp_path))
    assert store.latest_step() is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        store.load()
    with pytest.raises(CheckpointError, match="without pickling"):
        store.save(0, {}, {"state": {"f": object()}})
    with pytest.raises(CheckpointError, match="meta is not JSON-serializable"):
        store.save(0, {}, meta={"lr": float("inf")})
    assert store.latest_step() is None


def test_tied_weights_and_tagged_values(tmp_path):
    w = torch.randn(4, 4)
    store = CheckpointStore(LocalStorage(tmp_path))
    opt_state = {"state": {0: {"step": 3, "t": (1, 2.5, None)}}, "$weird": [float("nan")]}
    store.save(5, {"a": w, "b": w}, opt_state)
    ck = store.load()
    assert torch.equal(ck.model["a"], w) and torch.equal(ck.model["b"], w)
    assert ck.optimizer["state"] == {0: {"step": 3, "t": (1, 2.5, None)}}
    assert ck.optimizer["$weird"][0] != ck.optimizer["$weird"][0]  # NaN survives


def test_overlapped_optimizer_with_a_round_in_flight_resumes_from_a_checkpoint(tmp_path, kit):
    """The in-flight window and payload survive the JSON + safetensors split, and the resumed
    optimizer takes the same next boundary as the original."""

    def build():
        model = kit.tiny_model(3)
        hub = sparseloco.InProcessHub(["p"], timeout=1)
        return model, sparseloco.SparseLoCo(
            model.named_parameters(), hub.connect("p"), overlap=True
        )

    def boundary(model, opt, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        opt.step()

    model, opt = build()
    boundary(model, opt, 1)
    boundary(model, opt, 2)  # window 1 in flight
    store = CheckpointStore(LocalStorage(tmp_path / "ck"))
    store.save(2, model.state_dict(), opt.state_dict())
    ck = store.load()
    assert ck.optimizer["outer"]["in_flight"]["window"] == 1
    resumed_model, resumed = build()
    resumed_model.load_state_dict(ck.model)
    resumed.load_state_dict(ck.optimizer)
    for m, o in ((model, opt), (resumed_model, resumed)):
        boundary(m, o, 3)
        o.finish()
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
