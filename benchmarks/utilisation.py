"""Compute utilisation: blocking vs overlapped SparseLoCo rounds over shaped WAN links.

Every run trains the same byte-level GPT (the convergence benchmark's CPU model) with
``--peers`` peers, each an OS process with one torch thread, on the same data and the same
number of tokens (``--rounds`` × H=``--inner-steps`` inner steps); only the round mode and
the link differ:

* ``blocking``: ``outer.step()`` publishes, gathers and applies before the next inner step;
* ``overlap τ=H, message deferred``: ``SparseLoCo(..., overlap=True)`` stepped as
  ``OuterLoop(..., defer_message=True)`` does; the boundary keeps window k's Δ, applies
  window k−1's aggregate (published, gathered and aggregated in the background during
  window k's inner steps), starts window k+1 from :class:`~sparseloco.OverlapConfig`'s
  prediction of the next global model and returns, leaving window k's encode to the
  background round; the prediction's own-message step is added after window k+1's first
  inner step (``step(defer_message=True)``, then ``apply_message()``);
* ``overlap τ=H, message at the boundary``: the same rule with the boundary encoding the
  message and adding its step (``step()``, as ``OuterLoop``'s default does);
  ``own progress only`` uses ``OverlapConfig.local()`` (a = 0, w = 1, v = 0: the global
  model plus the own progress, the earliest rule) and ``previous rule`` a = 0.5, w = 0.75,
  v = 0 (the default before the own message's step); these two run at 1 Gbit/s only;
* ``overlap τ``: the deferred one, with each aggregate applied τ=``--apply-after`` inner
  steps into the next window (``outer.finish()`` there, as ``OuterLoop(apply_after=τ)``
  does);
* ``overlap τ, no wait``: applied at the first inner step from τ on at which the round has
  arrived (``OuterLoop(apply_after=τ, wait=False)``): training never waits before the
  boundary, and the step it is applied at, so the run's trajectory, depends on timing
  (printed per run, and saved per peer as ``applied_after``: the window's inner steps done
  before each apply).

The exchange is netcomm's ``StorageExchange`` on a moto S3 server on loopback (its own
process). Each peer reaches it through its own :class:`netcomm.LinkProxy` (all proxies in
one more process), so every byte of its publishes and gathers crosses real sockets paced by
its link: the token bucket of each direction and half the RTT each way. The buckets' burst
is 10 ms of traffic, at least one 1500-byte packet (the library's default floor of 64 KiB
would let a whole ~6 KB compressed update through unpaced). Links: ``--links`` (default
10 Mbit/s, 100 Mbit/s, 1 Gbit/s, each with ``--rtt``) and ``matched``: the rate at which a
blocking round's communication takes about as long as its compute, calibrated from the
blocking 1 Gbit/s run (its fixed per-round costs included).

Reported per run: per-peer compute utilisation (inner-step seconds ÷ wall seconds from the
common start to the end of the last round, the final ``finish()`` included; "w/o drain"
leaves that out), the time per round that holds up training ("exposed": wall minus
compute) split into compute / publish (check + encode + upload; overlapped: the finite check
and keeping Δ, and the message's encode where the boundary does it; the rest is in the
background) / gather (overlapped: the wait for the background round, and for the deferred
message step) / apply (aggregate + outer step; overlapped: the outer step and the start,
and adding the deferred message step; the aggregate is in the background), the background
rounds' own duration (hidden), and the held-out loss after
equal tokens. On a machine with
spare cores the hidden work is free; on 2 shared cores it slows the inner steps (compare
the modes' compute seconds per round), and wall times of different runs compare only while
the machine's load stays the same. The loss depends only on the mode and the seed when
every update arrives every round (the benchmark checks that the final models agree across
peers and links); ``--seeds`` adds 1 Gbit/s runs for the other seeds, and
``--loss-rounds`` (default 60) runs every mode that many rounds at 1 Gbit/s for each seed, a
longer horizon for the loss at equal tokens (the 10-round runs end while the loss still falls
steeply). Prints tables,
writes ``results/utilisation.json`` and ``results/utilisation.png`` (``--from-json`` redraws
them from a saved run).

    python benchmarks/utilisation.py            # 2 seeds (the README's 4-seed run: 18 min)
    python benchmarks/utilisation.py --quick    # 4 rounds of 10 steps, one seed
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Run as a file, this folder would come first on sys.path (and its gauntlet.py would shadow the
# gauntlet package); the repository root goes there instead, for ``benchmarks.*`` imports.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from benchmarks.exchange import s3_config, start_links  # noqa: E402
from netcomm import (  # noqa: E402
    Ed25519Signer,
    ExchangeConfig,
    ModelSpec,
    PeerRecord,
    S3Storage,
    StaticDirectory,
    StorageExchange,
    parse_link,
)
from sparseloco import OverlapConfig, SparseLoCo, preset  # noqa: E402
from sparseloco.data import TokenDataset, stdlib_corpus  # noqa: E402
from sparseloco.loop import apply_due  # noqa: E402
from sparseloco.models import GPT, GPTConfig  # noqa: E402

MODEL = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)
CORPUS_BYTES = 2_000_000
MODES = ("blocking", "overlap", "overlap-boundary", "overlap-tau", "overlap-ready")
#: earlier start rules at τ = H, run at 1 Gbit/s only: the global model plus the own
#: progress (OverlapConfig.local()), and the default before the message term (v = 0)
RULES = {
    "overlap-local": OverlapConfig.local(),
    "overlap-prev": OverlapConfig(extrapolation=0.5, own_weight=0.75, message_weight=0.0),
}
#: modes whose boundary encodes the message and adds its step to the start itself (the
#: others step with defer_message=True and apply_message() after the first inner step)
AT_BOUNDARY = ("overlap-boundary",)
#: the bars' names in the plot (``tau``: ``--apply-after``)
SHORT = {
    "blocking": "blocking",
    "overlap": "τ=H deferred",
    "overlap-boundary": "τ=H boundary",
    "overlap-tau": "τ={tau}",
    "overlap-ready": "τ≥{tau}, no wait",
}
#: modes whose trajectory depends on timing (the step at which an aggregate arrives)
TIMED = ("overlap-ready",)
#: the setting of the longer runs at 1 Gbit/s (``--loss-rounds``)
LONG = "1gbit-long"


# -- one peer (runs in a worker process) ---------------------------------------------------


def _storage(bucket: str, endpoint: str) -> S3Storage:
    return S3Storage(s3_config(endpoint, bucket, concurrency=8))


def _split(report: Any, mode: str) -> dict[str, float]:
    """One boundary's seconds that hold up training, and the overlapped round's hidden ones.

    publish: check + encode + the upload (overlapped: the finite check, keeping Δ and, when
    the boundary adds the message's step, encoding the message; the upload is in the
    background); gather: the gather (overlapped: the wait for the background round, and for
    the deferred message step); apply: aggregate and outer step (overlapped: the outer step
    and the start, and adding the deferred message step; the aggregate is in the
    background); hidden: the background round's encode (unless the boundary did) and
    error-feedback commit + publish + gather + aggregate.
    """
    t = report.timings
    if mode == "blocking":
        return {
            "publish": t.get("check", 0.0) + t.get("encode", 0.0) + t.get("publish", 0.0),
            "gather": t.get("gather", 0.0),
            "apply": t.get("aggregate_step", 0.0),
            "hidden": 0.0,
        }
    background = ("encode", "publish", "gather", "aggregate")
    return {
        "publish": t.get("check", 0.0) + t.get("encode_message", 0.0),
        "gather": t.get("wait", 0.0) + t.get("message_wait", 0.0),
        "apply": t.get("step", 0.0) + t.get("message", 0.0),
        "hidden": sum(t.get(k, 0.0) for k in background),
    }


def run_peer(index: int, job: dict[str, Any], data: TokenDataset, barrier: Any) -> dict[str, Any]:
    """Train one peer for ``job["rounds"]`` rounds; returns its timings and final model."""
    peers = [f"peer{i}" for i in range(job["peers"])]
    me, mode = peers[index], job["mode"]
    signers = {p: Ed25519Signer.from_seed(bytes([i + 1]) * 32) for i, p in enumerate(peers)}
    storage = _storage(job["bucket"], job["urls"][index])  # every request over my link
    directory = StaticDirectory(PeerRecord(p, storage, signers[p].public_key) for p in peers)
    torch.manual_seed(job["seed"])
    model = GPT(MODEL)
    config = ExchangeConfig(
        deadline_s=job["deadline_s"],
        poll_interval_s=0.05,
        codec=preset("covenant-72b").codec,
        compression_level=1,
    )
    ex = StorageExchange(me, storage, directory, signers[me], ModelSpec.from_module(model), config)
    overlap = RULES.get(mode, mode != "blocking")  # True: OverlapConfig()
    outer = SparseLoCo(model.named_parameters(), ex, "covenant-72b", overlap=overlap)
    tau = job["apply_after"] if mode in ("overlap-tau", "overlap-ready") else None
    inner = torch.optim.AdamW(model.parameters(), lr=job["inner_lr"], weight_decay=0.1)
    gen = torch.Generator().manual_seed(1000 * job["seed"] + index)
    rounds: list[dict[str, Any]] = []
    tally = {"not_ok": 0, "sent": 0, "received": 0}

    def outer_call(fn: Any) -> dict[str, Any]:
        t = time.perf_counter()
        report = fn()
        out = {"boundary": time.perf_counter() - t, **_split(report, mode)}
        tally["not_ok"] += sum(s.status != "ok" for s in report.statuses.values())
        tally["sent"] += report.bytes_sent
        tally["received"] += report.bytes_received
        return out | {"timings": report.timings}

    boundary = functools.partial(outer.step, defer_message=mode not in AT_BOUNDARY)
    barrier.wait(timeout=300)
    start = time.perf_counter()
    for _ in range(job["rounds"]):
        compute, mid = 0.0, None
        t0 = time.perf_counter()
        for step in range(job["inner_steps"]):
            # τ steps in, as OuterLoop(apply_after=τ, wait=...) does: apply g (finish)
            if apply_due(outer, step, tau, wait=mode != "overlap-ready"):
                compute += time.perf_counter() - t0
                mid = outer_call(outer.finish) | {"applied_after": step}
                t0 = time.perf_counter()
            inner_step(model, inner, data, gen, job["batch"])
            end = time.perf_counter()
            if outer.apply_message():  # after the first inner step, as OuterLoop does
                compute += end - t0
                t0 = time.perf_counter()
        compute += time.perf_counter() - t0
        rounds.append({"compute": compute, **outer_call(boundary), "mid": mid})
    drain = outer_call(outer.finish) if outer.in_flight is not None else None
    wall = time.perf_counter() - start
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out = {
        "peer": me,
        "wall_s": wall,
        "rounds": rounds,
        "drain": drain,
        "not_ok_statuses": tally["not_ok"],
        "bytes_sent": tally["sent"],
        "bytes_received": tally["received"],
        "model_digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16],
    }
    if index == 0:
        out["heldout_loss"] = heldout_loss(model, data, job["batch"])
    storage.close()
    return out


def inner_step(
    model: GPT, inner: torch.optim.Optimizer, data: TokenDataset, gen: torch.Generator, batch: int
) -> None:
    """One inner step on ``batch`` random training samples drawn from ``gen``."""
    ids = torch.randint(0, data.num_train, (batch,), generator=gen).tolist()
    _, loss = model(*data.train_batch(ids))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    inner.step()
    inner.zero_grad(set_to_none=True)


@torch.no_grad()
def heldout_loss(model: GPT, data: TokenDataset, batch: int, batches: int = 16) -> float:
    model.eval()
    losses = [
        float(model(*data.heldout_batch(range(i * batch, (i + 1) * batch)))[1])
        for i in range(batches)
    ]
    return statistics.mean(losses)


def worker(index: int, inbox: Any, outbox: Any, barrier: Any) -> None:
    """A peer process: runs jobs from ``inbox`` until it gets ``None``."""
    torch.set_num_threads(1)
    data = TokenDataset(stdlib_corpus(CORPUS_BYTES), MODEL.block_size)
    while (job := inbox.get()) is not None:
        try:
            outbox.put(run_peer(index, job, data, barrier))
        except BaseException:
            barrier.abort()
            outbox.put({"peer": f"peer{index}", "error": traceback.format_exc()})


# -- the swarm (main process) --------------------------------------------------------------


class Swarm:
    """``peers`` worker processes that run one job at a time, all together."""

    def __init__(self, peers: int) -> None:
        ctx = mp.get_context("spawn")
        self.barrier = ctx.Barrier(peers)
        self.inboxes = [ctx.Queue() for _ in range(peers)]
        self.outbox = ctx.Queue()
        self.procs = [
            ctx.Process(target=worker, args=(i, q, self.outbox, self.barrier), daemon=True)
            for i, q in enumerate(self.inboxes)
        ]
        for p in self.procs:
            p.start()

    def run(self, job: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        for q in self.inboxes:
            q.put(job)
        results = [self.outbox.get(timeout=timeout) for _ in self.inboxes]
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError("a peer failed:\n" + "\n".join(errors))
        return sorted(results, key=lambda r: r["peer"])

    def close(self) -> None:
        for q in self.inboxes:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)


_buckets = itertools.count()


def _burst(link: str) -> float | None:
    """10 ms of traffic, at least one packet: the library's 64 KiB default would let a
    6 KB update through unpaced."""
    bit_s = parse_link(link).down_bit_s
    return None if bit_s is None else max(1500.0, bit_s / 8 / 100)


def one_run(
    swarm: Swarm, endpoint: str, link: str, mode: str, seed: int, args, rounds: int | None = None
) -> dict[str, Any]:
    bucket = f"util-{os.getpid()}-{next(_buckets)}"
    _storage(bucket, endpoint).create_bucket()
    proxy, urls = start_links(endpoint, link, args.peers, _burst(link))
    job = {
        "mode": mode,
        "seed": seed,
        "bucket": bucket,
        "urls": urls,
        "peers": args.peers,
        "rounds": rounds or args.rounds,
        "inner_steps": args.inner_steps,
        "batch": args.batch,
        "inner_lr": args.inner_lr,
        "apply_after": args.apply_after,
        "deadline_s": 600.0,
    }
    try:
        peers = swarm.run(job, timeout=1800)
    finally:
        proxy.stdin.close()  # type: ignore[union-attr]
        proxy.wait(timeout=30)
    return summarise(link, mode, seed, peers)


def summarise(link: str, mode: str, seed: int, peers: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round means (totals over the run, drain included, ÷ rounds) and utilisation."""
    n = len(peers[0]["rounds"])
    per_peer = []
    for p in peers:
        calls = [c for r in p["rounds"] for c in (r, r["mid"]) if c is not None]
        calls += [p["drain"]] if p["drain"] is not None else []
        phases = {"compute": sum(r["compute"] for r in p["rounds"])}
        phases |= {k: sum(c[k] for c in calls) for k in ("publish", "gather", "apply", "hidden")}
        per_peer.append(
            {
                "peer": p["peer"],
                "utilisation": phases["compute"] / p["wall_s"],
                "utilisation_without_drain": phases["compute"]
                / (p["wall_s"] - (p["drain"]["boundary"] if p["drain"] else 0.0)),
                "wall_s": p["wall_s"],
                **{f"{k}_s_per_round": v / n for k, v in phases.items()},
                "round_s": p["wall_s"] / n,
                "bytes_sent": p["bytes_sent"],
                "bytes_received": p["bytes_received"],
                "not_ok_statuses": p["not_ok_statuses"],
                # inner steps of the window done before each mid-window apply
                "applied_after": [r["mid"]["applied_after"] for r in p["rounds"] if r["mid"]],
                "report_timings_mean": {
                    k: statistics.mean(r["timings"].get(k, 0.0) for r in p["rounds"])
                    for k in sorted({k for r in p["rounds"] for k in r["timings"]})
                },
            }
        )
    digests = {p["model_digest"] for p in peers}
    if len(digests) != 1:
        raise RuntimeError(f"{link}/{mode}: peers ended with different models {digests}")
    mean = {
        k: statistics.mean(p[k] for p in per_peer)
        for k in per_peer[0]
        if k.endswith("_s_per_round") or k.startswith("utilisation") or k == "round_s"
    }
    return {
        "link": link,
        "mode": mode,
        "seed": seed,
        "rounds": n,
        "per_peer": per_peer,
        "mean": mean,
        "heldout_loss": peers[0]["heldout_loss"],
        "model_digest": digests.pop(),
        "all_updates_arrived": all(p["not_ok_statuses"] == 0 for p in per_peer),
    }


def matched_link(run: dict[str, Any], rtt: str) -> str:
    """The rate at which a blocking round's communication (its fixed costs at 1 Gbit/s plus
    its bytes) takes as long as its compute."""
    m = run["mean"]
    fixed = m["publish_s_per_round"] + m["gather_s_per_round"]
    bits = 8 * statistics.mean(
        (p["bytes_sent"] + p["bytes_received"]) / run["rounds"] for p in run["per_peer"]
    )
    budget = max(m["compute_s_per_round"] - fixed, 0.25 * m["compute_s_per_round"])
    kbit = float(f"{bits / budget / 1e3:.2g}")
    return f"{kbit:g}kbit" + (f",rtt={rtt}" if rtt else "")


def rate_of(link: str) -> float:
    return parse_link(link).down_bit_s or math.inf


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--inner-steps", type=int, default=30, help="H (Covenant's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--inner-lr", type=float, default=2e-3, help="tuned in convergence.json")
    ap.add_argument("--links", nargs="+", default=["1gbit", "100mbit", "10mbit"])
    ap.add_argument("--rtt", default="20ms", help="added to every link ('' for none)")
    ap.add_argument(
        "--apply-after", type=int, default=10, help="tau of the overlap-tau mode (inner steps)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--loss-rounds",
        type=int,
        default=60,
        help="also run every mode this many rounds at 1 Gbit/s per seed, for the loss (0: not)",
    )
    ap.add_argument("--quick", action="store_true", help="4 rounds of 10 steps, one seed")
    ap.add_argument(
        "--name",
        help="results/<name>.json and .png (default: utilisation; with --from-json, the "
        "saved run's name)",
    )
    ap.add_argument("--from-json", help="re-render the tables and plot of a previous run")
    args = ap.parse_args()
    if args.from_json:
        old = json.loads(Path(args.from_json).read_text())
        name = args.name or old["args"]["name"]
        saved = argparse.Namespace(**(old["args"] | {"name": name, "from_json": None}))
        report(
            old["runs"],
            saved,
            old["load_average_before"],
            old["load_average_after"],
            old["seconds"],
            old["command"],
        )
        return
    args.name = args.name or "utilisation"
    if args.quick:
        args.rounds, args.inner_steps, args.seeds, args.apply_after = 4, 10, [0], 4
        args.loss_rounds = 0
    if "1gbit" not in args.links:
        args.links.insert(0, "1gbit")
    args.links.sort(key=lambda s: -rate_of(s))  # 1gbit first: it calibrates "matched"
    suffix = f",rtt={args.rtt}" if args.rtt else ""
    from benchmarks.exchange import start_server

    load_before = os.getloadavg()
    started = time.time()
    server, endpoint = start_server()
    swarm = Swarm(args.peers)
    runs: list[dict[str, Any]] = []
    try:
        for link in [*args.links, "matched"]:
            if link == "matched":
                base = next(
                    r for r in runs if r["link"] == "1gbit" + suffix and r["mode"] == "blocking"
                )
                spec = matched_link(base, args.rtt)
            else:
                spec = link + suffix
            for mode in MODES:
                runs.append(one_run(swarm, endpoint, spec, mode, args.seeds[0], args))
                runs[-1]["setting"] = "matched" if link == "matched" else link
                print_progress(runs[-1])
        for seed in args.seeds:
            for mode in (*MODES, *RULES) if seed != args.seeds[0] else RULES:
                runs.append(one_run(swarm, endpoint, "1gbit" + suffix, mode, seed, args))
                runs[-1]["setting"] = "1gbit"
                print_progress(runs[-1])
        for seed in args.seeds if args.loss_rounds else ():
            for mode in (*MODES, *RULES):
                long = one_run(
                    swarm, endpoint, "1gbit" + suffix, mode, seed, args, args.loss_rounds
                )
                runs.append(long | {"setting": LONG})
                print_progress(runs[-1])
    finally:
        swarm.close()
        server.terminate()
        server.wait(timeout=10)
    load_after = os.getloadavg()
    report(runs, args, load_before, load_after, time.time() - started)


def print_progress(run: dict[str, Any]) -> None:
    m = run["mean"]
    print(
        f"{run['link']:>22} {run['mode']:>11} seed {run['seed']}: utilisation "
        f"{m['utilisation']:.3f}, round {m['round_s']:.2f} s, loss {run['heldout_loss']:.4f}",
        flush=True,
    )


def applied_steps(runs: list[dict[str, Any]]) -> list[str]:
    """Where the no-wait runs applied their aggregates: the inner steps of the window done
    before each mid-window apply, over all peers (median and range); the others were applied
    at the window's end."""
    lines = []
    for r in runs:
        if r["mode"] != "overlap-ready" or "applied_after" not in r["per_peer"][0]:
            continue
        steps = sorted(s for p in r["per_peer"] for s in p["applied_after"])
        where = (
            f"after {statistics.median(steps):g} inner steps (median; {steps[0]}-{steps[-1]})"
            if steps
            else "none"
        )
        mid = sum(len(p["applied_after"]) for p in r["per_peer"])
        total = r["rounds"] * len(r["per_peer"])
        lines.append(
            f"no wait, {r['link']}, {r['rounds']} rounds, seed {r['seed']}: "
            f"{mid} of {total} aggregates applied mid-window, {where}"
        )
    return lines


def report(runs, args, load_before, load_after, seconds, command=None) -> None:
    """Print the tables, draw the plot and write the JSON; ``command``: the one that ran
    ``runs`` (a redraw from a saved run keeps that run's)."""
    seed0 = [
        r
        for r in runs
        if r["seed"] == args.seeds[0] and r["mode"] in MODES and r["setting"] != LONG
    ]
    rows = []
    for r in seed0:
        m = r["mean"]
        rows.append(
            {
                "setting": r["setting"],
                "link": r["link"],
                "mode": label(r["mode"], args),
                "util/peer": " ".join(f"{p['utilisation']:.3f}" for p in r["per_peer"]),
                "w/o drain": m["utilisation_without_drain"],
                "round s": m["round_s"],
                "exposed": m["round_s"] - m["compute_s_per_round"],
                "compute": m["compute_s_per_round"],
                "publish": m["publish_s_per_round"],
                "gather": m["gather_s_per_round"],
                "apply": m["apply_s_per_round"],
                "hidden": m["hidden_s_per_round"],
                "loss": r["heldout_loss"],
            }
        )
    print(
        f"\n{args.peers} peers, {args.rounds} rounds x {args.inner_steps} inner steps x "
        f"{args.batch} x {MODEL.block_size} tokens per peer; seconds per round (mean over peers)"
    )
    print_table(rows, list(rows[0]))
    losses = {"1gbit": loss_table(runs, "1gbit", args)}
    print(f"\nheld-out loss at equal tokens (1 Gbit/s runs, {args.rounds} rounds):")
    print_table(losses["1gbit"], list(losses["1gbit"][0]))
    if any(r["setting"] == LONG for r in runs):
        losses[LONG] = loss_table(runs, LONG, args)
        print(f"\nheld-out loss at equal tokens (1 Gbit/s runs, {args.loss_rounds} rounds):")
        print_table(losses[LONG], list(losses[LONG][0]))
    digests = {
        mode: [r["model_digest"] for r in seed0 if r["mode"] == mode]
        for mode in MODES
        if mode not in TIMED
    }
    # only modes that ran at more than one link (a saved run may have one at 1 Gbit/s only)
    same = {mode: len(set(d)) == 1 for mode, d in digests.items() if len(d) > 1}
    for line in applied_steps(runs):
        print(line)
    print(f"final model identical across links (per mode): {same}")
    print(f"load average before {load_before}, after {load_after}; {seconds:.0f} s")
    png = plot(seed0, args)
    path = write_json(
        args.name,
        {
            "command": command or " ".join(["python benchmarks/utilisation.py", *sys.argv[1:]]),
            "args": vars(args),
            "model": MODEL.to_dict(),
            "tokens_per_peer": args.rounds * args.inner_steps * args.batch * MODEL.block_size,
            "table": rows,
            "loss": losses,
            "model_identical_across_links": same,
            "runs": runs,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "cpus": os.cpu_count(),
            "environment": environment(),
            "seconds": seconds,
            "plot": png.name,
        },
    )
    print(f"wrote {path} and {png}")


def loss_table(runs: list[dict[str, Any]], setting: str, args: Any) -> list[dict[str, Any]]:
    """Held-out loss per mode and seed in ``setting``'s runs, and the mean vs blocking's."""
    rows = []
    for mode in (*MODES, *RULES):
        by_seed = {
            r["seed"]: r["heldout_loss"]
            for r in runs
            if (r["mode"], r["setting"]) == (mode, setting)
        }
        if by_seed:
            mean = statistics.mean(by_seed.values())
            rows.append(
                {"mode": label(mode, args)}
                | {f"seed {s}": v for s, v in sorted(by_seed.items())}
                | {"mean": mean}
            )
    for row in rows:
        row["vs blocking"] = f"{row['mean'] / rows[0]['mean'] - 1:+.2%}"
    return rows


def label(mode: str, args: Any) -> str:
    return {
        "blocking": "blocking",
        "overlap": f"overlap τ=H={args.inner_steps}, message deferred",
        "overlap-tau": f"overlap τ={args.apply_after}",
        "overlap-ready": f"overlap τ≥{args.apply_after}, no wait",
        "overlap-local": f"overlap τ=H={args.inner_steps}, own progress only (a=0, w=1, v=0)",
        "overlap-prev": f"overlap τ=H={args.inner_steps}, previous rule (a=0.5, w=0.75, v=0)",
        "overlap-boundary": f"overlap τ=H={args.inner_steps}, message at the boundary",
    }[mode]


def plot(runs: list[dict[str, Any]], args: Any) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import RESULTS

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    settings = list(dict.fromkeys(r["setting"] for r in runs))
    settings.sort(key=lambda s: rate_of(next(r["link"] for r in runs if r["setting"] == s)))
    labels = [next(r["link"] for r in runs if r["setting"] == s).split(",")[0] for s in settings]
    labels = [
        f"{lab}\n(matched)" if s == "matched" else lab
        for s, lab in zip(settings, labels, strict=True)
    ]
    x = range(len(settings))
    # a saved run of an older version may lack a mode at some links: drawn where it ran all
    modes = [
        m
        for m in MODES
        if all(any(r["mode"] == m for r in runs if r["setting"] == s) for s in settings)
    ]
    for mode in modes:  # marker and colour per mode, whichever modes are drawn
        pick = [next(r for r in runs if r["setting"] == s and r["mode"] == mode) for s in settings]
        style = {"marker": "osD^v"[MODES.index(mode)], "color": f"C{MODES.index(mode)}"}
        name = label(mode, args)
        axes[0].plot(x, [r["mean"]["utilisation"] for r in pick], label=name, **style)
        axes[1].plot(x, [r["heldout_loss"] for r in pick], label=name, **style)
    axes[0].axhline(0.97, color="grey", ls=":", lw=1)
    axes[0].set_ylabel("compute utilisation (mean over peers)")
    axes[1].set_ylabel("held-out loss at equal tokens (nats/byte)")
    width = 0.8 / len(modes)
    colors = {"compute": "C2", "publish": "C0", "gather": "C3", "apply": "C1"}
    for j, mode in enumerate(modes):
        pick = [next(r for r in runs if r["setting"] == s and r["mode"] == mode) for s in settings]
        pos = [i + (j - (len(modes) - 1) / 2) * width for i in x]
        bottoms = [0.0] * len(pick)
        for phase, color in colors.items():
            vals = [r["mean"][f"{phase}_s_per_round"] for r in pick]
            axes[2].bar(
                pos,
                vals,
                width,
                bottom=bottoms,
                color=color,
                hatch=["", "//", "\\\\", "..", "xx"][MODES.index(mode)],
                label=phase if j == 0 else None,
                edgecolor="white",
            )
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    axes[2].set_ylabel("s per round (mean over peers)")
    bars = " | ".join(SHORT[m].format(tau=args.apply_after) for m in modes)
    axes[2].set_title(f"bars: {bars}", fontsize=8)
    for ax in axes:
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_xlabel("link (per peer, each way)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{args.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
