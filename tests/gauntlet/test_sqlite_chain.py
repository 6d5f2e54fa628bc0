"""The SQLite chain: same rules as the in-memory one, shared by real processes, crash-safe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gauntlet import (
    Chain,
    ChainError,
    InMemorySubnet,
    SqliteSubnet,
    WeightLimits,
    yuma_consensus,
)

LIMITS = WeightLimits(0.6, 2, rate_limit=5, version_key=3)


def _fill(net: InMemorySubnet | SqliteSubnet) -> None:
    for i in range(4):
        net.register(f"m{i}")
    net.register("val", stake=10.0)


@pytest.fixture(params=["memory", "sqlite"])
def net(request, tmp_path: Path) -> InMemorySubnet | SqliteSubnet:
    if request.param == "memory":
        subnet = InMemorySubnet(netuid=7, limits=LIMITS)
    else:
        subnet = SqliteSubnet(tmp_path / "chain.sqlite", netuid=7, limits=LIMITS)
    _fill(subnet)
    return subnet


def test_both_backends_apply_the_same_rules(net):
    chain = net.connect("val")
    assert isinstance(chain, Chain)
    mg = chain.metagraph()
    assert mg.uids == [0, 1, 2, 3, 4] and mg.uid_of("val") == 4 and mg.stakes[4] == 10.0
    assert mg.validator_permit == [False] * 4 + [True]
    verdicts = [
        chain.set_weights([0, 1], [1, 1], version_key=2),
        chain.set_weights([0], [1], version_key=3),
        chain.set_weights([0, 1], [65535, 10], version_key=3),
        chain.set_weights([0, 0], [1, 1], version_key=3),
        chain.set_weights([0, 9], [1, 1], version_key=3),
        net.connect("m0").set_weights([1, 2], [1, 1], version_key=3),
        net.connect("nobody").set_weights([1, 2], [1, 1], version_key=3),
    ]
    assert [v.success for v in verdicts] == [False] * 7
    assert "max_weight_limit" in verdicts[2].message
    assert chain.set_weights([0, 1], [65535, 65535], version_key=3).success
    assert "rate limit" in chain.set_weights([0, 1], [1, 1], version_key=3).message
    net.advance(5)
    assert chain.set_weights([0, 1, 2], [3, 3, 3], version_key=3).success
    names, stakes, w = net.weight_matrix()
    assert names == ["val"] and stakes.tolist() == [10.0]
    assert np.allclose(w[0], [1 / 3, 1 / 3, 1 / 3, 0, 0])
    assert yuma_consensus(w, stakes).validator_trust[0] == pytest.approx(1.0)


def test_both_backends_check_commitments(net):
    chain = net.connect("m1")
    chain.commit("bucket:abc")
    chain.commit("bucket:def")
    assert net.connect("val").get_commitment("m1") == "bucket:def"
    assert net.connect("val").get_commitment("m2") is None
    assert chain.get_all_commitments() == {"m1": "bucket:def"}
    with pytest.raises(ChainError, match="128"):
        chain.commit("x" * 129)
    with pytest.raises(ChainError, match="not registered"):
        net.connect("stranger").commit("hi")


def test_both_backends_hash_only_produced_blocks(net):
    a, b = net.connect("val"), net.connect("m0")
    with pytest.raises(ChainError, match="has not been produced"):
        a.block_hash(1)
    with pytest.raises(ChainError, match="has not been produced"):
        a.block_hash(-1)
    genesis = a.block_hash(0)
    assert genesis.startswith("0x") and len(genesis) == 66 and int(genesis, 16) >= 0
    net.advance(3)
    hashes = [a.block_hash(n) for n in range(4)]
    assert hashes[0] == genesis  # drawn once, then kept
    assert [b.block_hash(n) for n in range(4)] == hashes  # every handle reads the same
    assert len(set(hashes)) == 4


def test_register_is_idempotent_and_updates_stake(tmp_path):
    net = SqliteSubnet(tmp_path / "c.sqlite")
    assert net.register("a") == 0 and net.register("b", 1.0) == 1
    assert net.register("a", 2.5) == 0
    assert net.metagraph().stakes == [2.5, 1.0]


def test_wall_clock_blocks(tmp_path):
    net = SqliteSubnet(tmp_path / "c.sqlite", block_time_s=0.05)
    first = net.block()
    time.sleep(0.2)
    assert net.block() >= first + 2
    before = net.block()
    assert net.advance(100) >= before + 100


def test_idle_time_is_skipped_only_when_every_named_node_waits(tmp_path):
    path = tmp_path / "c.sqlite"
    net = SqliteSubnet(path, block_time_s=1000.0)  # the wall clock does not move here
    a, b = net.connect("a"), SqliteSubnet(path, block_time_s=1000.0).connect("b")
    a.idle_until(10)
    b.idle_until(10)
    assert net.block() == 0  # nothing skips before skip_idle names the nodes
    net.skip_idle(["a", "b", "c"])
    c = net.connect("c")
    a.idle_until(10)
    b.idle_until(20)
    assert net.block() == 0  # c has not said it waits: it may still be working
    c.idle_until(30)
    assert net.block() == 10  # the earliest block awaited, moved by c's own transaction
    a.busy()  # a woke up; b and c still wait
    c.busy()
    c.idle_until(30)
    assert net.block() == 10
    a.finished()  # a stopped: only b and c count now, and both wait
    assert net.block() == 20
    b.busy()
    b.idle_until(20)  # a block already reached: b is about to wake, not idle
    assert net.block() == 20
    b.finished()
    assert net.block() == 30
    c.finished()
    assert net.block() == 30  # nobody waits for anything: nothing moves
    net.skip_idle(["a", "b", "c"])  # a new run in the same file: every node starts over
    a.idle_until(40)
    assert net.block() == 30


def test_resume_keeps_history_and_refuses_other_parameters(tmp_path):
    path = tmp_path / "c.sqlite"
    net = SqliteSubnet(path, netuid=7, limits=LIMITS)
    _fill(net)
    net.connect("m0").commit("hello")
    assert net.connect("val").set_weights([0, 1, 2], [1, 1, 1], version_key=3).success
    net.advance(3)
    net.close()
    again = SqliteSubnet(path, netuid=7, limits=LIMITS)
    assert again.metagraph().hotkeys == ["m0", "m1", "m2", "m3", "val"]
    assert again.block() == 3 and again.commitments() == {"m0": "hello"}
    # the rate limit survives the restart: 3 blocks since the last set, 5 needed
    assert not again.connect("val").set_weights([0, 1], [1, 1], version_key=3).success
    with pytest.raises(ChainError, match=r"other parameters.*netuid"):
        SqliteSubnet(path, netuid=8, limits=LIMITS)
    with pytest.raises(ChainError, match="limits"):
        SqliteSubnet(path, netuid=7)
    with pytest.raises(ChainError, match="block_time_s"):
        SqliteSubnet(path, netuid=7, limits=LIMITS, block_time_s=12.0)


def test_not_a_database_is_a_chain_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ChainError, match="cannot open the local chain"):
        SqliteSubnet(bad)


_WORKER = textwrap.dedent(
    """
    import sys
    from gauntlet import SqliteSubnet, WeightLimits
    path, me, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    net = SqliteSubnet(path, limits=WeightLimits(rate_limit=0), busy_timeout_s=60)
    net.register(me, stake=1.0)
    chain = net.connect(me)
    for i in range(rounds):
        uid = net.register(f"{me}-r{i}")
        chain.commit(f"{me}:{i}")
        n = len(chain.metagraph().uids)
        assert chain.set_weights(list(range(n)), [1] * n).success
        print(uid, flush=True)
    """
)


def _spawn(path: Path, me: str, rounds: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(path), me, str(rounds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_concurrent_writer_processes_keep_the_file_consistent(tmp_path):
    path = tmp_path / "shared.sqlite"
    SqliteSubnet(path, limits=WeightLimits(rate_limit=0)).close()
    procs = [_spawn(path, f"w{k}", 25) for k in range(4)]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    net = SqliteSubnet(path, limits=WeightLimits(rate_limit=0))
    assert net.integrity_check() == "ok"
    mg = net.metagraph()
    assert mg.uids == list(range(4 + 4 * 25))  # dense uids: no two writers took the same one
    assert len(set(mg.hotkeys)) == len(mg.hotkeys)
    assert net.commitments() == {f"w{k}": f"w{k}:24" for k in range(4)}
    names, _stakes, w = net.weight_matrix()
    assert sorted(names) == [f"w{k}" for k in range(4)]
    assert np.allclose(w.sum(axis=1), 1.0)


def test_concurrent_readers_agree_on_block_hashes(tmp_path):
    """Four connections (SQLite treats them as it treats processes) race to draw each hash."""
    path = tmp_path / "hashes.sqlite"
    SqliteSubnet(path).advance(19)
    barrier = threading.Barrier(4)

    def read() -> list[str]:
        net = SqliteSubnet(path, busy_timeout_s=60)
        barrier.wait()
        return [net.block_hash(n) for n in range(20)]

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: read(), range(4)))
    assert outs[0] == outs[1] == outs[2] == outs[3]
    assert outs[0] == [SqliteSubnet(path).block_hash(n) for n in range(20)]
    assert len(set(outs[0])) == 20


def test_a_writer_killed_mid_loop_loses_nothing_it_committed(tmp_path):
    path = tmp_path / "crash.sqlite"
    SqliteSubnet(path, limits=WeightLimits(rate_limit=0)).close()
    proc = _spawn(path, "victim", 100_000)
    done = [int(proc.stdout.readline()) for _ in range(30)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    net = SqliteSubnet(path, limits=WeightLimits(rate_limit=0))
    assert net.integrity_check() == "ok"
    hotkeys = net.metagraph().hotkeys
    assert all(hotkeys[uid] == f"victim-r{i}" for i, uid in enumerate(done))
    # still writable after the crash
    assert net.register("after") == len(hotkeys)
