"""Convergence benchmark: SparseLoCo vs DiLoCo vs data-parallel AdamW at equal tokens.

Every method trains the same byte-level GPT with the same number of peers, the same inner
optimizer (AdamW), the same per-peer data stream and the same number of inner steps; only
the synchronisation differs:

* ``sparseloco``: the ``covenant-72b`` preset (k=64/4096, 2-bit, β=0.95, α=1), with both
  reducers (``mean_selected`` as Templar runs it, ``mean`` as the paper writes it), and
  with the paper's 512M density (k=128/4096); the same preset with the sign + Lloyd–Max
  magnitude value coding (``value_coding="signmag"``) and with the rank-group coding
  (``"ranked"``) at 2 and 1 bits, at k=64 and k=128; with Rice-coded index gaps at k=100
  (about covenant-72b's bytes); and with both (Rice gaps + rank groups, ranked 2-bit values)
  at k=64, 82 (about covenant-72b's bytes) and 128;
* ``diloco``: dense fp32 pseudo-gradients, outer Nesterov SGD (momentum 0.9) at several
  outer learning rates;
* ``dp``: dense gradient averaging every step (the data-parallel reference).

Each method's inner learning rate is chosen from a small grid by mean final held-out loss
over the seeds; every tried value is reported. Prints tables, writes
``results/convergence.json``, ``results/convergence.png`` (held-out loss against tokens) and
``results/convergence-frontier.png`` (final held-out loss against bytes sent per peer per
round, one point per configuration and seed).

Two stages on CPU (the numbers in the README):

1. tuning, 12 rounds, every inner lr of the grid:
   ``python benchmarks/convergence.py --name convergence-tuning`` (~25 min on 2 cores); the
   value codings were tuned the same way on their own:
   ``python benchmarks/convergence.py --name convergence-tuning-codings --methods
   sparseloco/signmag``, ``--name convergence-tuning-ranked --methods sparseloco/ranked-1bit
   sparseloco/ranked-2bit sparseloco/rice-k100`` and ``--name convergence-tuning-ranked-rice
   --methods sparseloco/ranked-rice``;
2. the comparison, 36 rounds, each method at its tuned inner lr:
   ``python benchmarks/convergence.py --rounds 36 --inner-lr-from
   benchmarks/results/convergence-tuning.json
   benchmarks/results/convergence-tuning-codings.json
   benchmarks/results/convergence-tuning-ranked.json
   benchmarks/results/convergence-tuning-ranked-rice.json`` (``--methods`` with ``--include`` of
   an earlier run's JSON runs only some methods and merges the rest into the tables).

``--preset gpu`` sizes the model and run for a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a file, this folder would come first on sys.path (and its gauntlet.py would shadow the
# gauntlet package); the repository root goes there instead, for ``benchmarks.*`` imports.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from sparseloco import DataParallel, DiLoCo, InProcessHub, OuterLoop, SparseLoCo  # noqa: E402
from sparseloco.data import TokenDataset, stdlib_corpus  # noqa: E402
from sparseloco.models import GPT, GPTConfig  # noqa: E402

SIZES = {
    "cpu": dict(
        model=GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64),
        peers=4,
        rounds=12,
        inner_steps=20,
        batch=8,
        corpus=3_000_000,
        inner_lrs=(1e-3, 2e-3, 4e-3),
        seeds=(0, 1),
        device="cpu",
    ),
    "gpu": dict(
        model=GPTConfig(block_size=256, n_layer=8, n_head=8, n_embd=512),
        peers=8,
        rounds=30,
        inner_steps=50,
        batch=32,
        corpus=60_000_000,
        inner_lrs=(3e-4, 6e-4, 1e-3),
        seeds=(0, 1, 2),
        device="cuda",
    ),
}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    options: dict[str, Any]


def methods(diloco_lrs: tuple[float, ...]) -> list[Method]:
    out = [
        Method("sparseloco/mean_selected", "sparseloco", {"reducer": "mean_selected"}),
        Method("sparseloco/mean", "sparseloco", {"reducer": "mean"}),
        Method("sparseloco/k128", "sparseloco", {"codec": {"topk": 128}}),
    ]
    for coding in ("signmag", "ranked"):
        for bits, topk in ((2, 64), (1, 64), (1, 128), (2, 128)):
            suffix = f"-{bits}bit" + ("" if topk == 64 else f"-k{topk}")
            codec = {"value_coding": coding, "value_bits": bits, "topk": topk}
            out.append(Method(f"sparseloco/{coding}{suffix}", "sparseloco", {"codec": codec}))
    # The other use of what fixed 12-bit indices waste: Rice-coded gaps, and more entries
    # for the bytes saved (k=100 sends about covenant-72b's bytes per round).
    rice = {"index_coding": "rice", "topk": 100}
    out.append(Method("sparseloco/rice-k100", "sparseloco", {"codec": rice}))
    # Both: Rice-coded gaps plus each entry's rank group, and ranked 2-bit values; k=82
    # sends about covenant-72b's bytes per round.
    for topk in (64, 82, 128):
        codec = {"index_coding": "rice", "value_coding": "ranked", "topk": topk}
        out.append(Method(f"sparseloco/ranked-rice-k{topk}", "sparseloco", {"codec": codec}))
    out += [Method(f"diloco/lr={lr}", "diloco", {"lr": lr}) for lr in diloco_lrs]
    out.append(Method("dp-adamw", "dp", {}))
    return out


def train(
    method: Method, data: TokenDataset, size: dict, inner_lr: float, seed: int
) -> dict[str, Any]:
    """One swarm run; returns the held-out curve (per round) and bytes sent per peer."""
    device = torch.device(size["device"])
    peers, rounds, h, batch = size["peers"], size["rounds"], size["inner_steps"], size["batch"]
    torch.manual_seed(seed)
    init = GPT(size["model"]).state_dict()
    names = [f"p{i}" for i in range(peers)]
    hub = InProcessHub(names, timeout=600)
    models = []
    for _ in names:
        m = GPT(size["model"]).to(device)
        m.load_state_dict(init)
        models.append(m)
    heldout = [
        tuple(t.to(device) for t in data.heldout_batch(range(i, i + batch)))
        for i in range(0, min(16 * batch, data.num_heldout - batch), batch)
    ]
    curve: list[float] = []
    sent = [0] * peers
    barrier = threading.Barrier(peers)

    @torch.no_grad()
    def evaluate(model: GPT) -> float:
        model.eval()
        loss = sum(float(model(x, y)[1]) for x, y in heldout) / len(heldout)
        model.train()
        return loss

    def peer(i: int) -> None:
        model = models[i]
        inner = torch.optim.AdamW(model.parameters(), lr=inner_lr, weight_decay=0.1)
        ex = hub.connect(names[i])
        if method.kind == "sparseloco":
            outer = SparseLoCo(model.named_parameters(), ex, "covenant-72b", **method.options)
        elif method.kind == "diloco":
            outer = DiLoCo(model.named_parameters(), ex, inner_steps=h, **method.options)
        else:
            outer = DataParallel(model.named_parameters(), ex)
        g = torch.Generator().manual_seed(1000 * seed + i)
        with OuterLoop(inner, outer, sync_every=1 if method.kind == "dp" else h) as loop:
            for _round in range(rounds):
                for _ in range(h):
                    ids = torch.randint(0, data.num_train, (batch,), generator=g).tolist()
                    x, y = (t.to(device) for t in data.train_batch(ids))
                    _, loss = model(x, y)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    inner.step()
                    inner.zero_grad(set_to_none=True)
                barrier.wait()
                if i == 0:
                    curve.append(evaluate(model))
                barrier.wait()
        sent[i] = sum(rep.bytes_sent for rep in loop.reports)

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models]
    assert all(torch.equal(flat[0], f) for f in flat[1:]), "peers drifted apart"
    return {"curve": curve, "final": curve[-1], "bytes_per_peer": statistics.mean(sent)}


COVENANT = "sparseloco/mean_selected"  # the covenant-72b preset as it is
DENSE = "dp-adamw"


def main() -> None:
    args, size, tuned, chosen = parse_args()
    torch.set_num_threads(1 if size["device"] == "cpu" else torch.get_num_threads())
    data = TokenDataset(stdlib_corpus(size["corpus"]), size["model"].block_size)
    start = time.time()
    runs: dict[str, dict[float, dict[int, dict]]] = {}
    for method in chosen:
        for lr in (tuned[method.name],) if method.name in tuned else size["inner_lrs"]:
            for seed in size["seeds"]:
                res = train(method, data, size, lr, seed)
                runs.setdefault(method.name, {}).setdefault(lr, {})[seed] = res
                print(f"{method.name:30s} inner_lr={lr:<7} seed={seed}  final {res['final']:.4f}")
    tried, best = tried_and_best(runs)
    for previous in args.include:
        best = included(previous, size) | best
    rows = best_rows(best)
    verdict = diloco_verdict(best, size["seeds"])
    front = frontier_rows(best, size)
    tokens = size["rounds"] * size["inner_steps"] * size["batch"] * size["model"].block_size
    print(
        f"\n{size['peers']} peers, {tokens:,} tokens per peer, seeds {list(size['seeds'])}, "
        f"{time.time() - start:.0f} s\n\nevery configuration tried:"
    )
    print_table(tried, list(tried[0]))
    print("\nbest inner lr per method:")
    print_table(rows, list(rows[0]))
    if verdict:
        print("\nSparseLoCo vs the best DiLoCo (per seed) and bytes per round:")
        for n, v in verdict.items():
            print(
                f"  {n}: beats best DiLoCo in every seed: {v['beats_best_diloco_every_seed']}, "
                f"{v['fewer_bytes_than_diloco']:.0f}x fewer bytes than DiLoCo"
            )
    print("\nbytes per peer per round against final held-out loss (gap to dense AdamW):")
    print_table(front, list(front[0]))
    png, frontier_png = plot(best, size, args.name), plot_frontier(best, size, args.name)
    path = write_json(
        args.name,
        {
            "preset": args.preset,
            "size": {k: str(v) for k, v in size.items()},
            "tokens_per_peer": tokens,
            "tried": tried,
            "best": rows,
            "verdict": verdict,
            "frontier": front,
            "curves": {
                n: {str(s): r["curve"] for s, r in by_seed.items()}
                for n, (_, by_seed) in best.items()
            },
            "environment": environment(),
            "seconds": time.time() - start,
            "plot": png.name,
            "frontier_plot": frontier_png.name,
        },
    )
    print(f"\nwrote {path}, {png} and {frontier_png}")


def parse_args() -> tuple[argparse.Namespace, dict, dict[str, float], list[Method]]:
    """(arguments, run size, tuned inner lr per method name, methods to run)."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--diloco-lrs", type=float, nargs="+", default=[0.4, 0.7, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    ap.add_argument("--inner-lrs", type=float, nargs="+", help="override the inner-lr grid")
    ap.add_argument("--rounds", type=int, help="override the preset's number of outer rounds")
    ap.add_argument(
        "--inner-lr-from",
        nargs="+",
        default=[],
        help="previous runs' JSON: run each method only at the inner lr tuned there",
    )
    ap.add_argument(
        "--methods", nargs="+", help="run only the methods whose names start with one of these"
    )
    ap.add_argument(
        "--include",
        nargs="+",
        default=[],
        help="previous runs' JSON of the same size: add their methods' best runs to the tables "
        "and plots (a method run here replaces its earlier result; runs are deterministic)",
    )
    ap.add_argument("--name", default="convergence", help="results/<name>.json and .png")
    args = ap.parse_args()
    size = dict(SIZES[args.preset])
    if args.seeds:
        size["seeds"] = tuple(args.seeds)
    if args.inner_lrs:
        size["inner_lrs"] = tuple(args.inner_lrs)
    if args.rounds:
        size["rounds"] = args.rounds
    tuned: dict[str, float] = {}
    for previous in args.inner_lr_from:
        rows = json.loads(Path(previous).read_text())["best"]
        tuned |= {r["method"]: r["inner lr"] for r in rows}
    chosen = [
        m
        for m in methods(tuple(args.diloco_lrs))
        if not args.methods or m.name.startswith(tuple(args.methods))
    ]
    if not chosen:
        ap.error(f"no method name starts with any of {args.methods}")
    return args, size, tuned, chosen


def included(path: str, size: dict) -> dict[str, tuple[float, dict]]:
    """A previous run's best inner lr, per-seed curves and bytes per method, as in
    :func:`tried_and_best` (every seed is given the method's mean bytes, which do not depend on
    the seed); raises unless it ran the same size."""
    previous = json.loads(Path(path).read_text())
    if previous["size"] != {k: str(v) for k, v in size.items()}:
        raise SystemExit(f"error: {path} ran another size; rerun it with these settings")
    out = {}
    for row in previous["best"]:
        sent = row["MB sent/peer"] * 1e6
        curves = previous["curves"][row["method"]]
        runs = {
            int(seed): {"curve": curve, "final": curve[-1], "bytes_per_peer": sent}
            for seed, curve in curves.items()
        }
        out[row["method"]] = (row["inner lr"], runs)
    return out


def tried_and_best(runs: dict) -> tuple[list[dict], dict[str, tuple[float, dict]]]:
    """Every (method, inner lr) tried, and per method the inner lr with the lowest mean."""
    tried, best = [], {}
    for name, by_lr in runs.items():
        for lr, by_seed in by_lr.items():
            finals = [r["final"] for r in by_seed.values()]
            tried.append(
                {
                    "method": name,
                    "inner lr": lr,
                    "mean final": statistics.mean(finals),
                    "per seed": " ".join(f"{f:.4f}" for f in finals),
                }
            )
        lr_best = min(by_lr, key=lambda lr: statistics.mean(r["final"] for r in by_lr[lr].values()))
        best[name] = (lr_best, by_lr[lr_best])
    return tried, best


def _sent(by_seed: dict) -> float:
    return statistics.mean(r["bytes_per_peer"] for r in by_seed.values())


def best_rows(best: dict) -> list[dict]:
    dense = _sent(best[DENSE][1]) if DENSE in best else None
    rows = []
    for name, (lr, by_seed) in best.items():
        finals = [r["final"] for r in by_seed.values()]
        rows.append(
            {
                "method": name,
                "inner lr": lr,
                "held-out mean": statistics.mean(finals),
                "spread (max-min)": max(finals) - min(finals),
                "per seed": " ".join(f"{f:.4f}" for f in finals),
                "MB sent/peer": _sent(by_seed) / 1e6,
                "bytes vs dp": dense / _sent(by_seed) if dense else None,
            }
        )
    return rows


def diloco_verdict(best: dict, seeds: tuple[int, ...]) -> dict[str, dict]:
    """Per SparseLoCo method: below the best DiLoCo of every seed? how many fewer bytes?"""
    diloco = [n for n in best if n.startswith("diloco")]
    if not diloco:
        return {}
    best_diloco_per_seed = {s: min(best[n][1][s]["final"] for n in diloco) for s in seeds}
    return {
        n: {
            "beats_best_diloco_every_seed": all(
                best[n][1][s]["final"] <= best_diloco_per_seed[s] for s in seeds
            ),
            "fewer_bytes_than_diloco": min(_sent(best[d][1]) for d in diloco) / _sent(best[n][1]),
        }
        for n in best
        if n.startswith("sparseloco")
    }


def frontier_rows(best: dict, size: dict) -> list[dict]:
    """Bytes per peer per round and final loss per seed; the gap to dense AdamW per seed and
    the share of covenant-72b's gap each method closes, (gap_cov − gap) / gap_cov."""
    seeds = size["seeds"]
    dense = {s: best[DENSE][1][s]["final"] for s in seeds} if DENSE in best else None
    cov = {s: best[COVENANT][1][s]["final"] for s in seeds} if COVENANT in best else None
    rows = []
    for name, (_, by_seed) in sorted(best.items(), key=lambda kv: _sent(kv[1][1])):
        row: dict[str, Any] = {
            "method": name,
            "kB/peer/round": _sent(by_seed) / size["rounds"] / 1e3,
            "final per seed": " ".join(f"{by_seed[s]['final']:.4f}" for s in seeds),
        }
        if dense:
            gaps = [by_seed[s]["final"] - dense[s] for s in seeds]
            row["gap to dp per seed"] = " ".join(f"{g:.4f}" for g in gaps)
            if cov and name != DENSE:
                closed = [(cov[s] - by_seed[s]["final"]) / (cov[s] - dense[s]) for s in seeds]
                row["closes of covenant gap"] = " ".join(f"{c:+.1%}" for c in closed)
        if cov:
            row["at or below covenant-72b every seed"] = all(
                by_seed[s]["final"] <= cov[s] for s in seeds
            )
        rows.append(row)
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(best: dict, size: dict, name: str) -> Path:
    plt = _plt()
    per_round = size["inner_steps"] * size["batch"] * size["model"].block_size
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, (lr, by_seed) in best.items():
        curves = [r["curve"] for r in by_seed.values()]
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
        x = [(i + 1) * per_round for i in range(len(mean))]
        color = plt.get_cmap("tab20")(len(ax.lines) % 20)
        ax.plot(x, mean, marker="o", ms=3, color=color, label=f"{method} (inner lr {lr})")
    ax.set_xlabel("tokens per peer")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(f"{size['peers']} peers, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, name)


def plot_frontier(best: dict, size: dict, name: str) -> Path:
    """Final held-out loss against bytes per peer per round: a marker per seed, a line
    between a configuration's seeds; left every method on log-scaled bytes, right the
    SparseLoCo configurations on linear bytes, each nudged sideways so equal bytes stay
    apart, with the legend beside them."""
    plt = _plt()
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 5), width_ratios=(1, 1.15))
    markers = "os^Dv<>pP*Xh"
    sparse = [m for m in best if m.startswith("sparseloco")]
    for i, (method, (lr, by_seed)) in enumerate(best.items()):
        x = _sent(by_seed) / size["rounds"]
        finals = [by_seed[s]["final"] for s in size["seeds"]]
        style = dict(marker=markers[i % len(markers)], color=plt.get_cmap("tab20")(i % 20))
        full.plot([x] * len(finals), finals, ms=6, lw=1, **style)
        if method in sparse:
            nudge = 20.0 * (sparse.index(method) - len(sparse) / 2)
            label = f"{method}{' (covenant-72b)' if method == COVENANT else ''}, inner lr {lr}"
            zoom.plot([x + nudge] * len(finals), finals, ms=7, lw=1, label=label, **style)
    full.set_xscale("log")
    full.set_title(f"{size['peers']} peers, one marker per seed {list(size['seeds'])}")
    zoom.set_title("SparseLoCo configurations (nudged sideways)")
    for ax in (full, zoom):
        ax.set_xlabel("bytes sent per peer per round")
        ax.grid(alpha=0.3, which="both")
    full.set_ylabel(f"held-out loss after {size['rounds']} rounds (nats/byte)")
    zoom.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, f"{name}-frontier")


def _save(fig, stem: str) -> Path:
    from benchmarks.common import RESULTS

    fig.tight_layout()
    path = RESULTS / f"{stem}.png"
    fig.savefig(path, dpi=120)
    fig.clf()
    _plt().close(fig)
    return path


if __name__ == "__main__":
    main()
