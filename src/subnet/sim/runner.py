"""Run a simulated swarm: the real miner and validator roles as processes on a local chain.

:func:`run` writes the node configs (:mod:`subnet.sim.plan`), starts one process per node
(:mod:`subnet.sim.launch`), opens window 0 once every node is up (with idle skipping, the
chain itself does when every node waits for it), and follows the first
validator's ``history.jsonl`` window by window: the console table, ``metrics.jsonl``, then
``peers.jsonl``, ``summary.json`` and the plots when every node has finished.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gauntlet import SqliteSubnet
from subnet.base import HISTORY_FILE
from subnet.sim.config import SimConfig
from subnet.sim.launch import NodeProcesses, NodeSpec, ParticipantError
from subnet.sim.plan import block_time_s, chain_path, node_specs
from subnet.sim.report import plot_run, window_table

#: how long the nodes may take to import, load the data and commit (a loaded 2-core box).
STARTUP_TIMEOUT_S = 300.0


@dataclass
class RunResult:
    """Where a run wrote its files and its headline numbers."""

    out: Path
    summary: dict[str, Any]


@dataclass
class PeerLog:
    """One miner's per-window records, read from its ``history.jsonl``."""

    peer: str
    kind: str
    windows: list[dict[str, Any]] = field(default_factory=list)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events a node has logged so far (a line still being written is skipped)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            break
    return events


def _history(cfg: SimConfig, hotkey: str) -> list[dict[str, Any]]:
    events = read_events(cfg.out / "nodes" / hotkey / HISTORY_FILE)
    return [e for e in events if "window" in e]


def _miner_logs(cfg: SimConfig, specs: list[NodeSpec]) -> list[PeerLog]:
    return [
        PeerLog(s.hotkey, s.kind, _history(cfg, s.hotkey))
        for s in specs
        if s.config.role == "miner"
    ]


def _metrics_record(cfg: SimConfig, entry: dict[str, Any]) -> dict[str, Any]:
    tokens_per_window = cfg.inner_steps * cfg.batch_size * cfg.model.block_size
    return {
        "window": entry["window"],
        "tokens_per_peer": (entry["window"] + 1) * tokens_per_window,
        "heldout_loss": entry["heldout_loss"],
        "aggregated": entry["aggregated"],
        "validator": entry["peers"],
        "validator_seconds": entry["seconds"],
    }


def _wait_for_rows(cfg: SimConfig, specs: list[NodeSpec], window: int, timeout: float) -> None:
    """Let the honest miners log ``window`` (their step ends after the validator's) so the
    printed table shows their rows."""
    end = time.monotonic() + timeout
    honest = [s.hotkey for s in specs if s.kind == "honest"]
    while time.monotonic() < end:
        if all(any(r["window"] == window for r in _history(cfg, h)) for h in honest):
            return
        time.sleep(0.02)


def _follow(
    cfg: SimConfig, specs: list[NodeSpec], nodes: NodeProcesses, progress: bool, echo: bool
) -> list[dict[str, Any]]:
    """Write a metrics line (and print a table) for each window the first validator scores."""
    primary = cfg.validator_ids[0]
    records: list[dict[str, Any]] = []
    bar = tqdm(total=cfg.windows, desc="windows", unit="win", disable=not progress)
    with (cfg.out / "metrics.jsonl").open("w") as metrics:
        while not records or records[-1]["window"] < cfg.windows - 1:
            nodes.check()
            fresh = _history(cfg, primary)[len(records) :]
            if not fresh:
                if not nodes.procs[primary].is_alive():
                    break  # it finished (it skips windows it fell too far behind for)
                time.sleep(0.05)
                continue
            for entry in fresh:
                record = _metrics_record(cfg, entry)
                records.append(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(record["window"] + 1 - bar.n)
                bar.set_postfix(heldout=f"{record['heldout_loss']:.3f}")
                if echo:
                    _wait_for_rows(cfg, specs, record["window"], timeout=cfg.window_seconds * 2)
                    table = window_table(record, _miner_logs(cfg, specs), record["window"])
                    tqdm.write(table)
    bar.close()
    return records


def _validators_agree(cfg: SimConfig, chain: SqliteSubnet) -> bool | None:
    """With several validators: whether their last weight rows on chain are identical."""
    if cfg.validators < 2:
        return None
    hotkeys, _, matrix = chain.weight_matrix()
    rows = [matrix[hotkeys.index(v)] for v in cfg.validator_ids if v in hotkeys]
    return len(rows) == cfg.validators and all(np.array_equal(rows[0], r) for r in rows[1:])


def run(cfg: SimConfig, *, progress: bool = True, echo: bool = True) -> RunResult:
    """Run ``cfg`` and write its files into ``cfg.out`` (see the module docstring).

    Raises:
        ParticipantError: a node process failed or did not start or finish in time.
    """
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    specs = node_specs(cfg)
    chain = SqliteSubnet(chain_path(cfg), netuid=1, block_time_s=block_time_s(cfg))
    if cfg.skip_idle:  # window 0 then opens as soon as every node waits for it
        chain.skip_idle([s.hotkey for s in specs])
    chain.close()  # the nodes may fork from this process: no open database goes with them
    try:
        with NodeProcesses(specs, cfg.out, cfg.windows, cfg.threads) as nodes:
            chain = SqliteSubnet(chain_path(cfg), netuid=1, block_time_s=block_time_s(cfg))
            nodes.wait_ready(chain, STARTUP_TIMEOUT_S)
            if not cfg.skip_idle:
                nodes.open_window(chain, 0, cfg.blocks_per_window)
            records = _follow(cfg, specs, nodes, progress, echo)
            nodes.wait_exit(timeout_s=cfg.deadline_s + 4 * cfg.window_seconds)
        agree = _validators_agree(cfg, chain)
    finally:
        chain.close()
    if not records:
        raise ParticipantError(f"the validator scored no window (see {cfg.out / 'logs'})")
    logs = _miner_logs(cfg, specs)
    start = next(e for e in read_events(cfg.out / "nodes" / cfg.validator_ids[0] / HISTORY_FILE))
    summary = _summary(cfg, records, logs, start["heldout_loss"], time.time() - started)
    summary["validators_agree"] = agree
    summary.update(_memory(nodes))
    (cfg.out / "peers.jsonl").write_text(
        "".join(
            json.dumps({"peer": p.peer, "kind": p.kind, "windows": p.windows}) + "\n" for p in logs
        )
    )
    summary["plots"] = plot_run(cfg.out, records, logs, start["heldout_loss"])
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return RunResult(cfg.out, summary)


def _memory(nodes: NodeProcesses) -> dict[str, Any]:
    """Peak memory of the process tree. ``peak_pss_mb``: the largest sampled sum of the
    nodes' proportional set sizes (pages the forked nodes share counted once) plus this
    process's peak RSS; ``peak_rss_mb_per_node``: each node's own high-water mark."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "peak_pss_mb": (nodes.peak_pss + own) / 2**20,
        "peak_rss_mb_per_node": {h: b / 2**20 for h, b in sorted(nodes.peak_rss.items())},
    }


def _summary(
    cfg: SimConfig,
    records: list[dict[str, Any]],
    logs: list[PeerLog],
    initial: float,
    seconds: float,
) -> dict[str, Any]:
    last = records[-1]
    honest = [p for p in logs if p.kind == "honest"]
    sent = [w["bytes_sent"] for p in honest for w in p.windows if "bytes_sent" in w]
    n_params = _param_count(cfg)
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
        "tokens_per_peer": last["tokens_per_peer"],
        "bytes_sent_per_window_mean": sum(sent) / len(sent) if sent else 0,
        "dense_fp32_bytes_per_window": 4 * n_params,
        "compression_vs_fp32": (4 * n_params) / (sum(sent) / len(sent)) if sent else None,
        "final_weights": weights,
        "adversary_weight_total": sum(weights[p] for p in adv),
        "honest_gathered_every_window": all(
            r["validator"].get(p, {}).get("status") == "evaluated"
            for r in records
            for p in cfg.honest_ids
        ),
        "honest_aggregated_fraction": sum(
            p in r["aggregated"] for r in records for p in cfg.honest_ids
        )
        / (len(records) * len(cfg.honest_ids)),
        "honest_replayed_windows": sum(1 for p in honest for w in p.windows if w.get("replayed")),
    }


def _param_count(cfg: SimConfig) -> int:
    from sparseloco.models.gpt import GPT

    return sum(math.prod(p.shape) for p in GPT(cfg.model).parameters())
