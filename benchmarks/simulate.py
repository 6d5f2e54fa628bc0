"""Wall time and memory of the main job: the nodes as processes vs the thread version it replaced.

``sparseloco simulate`` runs every miner and validator as its own OS process on a local
chain. The baseline is the thread simulation it replaced (every peer a thread of one
process, GIL switch interval 0.5 ms), checked out from git at ``--thread-rev`` into a
temporary worktree and run on the same machine in the same session, interleaved
``--repeats`` times. The process version runs in each of :data:`VARIANTS` per repeat: as
``sparseloco simulate`` runs by default (the local chain skips ahead when every node
waits), with ``--real-time`` (every window lasts its wall-clock length, as on a real chain)
and with overlapped rounds in the miners. All run as child processes of this script;
memory is the thread version's peak RSS and the process version's peak summed PSS of its
process tree.

    python benchmarks/simulate.py                  # default run (4 peers, 12 windows), 2 repeats
    python benchmarks/simulate.py --thread-rev ''  # processes only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a file, this folder would come first on sys.path (and its gauntlet.py would shadow the
# gauntlet package); the repository root goes there instead, for ``benchmarks.*`` imports.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

from benchmarks.common import environment, print_table, write_json  # noqa: E402

#: the last commit with the thread simulation (``subnet.sim`` before the process runner).
THREAD_REV = "7a480cb"

THREAD_RUN = """
import json, sys
from pathlib import Path
from subnet.sim import SimConfig, run
s = run(SimConfig(peers={peers}, windows={windows}, out=Path(sys.argv[1])),
        progress=False, echo=False).summary
json.dump(s, open(Path(sys.argv[1]) / "bench.json", "w"))
"""


def _thread_tree(rev: str, tmp: Path) -> Path:
    tree = tmp / "thread-version"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        capture_output=True,
    )
    return tree


def _run_threads(tree: Path, out: Path, args: argparse.Namespace) -> dict:
    code = THREAD_RUN.format(peers=args.peers, windows=args.windows)
    env = {"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    s = json.loads((out / "bench.json").read_text())
    # ru_maxrss of children is the largest child so far: exact when this child is the largest.
    return {"wall": wall, "memory_mb": max(peak, before) / 1024, "summary": s}


def _run_processes(out: Path, args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "subnet.cli", "simulate", "--quiet", "--out", str(out)]
    cmd += ["--peers", str(args.peers), "--windows", str(args.windows), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - start
    s = json.loads((out / "summary.json").read_text())
    return {"wall": wall, "memory_mb": s["peak_pss_mb"], "summary": s}


def _row(label: str, runs: list[dict], base: float | None) -> dict:
    wall = statistics.median(r["wall"] for r in runs)
    last = runs[-1]["summary"]
    return {
        "version": label,
        "median wall s": wall,
        "runs s": " ".join(f"{r['wall']:.1f}" for r in runs),
        "vs threads": (base / wall) if base else 1.0,
        "peak memory MB": statistics.median(r["memory_mb"] for r in runs),
        "held-out final": last["heldout_loss_final"],
        "honest aggregated": last["honest_aggregated_fraction"],
    }


#: the process runs of each repeat: label and extra ``sparseloco simulate`` arguments.
VARIANTS = {
    "processes": [],
    # the thread version evaluated 16 + 16 samples per peer; today's default is 64 + 64
    "processes, --eval-samples 16": ["--eval-samples", "16"],
    "processes, --real-time": ["--real-time"],
    "processes, --overlap --apply-after 5": ["--overlap", "--apply-after", "5"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--thread-rev", default=THREAD_REV, help="'' to skip the thread baseline")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="process variants to run (default: all)",
    )
    args = ap.parse_args()
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"threads (old)": [], **{v: [] for v in args.only}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tree = _thread_tree(args.thread_rev, tmp) if args.thread_rev else None
        try:
            for rep in range(args.repeats):
                if tree is not None:
                    runs["threads (old)"].append(_run_threads(tree, tmp / f"t{rep}", args))
                for i, label in enumerate(args.only):
                    out = tmp / f"p{rep}-{i}"
                    runs[label].append(_run_processes(out, args, *VARIANTS[label]))
                print(
                    " | ".join(f"{k}: {v[-1]['wall']:.1f} s" for k, v in runs.items() if v),
                    flush=True,
                )
        finally:
            if tree is not None:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )
    base = statistics.median(r["wall"] for r in runs["threads (old)"]) if tree else None
    rows = [_row(label, r, base) for label, r in runs.items() if r]
    print_table(rows, list(rows[0]))
    load = {"load_average_before": load_before, "load_average_after": os.getloadavg()}
    path = write_json(
        "simulate", {"args": vars(args), "rows": rows, "environment": environment(), **load}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
