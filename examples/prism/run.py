"""One PRISM round end to end: submissions → funnel → ranked table → weights → winner config.

``python -m examples.prism [--out DIR] [--seed S] [--simulate WINDOWS]`` from the repository
root. The winner's full :class:`~sparseloco.models.GPTConfig` is written to
``DIR/winner_gpt.json``; the printed ``sparseloco simulate --model-config DIR/winner_gpt.json``
trains it in the local swarm, and ``--simulate`` runs that swarm right away.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from examples.common.settle import Settlement, settle
from examples.common.submissions import SubmissionBox
from examples.common.table import format_table
from examples.prism.candidates import submit_demo
from examples.prism.config import PrismConfig
from examples.prism.funnel import CandidateResult, run_funnel
from gauntlet import InMemorySubnet
from netcomm import LocalStorage

VALIDATOR = "validator"


@dataclass(frozen=True)
class RoundResult:
    """Everything a round produced."""

    ranked: list[CandidateResult]
    settlement: Settlement
    winner: CandidateResult | None
    winner_path: Path | None


def simulate_command(winner_path: Path, out: Path) -> str:
    """The ``sparseloco simulate`` command that trains the config saved at ``winner_path``."""
    return shlex.join(
        ["sparseloco", "simulate", "--model-config", str(winner_path), "--out", str(out)]
    )


def ranked_table(ranked: list[CandidateResult]) -> str:
    """The ranked candidates with each tier's score and the tier that dropped them."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = []
    for rank, r in enumerate(ranked, start=1):
        c = r.config
        arch = (
            f"L{c.n_layer} d{c.n_embd} h{c.n_head}/{c.kv_heads} x{c.mlp_ratio:g} {c.norm} {c.pos}"
            if c
            else json.dumps(r.body, sort_keys=True)[:44]
        )
        rows.append(
            [
                rank,
                r.hotkey,
                arch,
                "-" if r.params is None else f"{r.params:,}",
                fmt(r.proxy),
                fmt(r.train),
                fmt(r.bench),
                "-" if r.bench_bpb is None else f"{r.bench_bpb:.3f}",
                r.dropped_at or ("winner" if rank == 1 else "benchmarked"),
                r.reason,
            ]
        )
    headers = ["#", "hotkey", "architecture", "params", "proxy", "train", "bench", "bpb"]
    return format_table([*headers, "dropped at", "why"], rows)


def run_round(
    cfg: PrismConfig, workdir: Path, log: Callable[[str], None] = lambda _: None
) -> RoundResult:
    """Run the demo round in ``workdir`` (bucket, winner config)."""
    subnet = InMemorySubnet(netuid=100)
    subnet.register(VALIDATOR, stake=1000.0)
    box = SubmissionBox(LocalStorage(workdir / "bucket", fsync=False), "prism")
    submit_demo(box, subnet)
    submissions, rejected = box.collect(subnet.connect(VALIDATOR))
    log(f"{len(submissions)} signed submissions verified, {len(rejected)} rejected")
    ranked = run_funnel(submissions, rejected, cfg, log)
    scores: dict[str, float] = {}
    for r in ranked:  # a miner's score is its best benchmarked candidate's; 0 otherwise
        scores[r.hotkey] = max(scores.get(r.hotkey, 0.0), r.bench or 0.0)
    settlement = settle(subnet, VALIDATOR, scores)
    winner = ranked[0] if ranked and ranked[0].dropped_at is None else None
    winner_path = None
    if winner is not None and winner.config is not None:
        winner_path = workdir / "winner_gpt.json"
        winner_path.write_text(json.dumps(winner.config.to_dict(), indent=2) + "\n")
    return RoundResult(ranked, settlement, winner, winner_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.prism", description=__doc__)
    parser.add_argument("--out", default="runs/prism", help="bucket and winner config folder")
    parser.add_argument("--seed", default=PrismConfig.seed, help="the round's public seed")
    parser.add_argument(
        "--simulate",
        type=int,
        default=0,
        metavar="WINDOWS",
        help="then run `subnet.sim` on the winner's full config for WINDOWS windows",
    )
    args = parser.parse_args(argv)
    cfg = PrismConfig(seed=args.seed)
    out = Path(args.out)
    result = run_round(cfg, out, log=print)
    print()
    print(ranked_table(result.ranked))
    print()
    s = result.settlement
    weights = {h: round(w, 4) for h, w in sorted(s.weights.items()) if w > 0}
    print(f"weights {weights}; chain: {s.result.message}")
    if result.winner is None or result.winner_path is None or result.winner.config is None:
        print("no candidate reached the benchmark")
        return 1
    print(f"winner {result.winner.hotkey}: config written to {result.winner_path}")
    print(f"train it locally:  {simulate_command(result.winner_path, out / 'sim')}")
    if args.simulate:
        from subnet.sim import SimConfig, run

        summary = run(
            SimConfig(model=result.winner.config, windows=args.simulate, out=out / "sim"),
            progress=False,
            echo=False,
        ).summary
        print(
            f"simulated {args.simulate} windows on the winner: held-out loss "
            f"{summary['heldout_loss_initial']:.3f} -> {summary['heldout_loss_final']:.3f}"
        )
    return 0
