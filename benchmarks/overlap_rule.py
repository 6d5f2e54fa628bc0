"""Held-out loss of overlapped start rules (a, w, v) against blocking rounds, in one process.

The sweep that chose :class:`sparseloco.OverlapConfig`'s defaults. Every run trains
``benchmarks/utilisation.py``'s model with its data, seeds, batch, inner optimizer and H,
with ``--peers`` peers as threads of one process exchanging through an
:class:`~sparseloco.InProcessHub` (no sockets, no link: only the loss is measured), so the
deterministic modes end where that benchmark's do (blocking and overlap at τ = H: the same
held-out loss, bit for bit, as its JSON's). Each rule is ``a,w,v``
(``extrapolation,own_weight,message_weight``); every rule and seed runs in its own process,
``--jobs`` at a time. Each peer steps as :class:`~sparseloco.OuterLoop` does: the boundary
leaves the own message's step to :meth:`~sparseloco.SparseLoCo.apply_message` after the next
window's first inner step (``--at-boundary``: the boundary adds it, encoding the message
itself). ``--apply-after TAU`` applies each aggregate TAU inner steps into the next window
(``outer.finish()`` there, waiting for it, as ``OuterLoop(apply_after=TAU)`` does) instead
of at the window's end. Prints the table and writes ``results/<name>.json``.

    python benchmarks/overlap_rule.py                          # the defaults' sweep, ~10 min
    python benchmarks/overlap_rule.py --rules 0.5,0.75,0 --seeds 0 --rounds 60
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Run as a file, this folder would come first on sys.path (and its gauntlet.py would shadow the
# gauntlet package); the repository root goes there instead, for ``benchmarks.*`` imports.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.utilisation import CORPUS_BYTES, MODEL, heldout_loss, inner_step  # noqa: E402
from sparseloco import InProcessHub, OverlapConfig, SparseLoCo  # noqa: E402
from sparseloco.data import TokenDataset, stdlib_corpus  # noqa: E402
from sparseloco.loop import apply_due  # noqa: E402
from sparseloco.models import GPT  # noqa: E402

BLOCKING = "blocking"
#: the sweep's rules: the earlier defaults, then a, w, v around the chosen one
DEFAULT_RULES = [
    "0.5,0.75,0",
    "0.75,0.5,0",
    "0.5,0.5,0.5",
    "0.5,0.5,0.75",
    "0.5,0.5,1",
    "0.75,0.5,0.5",
    "0.75,0.5,0.75",
    "0.75,0.5,1",
    "1,0.5,0.75",
    "0.75,0.75,0.75",
    "0.75,0.25,0.75",
]


def _peer(
    index: int, job: dict[str, Any], hub: InProcessHub, data: TokenDataset, out: dict
) -> None:
    """One peer's thread; a failure is kept in ``out`` (the others then miss its updates)."""
    try:
        _train(index, job, hub, data, out)
    except BaseException as exc:
        out.setdefault("errors", []).append(f"peer{index}: {type(exc).__name__}: {exc}")


def _train(
    index: int, job: dict[str, Any], hub: InProcessHub, data: TokenDataset, out: dict
) -> None:
    """One peer: ``job["rounds"]`` windows of H inner steps, then the last aggregate."""
    with job["lock"]:  # the same initial model on every peer
        torch.manual_seed(job["seed"])
        model = GPT(MODEL)
    rule = job["rule"]
    overlap = False if rule == BLOCKING else OverlapConfig(*map(float, rule.split(",")))
    ex = hub.connect(f"peer{index}")
    outer = SparseLoCo(model.named_parameters(), ex, "covenant-72b", overlap=overlap)
    inner = torch.optim.AdamW(model.parameters(), lr=job["inner_lr"], weight_decay=0.1)
    gen = torch.Generator().manual_seed(1000 * job["seed"] + index)
    for _ in range(job["rounds"]):
        for step in range(job["inner_steps"]):
            # τ steps in, as OuterLoop does (never for blocking: nothing is in flight)
            if apply_due(outer, step, job["apply_after"], wait=True):
                outer.finish()
            inner_step(model, inner, data, gen, job["batch"])
            outer.apply_message()  # after the first inner step, as OuterLoop does
        outer.step(defer_message=not job["at_boundary"])
    outer.finish()
    if index == 0:
        out["loss"] = heldout_loss(model, data, job["batch"])


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One rule and seed, its peers as threads; returns the held-out loss of peer 0."""
    torch.set_num_threads(1)
    data = TokenDataset(stdlib_corpus(CORPUS_BYTES), MODEL.block_size)
    peers = [f"peer{i}" for i in range(job["peers"])]
    hub = InProcessHub(peers, timeout=job["timeout_s"], validate=False)
    out: dict[str, Any] = {}
    job = job | {"lock": threading.Lock()}
    threads = [
        threading.Thread(target=_peer, args=(i, job, hub, data, out)) for i in range(job["peers"])
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if "errors" in out:
        raise RuntimeError(f"rule {job['rule']} seed {job['seed']}: " + "; ".join(out["errors"]))
    return {"rule": job["rule"], "seed": job["seed"], "loss": out["loss"]} | {
        "seconds": time.perf_counter() - started
    }


def table(results: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """Loss per rule and seed, the mean, and the mean against blocking's."""
    by_rule: dict[str, dict[int, float]] = {}
    for r in results:
        by_rule.setdefault(r["rule"], {})[r["seed"]] = r["loss"]
    base = statistics.mean(by_rule[BLOCKING].values())
    rows = []
    for rule, losses in by_rule.items():
        mean = statistics.mean(losses.values())
        rows.append(
            {"rule a,w,v": rule}
            | {f"seed {s}": round(losses[s], 4) for s in seeds}
            | {"mean": round(mean, 4), "vs blocking": f"{mean / base - 1:+.2%}"}
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rules", nargs="+", default=DEFAULT_RULES, help="a,w,v each")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--inner-steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--inner-lr", type=float, default=2e-3)
    ap.add_argument(
        "--at-boundary",
        action="store_true",
        help="the boundary adds the own message's step (else: after the first inner step)",
    )
    ap.add_argument(
        "--apply-after",
        type=int,
        default=None,
        metavar="TAU",
        help="apply each aggregate TAU inner steps into the next window (default: at its end)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    ap.add_argument("--name", default="overlap_rule")
    args = ap.parse_args()
    if args.apply_after is not None and not 1 <= args.apply_after <= args.inner_steps:
        ap.error(f"--apply-after must lie in [1, {args.inner_steps}] (H: at the boundary)")
    if args.apply_after == args.inner_steps:  # as OuterLoop takes it
        args.apply_after = None
    for rule in args.rules:
        OverlapConfig(*map(float, rule.split(",")))  # a bad rule fails before any run
    common = {
        "peers": args.peers,
        "rounds": args.rounds,
        "inner_steps": args.inner_steps,
        "batch": args.batch,
        "inner_lr": args.inner_lr,
        "timeout_s": 600.0,
        "at_boundary": args.at_boundary,
        "apply_after": args.apply_after,
    }
    jobs = [
        common | {"rule": rule, "seed": seed}
        for rule in [BLOCKING, *args.rules]
        for seed in args.seeds
    ]
    started = time.time()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = []
        for r in pool.imap(run, jobs):
            print(f"{r['rule']:>14} seed {r['seed']}: loss {r['loss']:.4f}", flush=True)
            results.append(r)
    rows = table(results, args.seeds)
    print(
        f"\n{args.peers} peers, {args.rounds} rounds x {args.inner_steps} inner steps, "
        "held-out loss at equal tokens (overlapped at tau = "
        f"{args.apply_after or 'H'}):"
    )
    print_table(rows, list(rows[0]))
    path = write_json(
        args.name,
        {
            "command": " ".join(["python benchmarks/overlap_rule.py", *sys.argv[1:]]),
            "args": vars(args),
            "model": MODEL.to_dict(),
            "table": rows,
            "runs": results,
            "environment": environment(),
            "seconds": time.time() - started,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
