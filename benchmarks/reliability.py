"""What the library survives, in figures: fuzzed decoders, Byzantine peers, faults and crashes.

Sections (all by default; ``--only`` picks some and merges them into the existing JSON):

* ``fuzz``: ``--fuzz-cases`` (default 100,000) hostile envelopes from
  ``benchmarks/reliability_fuzz.py``: crashes, hangs, forged or unusable payloads accepted,
  the slowest case and the peak RSS. Also how much a *default-limits* reader allocates for
  one small signed zstd bomb (``--bomb-mb``).
* ``byzantine``: ``subnet.sim.run`` with 25 % adversaries (6 honest + 2 adversaries per
  run, kinds rotated over three runs so each of the six kinds appears once) against the same
  run honest-only, for ``aggregate="all"`` and ``"top"``: final held-out loss difference, the
  adversaries' total weight and the fraction of (honest, adversary) pairs ranked correctly.
* ``attacks``: every scorer attack of issue 11 (framing copies, a fuzzy copy, an amplifier
  with huge-norm sybils, a predictor of the evaluation set, replays, a dense update) × 3
  seeds, the attacker's final weight against the honest peers' smallest and largest
  (``benchmarks/reliability_attacks.py``).
* ``faults``: the real roles (``sparseloco miner|validator``), one process per node on a
  local SQLite chain and local-folder storage (``benchmarks/reliability_faults.py``): an
  uninterrupted reference, a run whose nodes are SIGKILLed at random points and restarted at
  once from their state folders, the same with each killed node down for 1.5 windows, and
  the same kills restarted at once with the nodes' storage on a loopback S3 server behind a
  fault proxy that breaks ``--storage-faults`` (default 20 %) of their storage requests.

    python benchmarks/reliability.py                      # everything, full sizes
    python benchmarks/reliability.py --quick              # small sizes, a few minutes
    python benchmarks/reliability.py --only fuzz faults   # some sections
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path
from typing import Any

# Run as a file, this folder would come first on sys.path (and its gauntlet.py would shadow the
# gauntlet package); the repository root goes there instead, for ``benchmarks.*`` imports.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import RESULTS, environment  # noqa: E402

ROTATIONS = (("free-rider", "noise"), ("copier", "stale"), ("wrong-data", "poisoner"))


# -- fuzz --------------------------------------------------------------------------------


def default_limits_bomb(mb: int) -> dict[str, Any]:
    """One signed ~KB object whose header honestly declares ``mb`` MiB: what a reader with
    the default ``EnvelopeLimits`` (4 GiB decompressed, tightened to one dense copy of the
    model whose shapes it expects) allocates before rejecting it."""
    import resource

    import zstandard

    from benchmarks.reliability_fuzz import Target, _header_for, sign_raw
    from netcomm import EnvelopeError, default_verifiers, open_envelope

    t = Target.build()
    payload, codec = t.bases[0]
    raw_len = mb << 20
    # streamed, so that the measurement's own input never sits in memory
    cobj = zstandard.ZstdCompressor(level=3).compressobj(size=raw_len)
    zeros = bytes(1 << 20)
    body = b"".join(cobj.compress(zeros) for _ in range(mb)) + cobj.flush()
    header = _header_for(payload, b"", body, t)
    header["raw_len"] = raw_len
    blob = sign_raw(t, header, body)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    try:
        open_envelope(
            blob,
            expected_peer="alice",
            public_key=t.signer.public_key,
            verifiers=default_verifiers(),
            shapes=t.spec.shapes,
            codec=codec,
        )
        reason = "accepted"
    except EnvelopeError as exc:
        reason = exc.reason
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "object_bytes": len(blob),
        "declared_mb": mb,
        "outcome": reason,
        "seconds": time.perf_counter() - start,
        "peak_rss_growth_mb": after - before,
    }


def run_fuzz(cases: int, seed: int, bomb_mb: int) -> dict[str, Any]:
    from benchmarks.reliability_fuzz import CASE_TIMEOUT_S, LIMITS, fuzz

    stats = fuzz(cases, seed=seed)
    out = stats.to_dict()
    out["seed"] = seed
    out["case_timeout_s"] = CASE_TIMEOUT_S
    out["limits"] = {k: getattr(LIMITS, k) for k in LIMITS.__dataclass_fields__}
    # Measured after the fuzz run so that its peak RSS is not inflated by the bomb.
    out["default_limits_bomb"] = default_limits_bomb(bomb_mb)
    return out


# -- Byzantine -----------------------------------------------------------------------------


def ranking_accuracy(weights: dict[str, float]) -> float | None:
    """Fraction of (honest, adversary) pairs where the honest peer has the higher weight."""
    honest = [w for p, w in weights.items() if not p.startswith("adv-")]
    adv = [w for p, w in weights.items() if p.startswith("adv-")]
    pairs = [(h, a) for h, a in product(honest, adv)]
    return sum(h > a for h, a in pairs) / len(pairs) if pairs else None


def run_byzantine(honest: int, windows: int, out_dir: Path, seed: int) -> dict[str, Any]:
    from subnet.sim import SimConfig, run

    runs = []
    for aggregate in ("all", "top"):
        for adversaries in ((), *ROTATIONS):
            name = f"{aggregate}-{'-'.join(adversaries) or 'honest'}"
            cfg = SimConfig(
                peers=honest,
                windows=windows,
                adversaries=adversaries,
                aggregate=aggregate,
                seed=seed,
                out=out_dir / name,
            )
            print(f"byzantine: {name} ...", flush=True)
            s = run(cfg, progress=False, echo=False).summary
            weights = s["final_weights"]
            runs.append(
                {
                    "name": name,
                    "aggregate": aggregate,
                    "honest": honest,
                    "adversaries": list(adversaries),
                    "windows": s["windows"],
                    "seconds": s["seconds"],
                    "heldout_loss_initial": s["heldout_loss_initial"],
                    "heldout_loss_final": s["heldout_loss_final"],
                    "adversary_weight_total": s["adversary_weight_total"],
                    "ranking_accuracy": ranking_accuracy(weights),
                    "honest_aggregated_fraction": s["honest_aggregated_fraction"],
                    "final_weights": weights,
                }
            )
    baseline = {r["aggregate"]: r["heldout_loss_final"] for r in runs if not r["adversaries"]}
    for r in runs:
        base = baseline[r["aggregate"]]
        r["loss_vs_honest_pct"] = 100.0 * (r["heldout_loss_final"] - base) / base
    attacked = [r for r in runs if r["adversaries"]]
    summary = {}
    for aggregate in ("all", "top"):
        rs = [r for r in attacked if r["aggregate"] == aggregate]
        summary[aggregate] = {
            "max_loss_vs_honest_pct": max(r["loss_vs_honest_pct"] for r in rs),
            "max_adversary_weight": max(r["adversary_weight_total"] for r in rs),
            "min_ranking_accuracy": min(r["ranking_accuracy"] for r in rs),
        }
    return {
        "setup": {
            "honest": honest,
            "adversaries_per_run": 2,
            "rotations": [list(r) for r in ROTATIONS],
            "windows": windows,
            "seed": seed,
            "model": "sparseloco simulate defaults (GPT 2x64, H=10, batch 8, covenant-72b)",
        },
        "runs": runs,
        "summary": summary,
    }


# -- faults --------------------------------------------------------------------------------


def run_faults(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from benchmarks.reliability_faults import FaultScenario, run_scenario

    common = dict(
        peers=args.fault_peers,
        windows=args.fault_windows,
        window_s=args.fault_window_s,
        seed=args.seed,
    )
    runs = {
        "reference": FaultScenario(name="reference", **common),
        "sigkill": FaultScenario(name="sigkill", kills=args.kills, **common),
        "outage": FaultScenario(
            name="sigkill+outage", kills=args.kills, down_s=1.5 * args.fault_window_s, **common
        ),
        "storage": FaultScenario(
            name="storage faults+sigkill",
            kills=args.kills,
            storage_faults=args.storage_faults,
            **common,
        ),
    }
    results = {}
    for key, sc in runs.items():
        print(f"faults: {sc.name} ...", flush=True)
        shutil.rmtree(out_dir / key, ignore_errors=True)  # this section's own run folder
        results[key] = run_scenario(sc, out_dir / key)
    reference = {f["model_sha"] for f in results["reference"]["final"].values()}
    for key in ("sigkill", "outage", "storage"):
        final = {f["model_sha"] for f in results[key]["final"].values()}
        # true when no kill changed what was trained: every killed node redid its window
        results[key]["same_model_as_reference"] = final == reference
    return results


# -- report --------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    fz = results.get("fuzz")
    if fz:
        rows.append(
            (
                "malformed envelopes",
                f"{fz['cases']:,} tried: {fz['crashes']} crashes, {fz['hangs']} hangs, "
                f"{fz['forged_accepted']} forged and {fz['unusable_accepted']} unusable "
                f"accepted; slowest {fz['max_case_s'] * 1000:.0f} ms, peak RSS "
                f"{fz['peak_rss_mb']:.0f} MB",
            )
        )
    bz = results.get("byzantine")
    if bz:
        s = bz["setup"]
        for aggregate, v in bz["summary"].items():
            rows.append(
                (
                    f"25% adversaries, aggregate={aggregate}",
                    f"{s['honest']}+2 peers x 3 runs (all 6 kinds), {s['windows']} windows: "
                    f"held-out loss within {v['max_loss_vs_honest_pct']:+.2f}% of honest-only, "
                    f"adversary weight <= {v['max_adversary_weight']:.3f}, ranking accuracy "
                    f">= {v['min_ranking_accuracy']:.2f}",
                )
            )
    at = results.get("attacks")
    if at:
        for name, v in at["summary"].items():
            verdict = "target met" if v["target_met_in_every_seed"] else "target NOT met"
            rows.append(
                (
                    f"attack: {name}",
                    f"{len(at['seeds'])} seeds: attacker weight "
                    f"<= {v['max_adversary_weight']:.3f}, "
                    f"honest >= {v['min_honest_weight']:.3f} ({v['honest_peers_at_zero']} honest "
                    f"peer-runs at 0), {verdict}",
                )
            )
    ft = results.get("faults")
    if ft:
        for key in ("reference", "sigkill", "outage", "storage"):
            r = ft.get(key)
            if r is not None:
                rows.append((r["scenario"]["name"], _fault_figures(r)))
    return rows


def _fault_figures(r: dict[str, Any]) -> str:
    """One table cell: kills, recovery, windows lost, exits and whether every model agrees."""
    rec = r["recovery_s_max"]
    return (
        f"{r['kills']} of {r['kills_planned']} planned SIGKILLs landed, "
        f"{r['kills_recovered']} recovered (max {'-' if rec is None else f'{rec:.1f}'} s), "
        f"{r['windows_lost']} node-windows lost "
        f"({r['miner_windows_trained']}/{r['miner_windows_expected']} miner windows trained, "
        f"{r['validator_windows_scored']}/{r['windows']} scored), "
        f"{len(r['out_of_sync'])} out of sync, {r['resyncs_failed']} re-syncs failed, "
        f"{len(r['unexpected_exits'])} unexpected exits, all models equal: "
        f"{'yes' if r['all_models_equal'] else 'no'}"
        + (
            f", same model as uninterrupted: {'yes' if r['same_model_as_reference'] else 'no'}"
            if "same_model_as_reference" in r
            else ""
        )
        + (_storage_figures(r) if r.get("storage") == "s3" else "")
    )


def _storage_figures(r: dict[str, Any]) -> str:
    """The storage-fault part of a table cell: faults, updates lost, the audit."""
    audit = r["audit"]
    return (
        f"; {r['faults_injected']} storage faults injected, {r['updates_lost']} published "
        f"updates not aggregated, corrupt payloads accepted: "
        f"{len(audit['sets_not_reproduced']) + r['models_differed']} "
        f"({audit['sets_checked'] - len(audit['sets_not_reproduced'])} of "
        f"{audit['sets_checked']} published sets reproduced from the stored bytes, "
        f"{r['models_differed']} miner models differing from the validator's)"
    )


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=("fuzz", "byzantine", "attacks", "faults"))
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--fuzz-cases", type=int, default=100_000)
    ap.add_argument("--bomb-mb", type=int, default=1024)
    ap.add_argument("--honest", type=int, default=6)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--fault-peers", type=int, default=3)
    ap.add_argument("--fault-windows", type=int, default=8)
    ap.add_argument("--fault-window-s", type=float, default=4.0)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument(
        "--storage-faults", type=float, default=0.2, help="share of storage requests broken"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.fuzz_cases, args.bomb_mb = 5_000, 256
        args.honest, args.windows = 3, 4
        args.fault_peers, args.fault_windows, args.kills = 2, 5, 3
    sections = args.only or ["fuzz", "byzantine", "attacks", "faults"]
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="reliability-"))
    path = RESULTS / "reliability.json"
    results: dict[str, Any] = json.loads(path.read_text()) if args.only and path.exists() else {}
    results["environment"] = environment()
    results["command"] = " ".join(["python", "benchmarks/reliability.py", *sys.argv[1:]])
    if "fuzz" in sections:
        results["fuzz"] = run_fuzz(args.fuzz_cases, args.seed, args.bomb_mb)
    if "byzantine" in sections:
        results["byzantine"] = run_byzantine(args.honest, args.windows, out_dir / "sim", args.seed)
    if "attacks" in sections:
        from benchmarks.reliability_attacks import run_attacks

        results["attacks"] = run_attacks([args.seed, args.seed + 1, args.seed + 2])
    if "faults" in sections:
        results["faults"] = run_faults(args, out_dir / "faults")
    for section in sections:  # sections may come from different runs: say which code ran
        results[section]["commit"] = _commit()
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    rows = table(results)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'what':<{width}}  figures")
    for what, figures in rows:
        print(f"{what:<{width}}  {figures}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
