"""The real miner and validator roles, SIGKILLed at chosen points and restarted, in figures.

``run_scenario`` builds a run with :func:`subnet.sim.plan.node_specs`: P honest miners and
one validator on a local SQLite chain with local-folder storage in the run folder. Each
node is its own process running ``sparseloco miner|validator --config nodes/<hotkey>.toml``
(:class:`subnet.sim.launch.NodeProcesses`), the code a deployment runs. Window 0 opens once
every node has committed; from then on the chain's clock runs on its own, as a real chain's
does: nobody waits for a killed node.

The supervisor only observes what the nodes write, and SIGKILLs them:

* a node's *position* (window and phase) comes from its storage, checkpoints and history:
  a miner is in ``train`` once its proof of window ``w`` is published, in ``published`` once
  its update is, and ``done`` once its checkpoint ``w + 1`` is saved and ``w`` is in its
  ``history.jsonl`` (the last thing it writes for a window); the validator is in
  ``scoring`` once window ``w`` has closed on the chain and ``done`` once its checkpoint
  ``w + 1`` is saved and ``w`` logged;
* at a planned (node, window, phase, delay) it SIGKILLs the node and restarts it (at once,
  or after a downtime) with ``--until-window W-1``, as a process manager would; the node
  resumes from its own state folder (a miner replays the windows it missed, the validator
  skips them). A node's next kill waits until it is back at work, and is skipped when the
  node is by then more than a window past the planned one. The node is stopped (SIGSTOP)
  while the supervisor reads where it dies, so the phase recorded is the one it was in;
* a kill with no delay lands in its phase however short that phase is (a miner's ``train``
  is H small steps, tens of ms): from two phases before it, the supervisor looks at the node
  only while it is stopped and lets it run :data:`STEP_S` between two looks, so the node
  cannot pass the phase between a look and the kill, whatever the load on the machine;
* recovery is read from the node's ``history.jsonl``: a miner has recovered at its first
  trained window with ``out_of_sync`` unset, the validator at its next scored window;
* at the end every node's last checkpoint, the validator's last aggregation set (with the
  digest of its post-step model) and the chain's weights and commitments are read back.

With ``storage_faults`` the nodes' storage is a moto S3 server on 127.0.0.1 behind a
:class:`netcomm.FaultProxy` that breaks that share of the nodes' storage requests (GET,
HEAD, PUT: dropped connections, 503s and 0.5 s delays a quarter each, bodies cut short or
with a flipped byte an eighth each); the supervisor reads the server directly.

Figures (see ``docs/reliability.md``): per kill the phase it landed in, the seconds until the
node was back in sync and the windows it did not train or score; over the run the windows
each miner trained, replayed and re-synced, re-syncs that failed, unexpected exits, and
whether every node ends on the bit-identical model the validator published; the storage
faults injected; the published updates the validator did not aggregate and why; and an
audit of every aggregation set the validator published: its model before the window (its
checkpoint) stepped on the set's updates as stored, read directly from the server, must give
the digest it published (a corrupt payload accepted anywhere on the way would not).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gauntlet import SqliteSubnet
from netcomm import (
    CheckpointStore,
    Ed25519Signer,
    FaultPlan,
    FaultProxy,
    LocalStorage,
    ModelSpec,
    ObjectNotFoundError,
    S3Config,
    S3Storage,
    Storage,
    StorageExchange,
    update_key,
)
from sparseloco.models.gpt import GPT, GPTConfig
from sparseloco.optim import SparseLoCo
from subnet.base import HISTORY_FILE
from subnet.commitments import Locator
from subnet.directory import ChainDirectory
from subnet.protocol import PROOFS, UPDATES, Protocol, read_selection, state_digest
from subnet.sim import SimConfig
from subnet.sim.launch import START_BLOCK, NodeProcesses, NodeSpec
from subnet.sim.plan import block_time_s, chain_path, node_specs
from subnet.storage import open_own_storage, open_peer_storage
from subnet.task import gpt_task

#: how long a whole scenario may take (startup on a loaded 2-core box included).
SCENARIO_TIMEOUT_S = 900.0
STARTUP_TIMEOUT_S = 300.0
#: the phases of a window, in order, per role (see the module docstring).
PHASES = {"miner": ("train", "published", "done"), "validator": ("scoring", "done")}
#: how often the supervisor looks at the nodes, and how long a node aimed at by a kill with
#: no delay runs between two looks (it is stopped while looked at).
POLL_S = 0.02
STEP_S = 0.005
#: how often it looks when positions are S3 requests (each look is a few of them).
S3_POLL_S = 0.1


@dataclass(frozen=True)
class KillPoint:
    """Where a SIGKILL lands: ``node`` once it reaches ``phase`` of ``window`` (see
    :data:`PHASES`), ``delay_s`` later; the node is restarted ``down_s`` after the kill."""

    node: str
    window: int
    phase: str
    delay_s: float = 0.0
    down_s: float = 0.0


@dataclass(frozen=True)
class FaultScenario:
    """One supervised run.

    Args:
        name: label in the results.
        peers: honest miner processes (plus one validator process).
        windows: windows every node runs (``W``).
        inner_steps: AdamW steps per window.
        window_s: seconds per window on the chain's clock.
        seed: the run's seed and the kill schedule's.
        kills: SIGKILLs planned at random (:func:`kill_plan`), ignored when ``points``
            are given.
        down_s: how long a randomly killed node stays down before its restart.
        points: kills at chosen points instead of random ones.
        storage_faults: share of the nodes' storage requests the fault proxy breaks; above 0
            the nodes' storage is a loopback S3 server behind it (see the module docstring).
        model: the GPT trained.
    """

    name: str
    peers: int = 3
    windows: int = 6
    inner_steps: int = 10
    window_s: float = 4.0
    seed: int = 0
    kills: int = 0
    down_s: float = 0.0
    points: tuple[KillPoint, ...] = ()
    storage_faults: float = 0.0
    model: GPTConfig = field(
        default_factory=lambda: GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)
    )

    @property
    def planned(self) -> int:
        return len(self.points) or self.kills

    @property
    def s3(self) -> bool:
        return self.storage_faults > 0


# -- storage: a loopback S3 server behind the fault proxy -----------------------------------


def fault_plan(rate: float, seed: int) -> FaultPlan:
    """``rate`` of GET/HEAD/PUT requests broken: a quarter each dropped, 503 and 0.5 s slow,
    an eighth each truncated and corrupted (a PUT's empty reply has nothing to cut or flip)."""
    return FaultPlan(
        drop=rate / 4,
        server_error=rate / 4,
        slow=rate / 4,
        truncate=rate / 8,
        corrupt=rate / 8,
        delay_s=0.5,
        methods=frozenset({"GET", "HEAD", "PUT"}),
        seed=seed,
    )


@dataclass(frozen=True)
class LoopbackS3:
    """A moto S3 server on 127.0.0.1 (``direct``) with a bucket for one run, and the fault
    proxy in front of it that the nodes use."""

    direct: str
    bucket: str
    proxy: FaultProxy


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def loopback_s3(plan: FaultPlan) -> Iterator[LoopbackS3]:
    """Start the server and the proxy; the nodes (forked with this environment) and the
    supervisor get moto's test credentials from the environment meanwhile."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    direct = f"http://127.0.0.1:{server._server.server_port}"
    # moto keeps its buckets per process, not per server: each run gets a bucket of its own
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    try:
        with _environ(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing"):
            S3Storage(S3Config(bucket=bucket, endpoint_url=direct)).create_bucket()
            with FaultProxy(direct, plan) as proxy:
                yield LoopbackS3(direct, bucket, proxy)
    finally:
        server.stop()


def read_access(s3: LoopbackS3 | None, local_root: str) -> Callable[[Locator], Storage]:
    """How the supervisor reads a node's storage from its locator: past the proxy."""
    if s3 is None:
        return partial(open_peer_storage, local_root=local_root)
    return lambda loc: open_peer_storage(dataclasses.replace(loc, endpoint_url=s3.direct), "")


def sim_config(sc: FaultScenario, out: Path, s3: LoopbackS3 | None = None) -> SimConfig:
    """The run's configuration. The validator aggregates every verified update (a killed
    miner's published update counts like any other) and a miner waits two windows for a late
    aggregation set. With ``s3`` the nodes' storage is that bucket, through the proxy."""
    return SimConfig(
        storage=f"s3://{s3.bucket}/run" if s3 else "",
        s3_endpoint=s3.proxy.url if s3 else None,
        aggregate="all",
        peers=sc.peers,
        windows=sc.windows,
        inner_steps=sc.inner_steps,
        model=sc.model,
        corpus_bytes=300_000,
        heldout_batches=1,
        seed=sc.seed,
        out=out,
        window_s=sc.window_s,
        deadline_s=2 * sc.window_s,
    )


def kill_plan(sc: FaultScenario, specs: list[NodeSpec]) -> list[KillPoint]:
    """``sc.points``, or ``sc.kills`` seeded random ones: a node, a window, a phase and a
    delay of up to 0.3 s into it.

    Random windows stop two before the last, so a killed node has a window left to recover
    in. The plan depends on the seed and the run's shape only, so scenarios that differ in
    downtime or storage faults kill the same nodes at the same points.
    """
    if sc.points:
        return list(sc.points)
    rng = random.Random(f"kills/{sc.seed}")
    plan = []
    for _ in range(sc.kills):
        spec = rng.choice(specs)
        plan.append(
            KillPoint(
                node=spec.hotkey,
                window=rng.randrange(max(1, sc.windows - 2)),
                phase=rng.choice(PHASES[spec.config.role]),
                delay_s=round(rng.uniform(0.0, 0.3), 3),
                down_s=sc.down_s,
            )
        )
    return sorted(plan, key=lambda k: (k.window, k.delay_s))


# -- what the nodes write ------------------------------------------------------------------


def read_history(path: Path) -> list[dict[str, Any]]:
    """A node's ``history.jsonl`` events; a line a SIGKILL cut short is skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _exists(storage: Storage, key: str) -> bool:
    try:
        storage.head(key)
    except ObjectNotFoundError:
        return False
    return True


class Observer:
    """Reads one node's position, history and checkpoints from its files and the chain."""

    def __init__(self, spec: NodeSpec, chain: SqliteSubnet, s3: LoopbackS3 | None = None) -> None:
        cfg = spec.config
        self.spec = spec
        self.role = cfg.role
        self.chain = chain
        self.bpw = cfg.window.blocks_per_window
        own = cfg.storage
        if s3 is not None:  # past the proxy: the supervisor reads what is stored
            own = dataclasses.replace(own, endpoint_url=s3.direct)
        self.storage = open_own_storage(own, spec.hotkey)
        mine = LocalStorage(Path(cfg.state_dir)) if self.role == "miner" else self.storage
        self.checkpoints = CheckpointStore(mine, "checkpoints")
        self.history_path = Path(cfg.state_dir) / HISTORY_FILE

    def history(self) -> list[dict[str, Any]]:
        return read_history(self.history_path)

    def chain_window(self) -> int:
        return (self.chain.block() - START_BLOCK) // self.bpw

    def position(self) -> tuple[int, str]:
        """(window, phase) the node has reached (see the module docstring)."""
        step = self.checkpoints.latest_step() or 0
        if self.role == "validator":
            if self.chain_window() > step:
                return step, "scoring"
            return self._done_or(step - 1, "scoring")
        hotkey = self.spec.hotkey
        if _exists(self.storage, update_key(UPDATES, step, hotkey)):
            return step, "published"
        if _exists(self.storage, update_key(PROOFS, step, hotkey)):
            return step, "train"
        return self._done_or(step - 1, "published")

    def _done_or(self, window: int, phase: str) -> tuple[int, str]:
        """``window`` done once the node has logged it (after its checkpoint), else still in
        ``phase``."""
        if window < 0 or any(e.get("window") == window for e in self.history()):
            return window, "done"
        return window, phase

    def ordinal(self, window: int, phase: str) -> int:
        """(window, phase) counted in phases from window 0's first."""
        order = PHASES[self.role]
        return window * len(order) + order.index(phase)

    def reached(self, window: int, phase: str) -> bool:
        return self.ordinal(*self.position()) >= self.ordinal(window, phase)

    def recovered(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` shows the node back at work: a scored window (validator) or a
        trained one in sync with the validator (miner)."""
        if self.role == "validator":
            return "window" in event
        return "train_loss" in event and event.get("out_of_sync") is None

    def final_model(self, model: GPTConfig) -> dict[str, Any]:
        """Step and parameter digest of the node's last checkpoint."""
        step = self.checkpoints.latest_step()
        if step is None:
            return {"step": None, "model_sha": None}
        gpt = GPT(model)
        gpt.load_state_dict(self.checkpoints.load().model)
        return {"step": step, "model_sha": state_digest(gpt.named_parameters())}


# -- the supervisor ------------------------------------------------------------------------


@dataclass
class Kill:
    """A planned kill, then where it landed and how the node recovered."""

    target: KillPoint
    window: int | None = None
    phase: str | None = None
    at_s: float | None = None
    events_before: int = 0
    fire_at: float | None = None
    recovery_s: float | None = None
    resumed_window: int | None = None


class Supervisor:
    """Fires the kills, restarts whatever died, watches recovery."""

    def __init__(
        self,
        sc: FaultScenario,
        specs: list[NodeSpec],
        nodes: NodeProcesses,
        chain: SqliteSubnet,
        s3: LoopbackS3 | None = None,
    ) -> None:
        self.sc = sc
        self.nodes = nodes
        self.watch = {s.hotkey: Observer(s, chain, s3) for s in specs}
        self.poll_s = POLL_S if s3 is None else S3_POLL_S
        plan = kill_plan(sc, specs)
        unknown = sorted({k.node for k in plan} - set(self.watch))
        if unknown:
            raise ValueError(f"kill points name unknown nodes {unknown}")
        self.queue = {h: [Kill(k) for k in plan if k.node == h] for h in self.watch}
        self.down: dict[str, float] = {}  # killed node -> when it restarts
        self.fired: list[Kill] = []
        self.skipped: list[dict[str, Any]] = []
        self.crashes: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self) -> None:
        """Supervise until every node has exited after its last window."""
        while True:
            self._restart()
            for hotkey in self.watch:  # also after the last exit: recovery in the last window
                self._watch_recovery(hotkey)
            if not self.down and all(p.exitcode == 0 for p in self.nodes.procs.values()):
                self._skip_the_rest()
                return
            if self.elapsed() > SCENARIO_TIMEOUT_S:
                raise TimeoutError(f"{self.sc.name}: not done in {SCENARIO_TIMEOUT_S:.0f} s")
            stepping = False
            for hotkey in self.watch:
                stepping |= self._maybe_kill(hotkey)
            time.sleep(STEP_S if stepping else self.poll_s)

    def _skip_the_rest(self) -> None:
        """Kills still planned when the run ends (their node never got back to work)."""
        for queue in self.queue.values():
            reason = "the run ended before the node was back at work"
            self.skipped += [{**asdict(k.target), "reason": reason} for k in queue]
            queue.clear()

    @contextmanager
    def _stopped(self, hotkey: str) -> Iterator[None]:
        """``hotkey``'s process stopped (SIGSTOP) inside the block, continued after it
        unless the block killed it."""
        proc = self.nodes.procs[hotkey]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            if self.nodes.procs[hotkey] is proc and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGCONT)

    def _restart(self) -> None:
        """Restart killed nodes when their downtime is over, and nodes that died on their own
        at once (counted), as a process manager would."""
        for hotkey, proc in list(self.nodes.procs.items()):
            if hotkey in self.down:
                if time.monotonic() >= self.down[hotkey]:
                    del self.down[hotkey]
                    self.nodes.restart(hotkey, self.sc.windows - 1)
            elif proc.exitcode not in (None, 0):
                log = self.nodes.log_path(hotkey).read_text(errors="replace").splitlines()
                self.crashes.append(
                    {
                        "node": hotkey,
                        "exit_code": proc.exitcode,
                        "at_s": round(self.elapsed(), 2),
                        "last_line": log[-1] if log else "",
                    }
                )
                self.nodes.restart(hotkey, self.sc.windows - 1)

    def _maybe_kill(self, hotkey: str) -> bool:
        """Fire ``hotkey``'s next kill when due; whether the node is being stepped (see the
        module docstring)."""
        queue = self.queue[hotkey]
        if not queue or hotkey in self.down:
            return False
        kill, proc, watch = queue[0], self.nodes.procs[hotkey], self.watch[hotkey]
        if proc.exitcode is not None:
            if proc.exitcode == 0:
                self.skipped.append({**asdict(kill.target), "reason": "the node finished first"})
                queue.pop(0)
            return False
        previous = next((k for k in reversed(self.fired) if k.target.node == hotkey), None)
        if previous is not None and previous.recovery_s is None:
            return False  # each kill aims at a node that is back at work
        target = kill.target
        if kill.fire_at is not None:
            if time.monotonic() >= kill.fire_at:
                self._fire(hotkey)
            return False
        at = watch.position()
        to_go = watch.ordinal(target.window, target.phase) - watch.ordinal(*at)
        if at[0] > target.window + 1:
            reason = "the node was past that window when it was back at work"
            self.skipped.append({**asdict(queue.pop(0).target), "reason": reason})
        elif target.delay_s == 0 and to_go <= 2:
            with self._stopped(hotkey):
                if watch.reached(target.window, target.phase):
                    self._fire(hotkey)
                    return False
            return True
        elif to_go <= 0:
            kill.fire_at = time.monotonic() + target.delay_s
        return False

    def _fire(self, hotkey: str) -> None:
        """SIGKILL ``hotkey`` for its next kill, recording where it was stopped."""
        kill, watch = self.queue[hotkey].pop(0), self.watch[hotkey]
        with self._stopped(hotkey):
            kill.window, kill.phase = watch.position()
            kill.events_before = len(watch.history())
            self.nodes.kill(hotkey)
        kill.at_s = self.elapsed()
        self.down[hotkey] = time.monotonic() + kill.target.down_s
        self.fired.append(kill)

    def _watch_recovery(self, hotkey: str) -> None:
        for kill in self.fired:
            if kill.target.node != hotkey or kill.recovery_s is not None:
                continue
            watch = self.watch[hotkey]
            later = watch.history()[kill.events_before :]
            back = next((e for e in later if watch.recovered(e)), None)
            if back is not None:
                kill.recovery_s = self.elapsed() - kill.at_s  # type: ignore[operator]
                kill.resumed_window = back["window"]


def run_scenario(sc: FaultScenario, out: Path) -> dict[str, Any]:
    """Run ``sc`` in a fresh folder ``out``; returns its figures (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; a scenario needs a fresh run folder")
    with ExitStack() as stack:
        s3 = None
        if sc.s3:
            s3 = stack.enter_context(loopback_s3(fault_plan(sc.storage_faults, sc.seed)))
        cfg = sim_config(sc, out, s3)
        specs = keep_every_checkpoint(node_specs(cfg), sc.windows)
        chain = SqliteSubnet(chain_path(cfg), netuid=1, block_time_s=block_time_s(cfg))
        stack.callback(chain.close)
        with NodeProcesses(specs, out, sc.windows, cfg.threads) as nodes:
            nodes.wait_ready(chain, STARTUP_TIMEOUT_S)
            nodes.open_window(chain, 0, cfg.blocks_per_window)
            sup = Supervisor(sc, specs, nodes, chain, s3)
            sup.run()
        figures = Figures(sc, sup, chain, s3).collect()
    figures["seconds"] = sup.elapsed()
    (out / "figures.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return figures


def keep_every_checkpoint(specs: list[NodeSpec], windows: int) -> list[NodeSpec]:
    """``specs`` with the validator keeping all its checkpoints: the audit of its published
    sets starts each window from the checkpoint before it."""
    out = []
    for spec in specs:
        cfg = spec.config
        if cfg.role == "validator":
            kept = dataclasses.replace(cfg.validator, keep_checkpoints=windows + 1)
            spec = dataclasses.replace(spec, config=cfg.replace(validator=kept))
        out.append(spec)
    return out


# -- the figures ---------------------------------------------------------------------------


class Figures:
    """What a finished scenario shows, from the nodes' histories, checkpoints and the chain."""

    def __init__(
        self, sc: FaultScenario, sup: Supervisor, chain: SqliteSubnet, s3: LoopbackS3 | None
    ) -> None:
        self.sc = sc
        self.sup = sup
        self.chain = chain
        self.s3 = s3
        self.histories = {h: w.history() for h, w in sup.watch.items()}
        self.validator = next(h for h, w in sup.watch.items() if w.role == "validator")
        self.miners = [h for h, w in sup.watch.items() if w.role == "miner"]

    def windows(self, hotkey: str, kind: str) -> set[int]:
        """Windows ``hotkey`` logged as ``kind``: trained, replayed or scored."""
        key = {"trained": "train_loss", "replayed": "replayed", "scored": "statuses"}[kind]
        return {e["window"] for e in self.histories[hotkey] if key in e}

    def collect(self) -> dict[str, Any]:
        w = self.sc.windows
        scored = self.windows(self.validator, "scored")
        trained = {m: self.windows(m, "trained") for m in self.miners}
        replayed = {m: self.windows(m, "replayed") for m in self.miners}
        lost = sum(w - len(t) for t in trained.values()) + (w - len(scored))
        return {
            "scenario": asdict(self.sc),
            "windows": w,
            "validator_windows_scored": len(scored),
            "miner_windows_trained": sum(len(t) for t in trained.values()),
            "miner_windows_expected": w * len(self.miners),
            "miner_windows_replayed": sum(len(r) for r in replayed.values()),
            "windows_lost": lost,
            "trained_by_miner": {m: sorted(t) for m, t in trained.items()},
            **self._sync(),
            **self._kills(),
            "unexpected_exits": self.sup.crashes,
            **self._models(),
            "chain": self._chain(),
            **self._storage(),
            **self._lost(),
            "audit": self._audit(),
        }

    def _storage(self) -> dict[str, Any]:
        if self.s3 is None:
            return {"storage": "local"}
        injected = self.s3.proxy.injected
        return {
            "storage": "s3",
            "faults_injected": sum(injected.values()),
            "faults_by_kind": dict(sorted(injected.items())),
        }

    def _lost(self) -> dict[str, Any]:
        """Updates in their publisher's storage (now) that the validator scored the window of
        but did not aggregate, with the status and reason it logged."""
        lost = []
        for w in sorted(self.windows(self.validator, "scored")):
            record = self._validator_record(w)
            assert record is not None
            for m in self.miners:
                stored = _exists(self.sup.watch[m].storage, update_key(UPDATES, w, m))
                if not stored or m in record["aggregated"]:
                    continue
                row = record["peers"].get(m, {"status": "not scored", "reason": ""})
                lost.append({"window": w, "peer": m, "status": row["status"], "why": row["reason"]})
        return {"updates_lost": len(lost), "lost": lost}

    def _audit(self) -> dict[str, Any]:
        spec = self.sup.watch[self.validator].spec
        read = read_access(self.s3, spec.config.storage.root)
        return audit_published_states(spec, self.chain, read, self.sc.windows)

    def _sync(self) -> dict[str, Any]:
        problems = [
            {"node": m, "window": e["window"], "replayed": bool(e.get("replayed")), "problem": p}
            for m in self.miners
            for e in self.histories[m]
            if (p := e.get("out_of_sync")) is not None
        ]
        replays = [e for m in self.miners for e in self.histories[m] if e.get("replayed")]
        return {
            "out_of_sync": problems,
            "models_differed": sum("model differs" in str(p["problem"]) for p in problems),
            "resyncs_failed": sum("re-sync failed" in str(p["problem"]) for p in problems),
            "replays": len(replays),
            "replays_in_sync": sum(e.get("out_of_sync") is None for e in replays),
        }

    def _kills(self) -> dict[str, Any]:
        points = [self._kill_point(k) for k in self.sup.fired]
        times = [p["recovery_s"] for p in points if p["recovery_s"] is not None]
        return {
            "kills_planned": self.sc.planned,
            "kills": len(points),
            "kill_points": points,
            "kills_skipped": self.sup.skipped,
            "kills_recovered": len(times),
            "recovery_s_max": max(times, default=None),
            "recovery_s_mean": sum(times) / len(times) if times else None,
        }

    def _kill_point(self, kill: Kill) -> dict[str, Any]:
        hotkey = kill.target.node
        done = self.windows(hotkey, "scored" if hotkey == self.validator else "trained")
        start = max(kill.window or 0, 0)
        end = kill.resumed_window if kill.resumed_window is not None else self.sc.windows
        point = {
            "node": hotkey,
            "target": {k: v for k, v in asdict(kill.target).items() if k != "node"},
            "window": kill.window,
            "phase": kill.phase,
            "at_s": round(kill.at_s or 0.0, 2),
            "recovery_s": None if kill.recovery_s is None else round(kill.recovery_s, 2),
            "resumed_window": kill.resumed_window,
            "windows_lost": sum(w not in done for w in range(start, end)),
        }
        if kill.phase == "published":  # its update was out: did the swarm still use it?
            record = self._validator_record(start)
            point["update_aggregated"] = record is not None and hotkey in record["aggregated"]
        return point

    def _validator_record(self, window: int) -> dict[str, Any] | None:
        records = [e for e in self.histories[self.validator] if e.get("window") == window]
        return records[-1] if records else None

    def _models(self) -> dict[str, Any]:
        finals = {h: w.final_model(self.sc.model) for h, w in self.sup.watch.items()}
        last = self.sc.windows - 1
        selection = read_selection(self.sup.watch[self.validator].storage, last)
        digests = {f["model_sha"] for f in finals.values()}
        return {
            "final": finals,
            "all_models_equal": len(digests) == 1
            and all(f["step"] == self.sc.windows for f in finals.values()),
            "validator_model_is_published_state": selection is not None
            and finals[self.validator]["model_sha"] == selection.state,
        }

    def _chain(self) -> dict[str, Any]:
        hotkeys, _, matrix = self.chain.weight_matrix()
        meta = self.chain.metagraph()
        row = matrix[hotkeys.index(self.validator)] if self.validator in hotkeys else None
        uids = dict(zip(meta.hotkeys, meta.uids, strict=True))
        weights = {} if row is None else {h: float(row[u]) for h, u in uids.items()}
        sets = [e.get("weights_set") for e in self.histories[self.validator] if "window" in e]
        return {
            "committed": sorted(self.chain.commitments()) == sorted(self.sup.watch),
            "weights_set_windows": sum(bool(s) for s in sets),
            "weights": {h: round(v, 4) for h, v in weights.items() if h != self.validator},
        }


def audit_published_states(
    spec: NodeSpec, chain: SqliteSubnet, read: Callable[[Locator], Storage], windows: int
) -> dict[str, Any]:
    """Check every aggregation set the validator ``spec`` published against the stored updates.

    For window ``w``: the validator's model before it (its newest checkpoint at step ``w`` or
    earlier, else the run's initial weights), stepped on the set's updates as read through
    ``read`` (the bytes in storage, every check of a reader), must have the digest the set
    carries. Returns the sets checked and the windows whose digest or updates differ.
    """
    cfg = spec.config
    task = gpt_task(cfg.run)
    protocol = Protocol(cfg.run, task)
    directory = ChainDirectory(chain.connect(spec.hotkey), read)
    directory.refresh()
    entry = directory.entry(spec.hotkey)
    assert entry is not None, "the validator's commitment is on the chain"
    checkpoints = CheckpointStore(entry.storage, "checkpoints")
    steps = checkpoints.steps()
    template = task.make_model()
    exchange = StorageExchange(
        "audit",
        entry.storage,  # never written: the audit publishes nothing
        directory.channel(UPDATES),
        Ed25519Signer.from_seed(bytes(32)),
        ModelSpec.from_named_tensors(dict(template.named_parameters())),
        protocol.exchange_config(cfg.exchange, proofs=False),
    )
    checked, differ = 0, []
    for w in range(windows):
        chosen = read_selection(entry.storage, w)
        if chosen is None:
            continue  # the validator skipped the window
        model = task.make_model()
        before = max((s for s in steps if s <= w), default=None)
        if before is not None:
            model.load_state_dict(checkpoints.load(before).model)
        updates = exchange.gather(w, peers=chosen.peers).updates
        SparseLoCo(model.named_parameters(), exchange, protocol.outer).apply(updates)
        checked += 1
        if (
            sorted(updates) != chosen.peers
            or state_digest(model.named_parameters()) != chosen.state
        ):
            differ.append(w)
    return {"sets_checked": checked, "sets_not_reproduced": differ}
