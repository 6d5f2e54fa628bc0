"""netcomm.join: a peer joining at window 5 holds what the peers that ran from the start hold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from netcomm import (
    CheckpointError,
    CheckpointStore,
    Ed25519Signer,
    ExchangeConfig,
    LocalStorage,
    ModelSpec,
    PeerRecord,
    StaticDirectory,
    StorageExchange,
    join,
)
from sparseloco import SparseLoCo

FAST = ExchangeConfig(deadline_s=30.0, poll_interval_s=0.01, backoff_s=0.01, backoff_max_s=0.05)
WINDOWS, INNER_STEPS = 5, 3


def model_of(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 70), torch.nn.Tanh(), torch.nn.Linear(70, 2))


class Net:
    """Peers publishing to one LocalStorage (a prefix each), found through one directory."""

    def __init__(self, root):
        self.storage = LocalStorage(root)
        self.directory = StaticDirectory()
        self.spec = ModelSpec.from_module(model_of())

    def record(self, name: str) -> StorageExchange:
        """Put ``name`` in the directory; its exchange."""
        signer = Ed25519Signer.from_seed(name.encode().ljust(32, b"."))
        self.directory.add(PeerRecord(name, self.storage, signer.public_key, prefix=name))
        return StorageExchange(
            name, self.storage, self.directory, signer, self.spec, FAST, prefix=name
        )

    def peer(self, name: str, momentum: float, seed: int = 0):
        exchange = self.record(name)
        model = model_of(seed)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, inner, outer_optimizer(model.named_parameters(), exchange, momentum)


def outer_optimizer(params, exchange, momentum: float) -> SparseLoCo:
    options = {"momentum": momentum, "nesterov": True} if momentum else {}
    return SparseLoCo(params, exchange, codec={"topk": 8}, **options)


def train_window(model, inner, outer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(INNER_STEPS):
        x = torch.randn(16, 12, generator=g)
        ((model(x) - x[:, :2]) ** 2).mean().backward()
        inner.step()
        inner.zero_grad()
    outer.step()


def _run(peers: dict, windows: range, checkpoint=None) -> None:
    """Every peer trains and steps ``windows`` in its own thread (gather waits for the
    others); ``checkpoint`` = (peer, window, store, full): that peer saves after that window."""
    errors = []

    def loop(name, model, inner, outer):
        try:
            for w in windows:
                train_window(model, inner, outer, seed=1000 * w + ord(name[0]))
                if checkpoint and checkpoint[:2] == (name, w):
                    _, _, store, full = checkpoint
                    state = {"outer": outer.state_dict(), "inner": inner.state_dict()}
                    store.save(outer.window, model.state_dict(), state if full else None)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(n, *p)) for n, p in peers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def _same(a, b) -> None:
    """Bit-identical models, θ₀ and momentum, and the same window."""
    (ma, _, oa), (mb, _, ob) = a, b
    assert oa.window == ob.window
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        sa, sb = oa.state[pa], ob.state[pb]
        assert torch.equal(sa["theta0"], sb["theta0"]), name
        assert ("momentum_buffer" in sa) == ("momentum_buffer" in sb), name
        if "momentum_buffer" in sa:
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), name


@pytest.mark.parametrize(
    "case",
    ["new peer, full checkpoint", "new peer, model-only checkpoint", "restart, own checkpoint"],
)
def test_a_peer_joining_at_window_5_ends_bit_identical_and_then_runs_in_step(tmp_path, case):
    """a and b run windows 0-4, one of them checkpointing after window 2; the joiner loads it
    (step 3), replays windows 3 and 4 and then runs window 5 with them: all end identical."""
    net = Net(tmp_path / "bucket")
    momentum = 0.0 if "model-only" in case else 0.5  # a model-only checkpoint has no momentum
    peers = {n: net.peer(n, momentum) for n in ("a", "b")}
    store = CheckpointStore(LocalStorage(tmp_path / "ckpt"))
    saver = "b" if case.startswith("restart") else "a"
    _run(peers, range(WINDOWS), checkpoint=(saver, 2, store, "model-only" not in case))
    assert peers["a"][2].window == WINDOWS

    if case.startswith("restart"):  # b crashed after publishing window 4: it starts over
        joiner = "b"
        net.directory.remove("b")
        peers["b"] = net.peer("b", momentum, seed=7)
    else:
        joiner = "c"
        peers["c"] = net.peer("c", momentum, seed=7)  # another init: the checkpoint matters
    model, inner, outer = peers[joiner]
    report = join(model, outer, store, inner=inner, deadline_s=0.3, own_checkpoint=joiner == "b")

    assert (report.checkpoint, report.window) == (3, WINDOWS)
    assert report.replayed == {3: ["a", "b"], 4: ["a", "b"]}  # b's own updates too
    _same(peers[joiner], peers["a"])
    assert any(("error" in s) for s in outer.state.values()) == (joiner == "b")
    _run(peers, range(WINDOWS, WINDOWS + 1))
    assert sorted(peers[joiner][2].last_report.peers) == sorted(peers)
    for name in peers:
        _same(peers[name], peers["a"])


def test_join_without_a_checkpoint_replays_from_window_0_and_refuses_a_later_one(tmp_path):
    net = Net(tmp_path / "bucket")
    peers = {n: net.peer(n, 0.5) for n in ("a", "b")}
    _run(peers, range(2))
    late = net.peer("c", 0.5)  # the same initial model as a and b
    report = join(
        late[0], late[2], CheckpointStore(LocalStorage(tmp_path / "none")), deadline_s=0.3
    )
    assert (report.checkpoint, report.window) == (None, 2)
    _same(late, peers["a"])

    store = CheckpointStore(LocalStorage(tmp_path / "ckpt"))
    store.save(4, peers["a"][0].state_dict())
    fresh = net.peer("d", 0.5)
    with pytest.raises(CheckpointError, match="past 3"):
        join(fresh[0], fresh[2], store, until=3)


def _state(model, outer) -> dict[str, torch.Tensor]:
    """Parameters, θ₀ and momentum of a plain peer, named as join_worker.py dumps them."""
    out = {"window": torch.tensor([outer.window])}
    for name, p in model.named_parameters():
        out[name] = p.detach().clone()
        for key in ("theta0", "momentum_buffer"):
            out[f"{name}/{key}"] = outer.state[p][key].clone()
    return out


def test_a_two_rank_fsdp2_peer_joins_at_window_5_bit_identical_and_runs_window_5(tmp_path):
    """a and b run windows 0-4 (a checkpoints after window 2); c, an FSDP2 peer of 2 torchrun
    ranks, joins (rank 0 reads, both ranks load their shards and replay windows 3-4), holds
    what a holds, then all three run window 5 and end identical."""
    net = Net(tmp_path / "bucket")
    peers = {n: net.peer(n, 0.5) for n in ("a", "b")}
    store = CheckpointStore(LocalStorage(tmp_path / "ckpt"))
    _run(peers, range(WINDOWS), checkpoint=("a", 2, store, True))
    before = _state(peers["a"][0], peers["a"][2])
    net.record("c")  # a and b now wait for c's window-5 update too
    worker = Path(__file__).with_name("join_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*cmd, str(worker), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group: a kill reaches torchrun's ranks too
    )
    try:
        deadline = time.monotonic() + 120  # c starts slowly: a and b wait for it to join
        while not (tmp_path / "joined.safetensors").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "c did not join in 120 s"
            time.sleep(0.1)
        _run(peers, range(WINDOWS, WINDOWS + 1))
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out.decode()[-3000:]

    joined = load_file(tmp_path / "joined.safetensors")
    for key, value in before.items():
        assert torch.equal(joined[key], value), key
    inner = store.load().optimizer["inner"]["state"]  # the checkpoint's, resharded and back
    for i, (name, _) in enumerate(peers["a"][0].named_parameters()):
        assert torch.equal(joined[f"{name}/inner.exp_avg"], inner[i]["exp_avg"]), name
    final = load_file(tmp_path / "final.safetensors")
    assert sorted(peers["a"][2].last_report.peers) == ["a", "b", "c"]
    for key, value in _state(peers["a"][0], peers["a"][2]).items():
        assert torch.equal(final[key], value), key


def test_an_overlapped_peer_joining_from_a_model_only_checkpoint_starts_its_window_there(tmp_path):
    """θ₀ and the next window's start s both become the checkpoint's model (s left at the
    initial weights would publish their difference as this peer's progress)."""
    net = Net(tmp_path / "bucket")
    store = CheckpointStore(LocalStorage(tmp_path / "ckpt"))
    source = model_of(3)
    store.save(0, source.state_dict(), None)
    model = model_of(7)
    outer = SparseLoCo(model.named_parameters(), net.record("c"), codec={"topk": 8}, overlap=True)
    join(model, outer, store, deadline_s=0.3)
    for p, q in zip(model.parameters(), source.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(outer.state[p]["theta0"], q)
        assert torch.equal(outer.state[p]["start"], q)


def test_joining_from_another_peers_checkpoint_with_a_round_in_flight_is_refused(tmp_path):
    """Loading it would make this peer publish the other peer's in-flight update as its own."""
    net = Net(tmp_path / "bucket")
    store = CheckpointStore(LocalStorage(tmp_path / "ckpt"))
    model = model_of(0)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = SparseLoCo(model.named_parameters(), net.record("a"), codec={"topk": 8}, overlap=True)
    train_window(model, inner, outer, seed=1)  # window 0 is now in flight
    state = {"outer": outer.state_dict(), "inner": inner.state_dict()}
    store.save(outer.window, model.state_dict(), state)
    outer.finish()
    joiner = model_of(7)
    other = SparseLoCo(joiner.named_parameters(), net.record("c"), codec={"topk": 8}, overlap=True)
    with pytest.raises(CheckpointError, match="in flight"):
        join(joiner, other, store, deadline_s=0.3)
    assert other.window == 0 and other.in_flight is None
