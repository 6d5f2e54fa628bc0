"""Are honest peers paid? Final weights of equal honest peers in short runs of the main job.

For every seed and run length, ``subnet.sim.run`` (the main job: real miner and validator
processes) runs honest peers only, and once more with every adversary kind beside them. Per
run it reports the honest peers' smallest and largest final weight, their ratio, how many
honest peers ended at weight 0, how many windows were void (no update arrived at all) and,
with adversaries, the largest adversary weight. Issue 11 item 7's target: no honest peer at 0
and max/min ≤ 3 in every honest-only run of ≥ 8 windows; every adversary below every honest
peer.

    python benchmarks/honest_pay.py                        # seeds 0-2, 8 and 12 windows
    python benchmarks/honest_pay.py --seeds 0 --windows 8 --no-adversaries
    python benchmarks/honest_pay.py --seeds $(seq 0 11) --windows 8 --no-adversaries \
        --name honest_pay-8w
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run as a file, this folder would come first on sys.path (and its gauntlet.py would shadow the
# gauntlet package); the repository root goes there instead, for ``benchmarks.*`` imports.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

from benchmarks.common import environment, print_table, write_json  # noqa: E402

ALL_ADVERSARIES = ("free-rider", "noise", "copier", "stale", "wrong-data", "poisoner")


def _void_windows(out: Path) -> int:
    history = out / "nodes" / "validator" / "history.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    return sum(1 for r in records if "window" in r and not r["aggregated"])


def run_one(seed: int, windows: int, adversaries: tuple[str, ...], out: Path) -> dict[str, Any]:
    from subnet.sim import SimConfig, run

    cfg = SimConfig(windows=windows, adversaries=adversaries, seed=seed, out=out)
    summary = run(cfg, progress=False, echo=False).summary
    weights = summary["final_weights"]
    honest = {p: w for p, w in weights.items() if not p.startswith("adv-")}
    adv = {p: w for p, w in weights.items() if p.startswith("adv-")}
    low, high = min(honest.values()), max(honest.values())
    return {
        "seed": seed,
        "windows": windows,
        "adversaries": "all" if adversaries else "none",
        "honest_min": low,
        "honest_max": high,
        "ratio": high / low if low > 0 else float("inf"),
        "honest_at_zero": sum(1 for w in honest.values() if w == 0.0),
        "adversary_max": max(adv.values()) if adv else None,
        "windows_without_aggregate": _void_windows(out),
        "seconds": summary["seconds"],
        "final_weights": weights,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 12])
    ap.add_argument("--no-adversaries", action="store_true", help="honest-only runs only")
    ap.add_argument("--name", default="honest_pay", help="results/NAME.json (default %(default)s)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="honest-pay-") as tmp:
        for seed in args.seeds:
            for windows in args.windows:
                runs = [()] if args.no_adversaries else [(), ALL_ADVERSARIES]
                for adversaries in runs:
                    name = f"s{seed}-w{windows}-{'adv' if adversaries else 'honest'}"
                    print(f"{name} ...", flush=True)
                    rows.append(run_one(seed, windows, adversaries, Path(tmp) / name))
    columns = ["seed", "windows", "adversaries", "honest_min", "honest_max", "ratio"]
    columns += ["honest_at_zero", "adversary_max", "windows_without_aggregate", "seconds"]
    print_table(rows, columns)
    honest_only = [r for r in rows if r["adversaries"] == "none"]
    attacked = [r for r in rows if r["adversaries"] == "all"]
    summary = {
        "honest_runs": len(honest_only),
        "honest_runs_with_a_zero": sum(1 for r in honest_only if r["honest_at_zero"]),
        "honest_runs_over_3x": sum(1 for r in honest_only if r["ratio"] > 3.0),
        "worst_ratio": max(r["ratio"] for r in honest_only),
        "attacked_runs_with_an_adversary_at_or_above_an_honest_peer": sum(
            1 for r in attacked if r["adversary_max"] >= r["honest_min"]
        ),
    }
    print(json.dumps(summary, indent=2))
    path = write_json(args.name, {"environment": environment(), "runs": rows, **summary})
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
