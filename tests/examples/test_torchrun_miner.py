"""examples/torchrun_miner.py: a 2-rank FSDP2 peer (torchrun, gloo) beside a 1-process peer."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "torchrun_miner.py"
ARGS = ["--steps", "12", "--sync-every", "4", "--peers", "miner-0,miner-1", "--deadline", "60"]
LINE = re.compile(r"window +(\d+)  loss ([\d.]+)  sent (\d+) B  peers (\S+)  ranks (\d)")


def test_a_two_rank_fsdp2_peer_and_a_plain_peer_train_together_and_end_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    common = [str(SCRIPT), *ARGS, "--storage", str(tmp_path)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmds = {
        "miner-0": [*torchrun, "--nproc-per-node", "2", *common, "--peer", "miner-0"],
        "miner-1": [sys.executable, *common, "--peer", "miner-1"],
    }
    procs = {
        peer: subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own group: a kill reaches torchrun's ranks too
        )
        for peer, cmd in cmds.items()
    }
    out = {}
    try:
        for peer, p in procs.items():
            out[peer], _ = p.communicate(timeout=120)
            assert p.returncode == 0, out[peer][-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    for peer, ranks in (("miner-0", "2"), ("miner-1", "1")):
        rounds = LINE.findall(out[peer])
        assert [int(r[0]) for r in rounds] == [0, 1, 2], out[peer]
        assert all(r[3] == "miner-0,miner-1" and r[4] == ranks for r in rounds)
        assert all(int(r[2]) > 0 for r in rounds)
        losses = [float(r[1]) for r in rounds]
        assert losses[-1] < losses[0] - 0.2, losses
    digests = {p: re.findall(r"params sha256 ([0-9a-f]{64})", o) for p, o in out.items()}
    assert digests["miner-0"] == digests["miner-1"] and len(digests["miner-0"]) == 1
    published = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*.nce"))
    assert published == [
        f"{p}/updates/{w:012d}/{p}.nce" for p in ("miner-0", "miner-1") for w in range(3)
    ]  # one envelope per peer per window: rank 1 of miner-0 published nothing
