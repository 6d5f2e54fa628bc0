"""Run a simulated swarm: participants as threads, the validator on the calling thread."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from subnet.sim.config import SimConfig
from subnet.sim.peers import Adversary, HonestPeer
from subnet.sim.report import plot_run, window_table
from subnet.sim.swarm import Swarm
from subnet.sim.validator import Validator


@dataclass
class RunResult:
    """Where a run wrote its files and its headline numbers."""

    out: Path
    summary: dict[str, Any]


# Every peer and the validator are threads of one process. At Python's default 5 ms switch
# interval a thread running many small torch ops waits up to 5 ms for the GIL after each one
# while the others train (convoying). 0.5 ms keeps the hand-offs short: 3.6x faster on a
# 6-peer run with identical results (benchmarks/simulate.py, 160 s -> 45 s on 2 cores).
SWITCH_INTERVAL_S = 0.0005


@contextmanager
def _thread_settings(threads: int) -> Iterator[None]:
    """Torch intra-op threads and the GIL switch interval for a run, restored afterwards."""
    old_threads, old_interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(threads)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(old_interval)
        torch.set_num_threads(old_threads)


def run(cfg: SimConfig, *, progress: bool = True, echo: bool = True) -> RunResult:
    """Run ``cfg`` and write ``metrics.jsonl``, ``summary.json`` and PNG plots into ``cfg.out``."""
    with _thread_settings(cfg.threads):
        return _run(cfg, progress=progress, echo=echo)


def _run(cfg: SimConfig, *, progress: bool, echo: bool) -> RunResult:
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    swarm = Swarm.build(cfg)
    participants: list[HonestPeer | Adversary] = [HonestPeer(swarm, p) for p in cfg.honest_ids]
    participants += [Adversary(swarm, p, k) for p, k in cfg.adversary_ids.items()]
    validator = Validator(swarm)
    errors: list[str] = []

    def loop(part: HonestPeer | Adversary) -> None:
        try:
            for w in range(cfg.windows):
                part.run_window(w)
        except Exception:
            if not swarm.stop.is_set():
                errors.append(f"{part.peer}: {traceback.format_exc()}")
            swarm.stop.set()

    threads = [threading.Thread(target=loop, args=(p,), daemon=True) for p in participants]
    initial = validator.heldout_loss()
    for t in threads:
        t.start()
    records: list[dict[str, Any]] = []
    tokens_per_window = cfg.inner_steps * cfg.batch_size * cfg.model.block_size
    metrics_path = cfg.out / "metrics.jsonl"
    bar = tqdm(range(cfg.windows), desc="windows", unit="win", disable=not progress)
    try:
        with metrics_path.open("w") as metrics:
            for w in bar:
                if swarm.stop.is_set():
                    break
                report, aggregated, heldout = validator.run_window(w)
                swarm.done[w].set()
                record = {
                    "window": w,
                    "tokens_per_peer": (w + 1) * tokens_per_window,
                    "heldout_loss": heldout,
                    "aggregated": aggregated,
                    "validator": {
                        p: {
                            "status": o.status,
                            "reason": o.reason,
                            "gain_random": o.evaluation.gain_random if o.evaluation else None,
                            "gain_assigned": o.evaluation.gain_assigned if o.evaluation else None,
                            "sync": o.sync.score if o.sync else None,
                            "score": report.scores.get(p, 0.0),
                            "weight": report.weights.get(p, 0.0),
                        }
                        for p, o in sorted(report.outcomes.items())
                    },
                    "validator_seconds": report.timings,
                }
                records.append(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(heldout=f"{heldout:.3f}")
                if echo:
                    _wait_for_rows(participants, w, swarm)
                    tqdm.write(window_table(record, participants, w))
    finally:
        for w in range(cfg.windows):
            swarm.done[w].set()
        for t in threads:
            t.join(timeout=cfg.deadline_s)
    if errors:
        raise RuntimeError("a participant failed:\n" + "\n".join(errors))
    n_params = sum(math.prod(shape) for shape in swarm.spec.shapes.values())
    summary = _summary(cfg, records, participants, initial, time.time() - started, n_params)
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (cfg.out / "peers.jsonl").write_text(
        "".join(
            json.dumps({"peer": p.peer, "kind": p.kind, "windows": p.log.windows}) + "\n"
            for p in participants
        )
    )
    summary["plots"] = plot_run(cfg.out, records, participants, initial)
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return RunResult(cfg.out, summary)


def _wait_for_rows(participants: list, window: int, swarm: Swarm, timeout: float = 30.0) -> None:
    """Let the honest peers finish logging ``window`` (their outer step ends after the
    validator's) so the printed table shows their rows."""
    end = time.monotonic() + timeout
    honest = [p for p in participants if p.kind == "honest"]
    while time.monotonic() < end and not swarm.stop.is_set():
        if all(any(r["window"] == window for r in p.log.windows) for p in honest):
            return
        time.sleep(0.01)


def _summary(
    cfg: SimConfig,
    records: list[dict[str, Any]],
    participants: list[HonestPeer | Adversary],
    initial: float,
    seconds: float,
    n_params: int,
) -> dict[str, Any]:
    last = records[-1] if records else {"validator": {}, "heldout_loss": initial}
    honest = [p for p in participants if p.kind == "honest"]
    sent = [w["bytes_sent"] for p in honest for w in p.log.windows]
    weights = {p: v["weight"] for p, v in last["validator"].items()}
    adv = [p for p in weights if p.startswith("adv-")]
    return {
        "config": cfg.to_dict(),
        "seconds": seconds,
        "windows": len(records),
        "params": n_params,
        "heldout_loss_initial": initial,
        "heldout_loss_final": last["heldout_loss"],
        "heldout_curve": [r["heldout_loss"] for r in records],
        "tokens_per_peer": records[-1]["tokens_per_peer"] if records else 0,
        "bytes_sent_per_window_mean": sum(sent) / len(sent) if sent else 0,
        "dense_fp32_bytes_per_window": 4 * n_params,
        "compression_vs_fp32": (4 * n_params) / (sum(sent) / len(sent)) if sent else None,
        "final_weights": weights,
        "adversary_weight_total": sum(weights[p] for p in adv),
        "honest_gathered_every_window": all(
            r["validator"][p]["status"] == "evaluated" for r in records for p in cfg.honest_ids
        ),
        "honest_aggregated_fraction": (
            sum(p in r["aggregated"] for r in records for p in cfg.honest_ids)
            / (len(records) * len(cfg.honest_ids))
            if records
            else 0.0
        ),
    }
