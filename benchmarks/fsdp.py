"""What an FSDP2 peer's outer rounds cost, next to the same peer unsharded in the same run.

One SparseLoCo peer (the library's GPT, ``--layers`` x ``--width``, the covenant-72b codec),
alone on its exchange, takes ``--rounds`` outer rounds after fixed perturbations of its
parameters (no inner training, so every configuration sends the same payloads):

* ``unsharded``: one process, plain parameters (the baseline);
* ``fsdp2 xN``: ``torchrun`` with N gloo ranks on the CPU, ``fully_shard`` on each block and
  the root, the exchange wrapped in :class:`~sparseloco.RankZeroExchange`; each parameter's
  owner rank encodes its full pseudo-gradient (:mod:`sparseloco.sharded`).

Per configuration and rank it measures: the median seconds of ``outer.step()`` after one
warm-up round; the bytes of the outer optimizer's state this rank holds (θ₀ and momentum
shards, the full error buffers of the parameters it owns); and the step's transient memory,
the largest rise of the process's resident set during a step above its size just before it
(``VmHWM`` reset through ``/proc/self/clear_refs`` before each step). Every process uses one
thread. The payload of every round is hashed: ``same bytes`` says whether each sharded
configuration published exactly the baseline's bytes in every round.

    python benchmarks/fsdp.py                 # 4 x 256 GPT (3.2M parameters), 1, 2, 4 ranks
    python benchmarks/fsdp.py --quick         # a smaller model, a few seconds per row
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a file, this folder would come first on sys.path (and its gauntlet.py would shadow the
# package): put the repository root there instead.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from sparseloco import GatherResult, RankZeroExchange, SparseLoCo, leave_rank  # noqa: E402
from sparseloco.models import GPT, GPTConfig  # noqa: E402
from sparseloco.serialization import dump_safetensors  # noqa: E402
from sparseloco.sharded import is_sharded, shard_like  # noqa: E402


class Solo:
    """An exchange with no other peer: keeps the SHA-256 of each published payload."""

    peer_id = "solo"

    def __init__(self) -> None:
        self.digests: list[str] = []

    def publish(self, window, payload):
        data = dump_safetensors(*payload.to_tensors())
        self.digests.append(hashlib.sha256(data).hexdigest())
        return len(data)

    def gather(self, window):
        return GatherResult(window=window)


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if is_sharded(t) else t
    return local.numel() * local.element_size()


def _perturb(model: torch.nn.Module, rnd: int) -> None:
    """The same full-tensor change whatever the sharding (seeded per round)."""
    g = torch.Generator().manual_seed(rnd)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shard_like(0.01 * torch.randn(p.shape, generator=g), p))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _step_peak(outer: SparseLoCo) -> tuple[float, int]:
    """Seconds of one ``outer.step()`` and the rise of the resident set during it (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    outer.step()
    seconds = time.perf_counter() - start
    return seconds, (_rss_kib("VmHWM") - before) * 1024


def worker(args: argparse.Namespace) -> None:
    """One rank (or the unsharded process): rounds, timings, memory; JSON to ``args.out``."""
    torch.set_num_threads(1)
    sharded = "RANK" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=4, block_size=128)
    model = GPT(cfg)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    solo = Solo() if not sharded or dist.get_rank() == 0 else None
    exchange = RankZeroExchange(solo) if sharded else solo
    outer = SparseLoCo(model.named_parameters(), exchange, "covenant-72b")
    seconds, peaks = [], []
    for rnd in range(args.rounds + 1):
        _perturb(model, rnd)
        if sharded:
            dist.barrier()
        s, peak = _step_peak(outer)
        seconds.append(s)
        peaks.append(peak)
    state = sum(_local_bytes(v) for st in outer.state.values() for v in st.values())
    out = {
        "rank": dist.get_rank() if sharded else 0,
        "world": dist.get_world_size() if sharded else 1,
        "parameters": sum(p.numel() for p in model.parameters()),
        "param_bytes": sum(_local_bytes(p) for p in model.parameters()),
        "state_bytes": state,
        "step_s": statistics.median(seconds[1:]),
        "step_peak_bytes": max(peaks[1:]),
        "digests": solo.digests if solo is not None else None,
    }
    Path(args.out.replace("RANK", str(out["rank"]))).write_text(json.dumps(out))
    if sharded:
        dist.barrier()
        dist.destroy_process_group()
        leave_rank()


def _run(name: str, ranks: int, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """Start one configuration and return its ranks' results."""
    script = [str(Path(__file__).resolve()), "--worker", "--out", str(folder / f"{name}-RANK.json")]
    script += ["--layers", str(args.layers), "--width", str(args.width)]
    script += ["--rounds", str(args.rounds)]
    if name == "unsharded":
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={ranks}", *script]
    # Tensors of 64 KiB and more are mmapped and unmapped when freed (glibc would otherwise
    # raise its threshold and keep freed memory), so the resident set follows live tensors.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return [json.loads((folder / f"{name}-{r}.json").read_text()) for r in range(ranks)]


def _row(name: str, ranks: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    mib = 1 << 20
    step = max(r["step_s"] for r in ranks)  # the round ends when its slowest rank does
    state = max(r["state_bytes"] for r in ranks)
    return {
        "configuration": name,
        "ranks": len(ranks),
        "step s (median)": step,
        "x unsharded": step / base["step_s"],
        "params MiB/rank": max(r["param_bytes"] for r in ranks) / mib,
        "state MiB/rank (max)": state / mib,
        "state MiB/rank (min)": min(r["state_bytes"] for r in ranks) / mib,
        "step peak MiB/rank": max(r["step_peak_bytes"] for r in ranks) / mib,
        "same bytes": ranks[0]["digests"] == base["digests"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (after 1 warm-up)")
    ap.add_argument("--ranks", default="1,2,4", help="FSDP2 rank counts")
    ap.add_argument("--quick", action="store_true", help="2 x 128 GPT, 3 rounds")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.layers, args.width, args.rounds = 2, 128, 3
    configs = [("unsharded", 1)] + [(f"fsdp2 x{n}", int(n)) for n in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: _run(name, n, args, Path(tmp)) for name, n in configs}
    base = results["unsharded"][0]
    rows = [_row(name, ranks, base) for name, ranks in results.items()]
    print(
        f"SparseLoCo outer round of a {base['parameters'] / 1e6:.2f}M-parameter GPT "
        f"({args.layers} x {args.width}), gloo on CPU, 1 thread per process, "
        f"median of {args.rounds} rounds"
    )
    print_table(rows, list(rows[0]))
    path = write_json(
        "fsdp",
        {
            "command": "python " + " ".join(sys.argv),
            "model": {"layers": args.layers, "width": args.width, "params": base["parameters"]},
            "rounds": args.rounds,
            "rows": rows,
            "ranks": {
                name: [{k: v for k, v in r.items() if k != "digests"} for r in ranks]
                for name, ranks in results.items()
            },
            "environment": environment() | {"load_1min": os.getloadavg()[0]},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
