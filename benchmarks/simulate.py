"""Wall time of the local multi-peer run: the GIL switch interval it sets vs Python's default.

Peers and the validator of ``sparseloco simulate`` are threads of one process; the run sets a
0.5 ms switch interval (:data:`subnet.sim.runner.SWITCH_INTERVAL_S`). The baseline is the
same run at Python's default 5 ms, in the same process, interleaved ``--repeats`` times; the
final weights must be identical (the interval may change speed, never results).

    python benchmarks/simulate.py                 # 6 peers, 8 windows, aggregate=all, 2 repeats
    python benchmarks/simulate.py --peers 4 --windows 12 --aggregate top   # the default run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a file, this folder would come first on sys.path (and its gauntlet.py would shadow the
# gauntlet package); the repository root goes there instead, for ``benchmarks.*`` imports.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from subnet.sim import SimConfig, run, runner  # noqa: E402

INTERVALS = {"python default (5 ms)": 0.005, "simulate (0.5 ms)": runner.SWITCH_INTERVAL_S}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=6)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--aggregate", choices=["top", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    seconds: dict[str, list[float]] = {k: [] for k in INTERVALS}
    weights: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for label, interval in INTERVALS.items():
                runner.SWITCH_INTERVAL_S = interval
                cfg = SimConfig(
                    peers=args.peers,
                    windows=args.windows,
                    aggregate=args.aggregate,
                    out=Path(tmp) / f"{rep}-{interval}",
                )
                start = time.perf_counter()
                summary = run(cfg, progress=False, echo=False).summary
                seconds[label].append(time.perf_counter() - start)
                weights[label] = summary["final_weights"]
                print(f"{label}: {seconds[label][-1]:.1f} s", flush=True)
    base = statistics.median(seconds["python default (5 ms)"])
    rows = [
        {
            "switch interval": label,
            "median s": statistics.median(s),
            "runs s": " ".join(f"{x:.1f}" for x in s),
            "speed-up": base / statistics.median(s),
        }
        for label, s in seconds.items()
    ]
    same = len({tuple(sorted(w.items())) for w in weights.values()}) == 1
    print_table(rows, list(rows[0]))
    print(f"final weights identical: {same}")
    path = write_json(
        "simulate",
        {"args": vars(args), "rows": rows, "identical_results": same, "environment": environment()},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
