"""Peers and a validator as separate processes over a loopback S3 server, killed and restarted.

``run_scenario`` (the supervisor) starts moto's S3 server on 127.0.0.1, optionally a
:class:`netcomm.FaultProxy` in front of it, and one process per role: ``peer-0`` ..
``peer-{P-1}`` train a small GPT with SparseLoCo over :class:`netcomm.StorageExchange`, the
``validator`` gathers every window and follows the global model. Every role checkpoints
through :class:`netcomm.CheckpointStore` after each window (model, AdamW and SparseLoCo state
for peers) and, when started again, resumes from ``latest``. The supervisor SIGKILLs roles at
random times and restarts them at once.

Each role appends JSON lines to ``<out>/<role>.jsonl``: its phase (for where a kill landed),
the SHA-256 of every payload it published and of every payload gather returned ``ok``, and at
the end the SHA-256 of its whole state. The supervisor turns them into figures: windows
completed, updates lost (not ``ok`` in the last gather of a window), corrupt data accepted
(an ``ok`` payload whose bytes differ from what its publisher published) and the final state
digests, compared by the caller with an uninterrupted run's.

Run as a role: ``python benchmarks/reliability_worker.py CONFIG.json ROLE``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROLE_TIMEOUT_S = 600.0
VALIDATOR = "validator"
_buckets = itertools.count()
#: the phases of a window, in order: (peers, validator)
PHASES = (("train", "round", "checkpoint"), ("gather", "aggregate", "checkpoint"))


@dataclass(frozen=True)
class FaultScenario:
    """One supervised run.

    Args:
        name: label in the results.
        peers: SparseLoCo peer processes (plus one validator process).
        windows: outer rounds.
        inner_steps: AdamW steps per window.
        seed: model init, data, keys and the kill schedule.
        kills: SIGKILLs sent, each to a random running role at a random time.
        fault_rate: share of storage requests (GET, HEAD, PUT) the proxy breaks: a quarter
            each dropped connections, 503s and slow responses, an eighth each truncated and
            corrupted bodies.
        deadline_s: gather deadline (a restarted role must be back before it).
    """

    name: str
    peers: int = 3
    windows: int = 6
    inner_steps: int = 4
    seed: int = 0
    kills: int = 0
    fault_rate: float = 0.0
    deadline_s: float = 60.0


# -- the roles (run in their own process) --------------------------------------------------


def _key_seed(seed: int, role: str) -> bytes:
    return hashlib.sha256(f"reliability/{seed}/{role}".encode()).digest()


def _state_digest(tensors: dict[str, Any]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}={t!r}".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _flatten(f"{prefix}[{i}]", v, out)
    else:
        out[prefix] = obj
    return out


def payload_digest(payload: Any) -> str:
    tensors, meta = payload.to_tensors()
    return _state_digest({**tensors, **{f"meta.{k}": v for k, v in meta.items()}})


class _Log:
    def __init__(self, path: Path) -> None:
        self._f = path.open("a")

    def __call__(self, event: str, **fields: Any) -> None:
        self._f.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
        self._f.flush()


class _RecordingExchange:
    """Delegates to a StorageExchange and logs digests of what was published and gathered."""

    def __init__(self, inner: Any, log: _Log) -> None:
        self.inner, self.log = inner, log

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    def publish(self, window: int, payload: Any) -> int:
        self.log("published", window=window, sha=payload_digest(payload))
        return self.inner.publish(window, payload)

    def gather(self, window: int, peers: list[str] | None = None) -> Any:
        result = self.inner.gather(window, peers)
        _log_gather(self.log, window, result)
        return result


def _log_gather(log: _Log, window: int, result: Any) -> None:
    log(
        "gathered",
        window=window,
        statuses={
            p: {
                "status": s.status,
                "reason": s.reason[:200],
                "sha": payload_digest(result.updates[p]) if p in result.updates else None,
            }
            for p, s in result.statuses.items()
        },
    )


def _retry(fn: Any, what: str, log: _Log, attempts: int = 20) -> Any:
    """Retry storage work that faults can break (checkpoint reads and writes)."""
    from netcomm import CheckpointError, StorageError

    for attempt in range(attempts):
        try:
            return fn()
        except (CheckpointError, StorageError) as exc:
            log("retry", what=what, attempt=attempt, error=str(exc)[:200])
            if attempt + 1 == attempts:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def role_main(config_path: Path, role: str) -> None:
    """One role's whole life: resume from its latest checkpoint, run to the last window."""
    import torch

    from netcomm import (
        CheckpointStore,
        Ed25519Signer,
        ExchangeConfig,
        ModelSpec,
        PeerRecord,
        S3Config,
        S3Storage,
        StaticDirectory,
        StorageExchange,
    )
    from sparseloco import SparseLoCo, preset
    from sparseloco.data import TokenDataset, stdlib_corpus
    from sparseloco.models.gpt import GPT, GPTConfig

    cfg = json.loads(config_path.read_text())
    sc = FaultScenario(**cfg["scenario"])
    torch.set_num_threads(1)
    torch.manual_seed(sc.seed)
    log = _Log(Path(cfg["out"]) / f"{role}.jsonl")
    log("start", pid=os.getpid())
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    storage = S3Storage(
        S3Config(
            bucket=cfg["bucket"],
            endpoint_url=cfg["endpoint"],
            access_key_id="testing",
            secret_access_key="testing",
            connect_timeout_s=2.0,
            read_timeout_s=5.0,
            max_attempts=4,
            backoff_s=0.02,
            backoff_max_s=0.2,
        )
    )
    peers = [f"peer-{i}" for i in range(sc.peers)]
    signers = {p: Ed25519Signer.from_seed(_key_seed(sc.seed, p)) for p in [*peers, VALIDATOR]}
    directory = StaticDirectory(
        PeerRecord(p, storage, signers[p].public_key, prefix=f"peers/{p}") for p in peers
    )
    outer_cfg = preset("covenant-72b")
    exchange = StorageExchange(
        role,
        storage,
        directory,
        signers[role],
        ModelSpec.from_module(model),
        ExchangeConfig(
            deadline_s=sc.deadline_s,
            poll_interval_s=0.05,
            attempts=6,
            backoff_s=0.02,
            backoff_max_s=0.2,
            codec=outer_cfg.codec,
        ),
        prefix=f"peers/{role}",
    )
    store = CheckpointStore(storage, f"ckpt/{role}")
    data = TokenDataset(stdlib_corpus(300_000), 32)
    if role == VALIDATOR:
        outer = None
        inner = None
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
        outer = SparseLoCo(
            model.named_parameters(),
            _RecordingExchange(exchange, log),
            "covenant-72b",
            inner_steps=sc.inner_steps,
        )

    def resume() -> int:
        if store.latest_step() is None:
            return 0
        ck = store.load()
        model.load_state_dict(ck.model)
        if outer is not None:
            inner.load_state_dict(ck.optimizer["inner"])
            outer.load_state_dict(ck.optimizer["outer"])
        return ck.step

    start = _retry(resume, "resume", log)
    log("resumed", window=start)
    # a kill between saving a checkpoint and logging it leaves that window done but unlogged
    events = _read(Path(cfg["out"]) / f"{role}.jsonl")
    logged = {e["window"] for e in events if e.get("event") == "window_done"}
    for w in sorted(set(range(start)) - logged):
        log("window_done", window=w, recovered=True)
    # the validator follows the peers' outer step; built after resume so θ₀ is the loaded model
    follower = SparseLoCo(model.named_parameters(), exchange, outer_cfg) if outer is None else None
    for w in range(start, sc.windows):
        if outer is not None:
            log("phase", window=w, phase="train")
            rng = random.Random(f"{sc.seed}/{role}/{w}")
            model.train()
            for _ in range(sc.inner_steps):
                ids = [rng.randrange(data.num_train) for _ in range(4)]
                x, y = data.train_batch(ids)
                _, loss = model(x, y)
                loss.backward()
                inner.step()
                inner.zero_grad(set_to_none=True)
            log("phase", window=w, phase="round")
            outer.step()
            state = {"inner": inner.state_dict(), "outer": outer.state_dict()}
        else:
            log("phase", window=w, phase="gather")
            result = exchange.gather(w, peers)
            _log_gather(log, w, result)
            log("phase", window=w, phase="aggregate")
            if result.updates:
                follower.apply(result.updates)  # type: ignore[union-attr]
            state = None
        log("phase", window=w, phase="checkpoint")
        _retry(lambda w=w, state=state: store.save(w + 1, model.state_dict(), state), "save", log)
        log("window_done", window=w)
    digest_of = {"model": model.state_dict()}
    if outer is not None:
        digest_of["inner"] = inner.state_dict()
        digest_of["outer"] = outer.state_dict()
    log(
        "final",
        sha=_state_digest(_flatten("state", digest_of, {})),
        model_sha=_state_digest(model.state_dict()),
    )


# -- the supervisor ------------------------------------------------------------------------


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the line a SIGKILL cut short
            continue
    return out


def _position(path: Path, pid: int) -> tuple[int, str]:
    """(window, phase) of process ``pid``: ``startup`` while importing, ``resume`` while
    loading its checkpoint, then its last logged phase."""
    window, phase = -1, "startup"
    for event in _read(path):
        if event["event"] == "start":
            window, phase = -1, ("resume" if event["pid"] == pid else "startup")
        elif event["event"] == "phase" and phase != "startup":
            window, phase = event["window"], event["phase"]
    return window, phase


def kill_plan(sc: FaultScenario, roles: list[str]) -> list[dict[str, Any]]:
    """``sc.kills`` random kill points: a role, a window, a phase and a delay into it.

    The last window is left out: a role that has finished it exits, and a kill aimed there
    would often find nothing left to kill.
    """
    rng = random.Random(f"kills/{sc.seed}/{sc.name}")
    plan = []
    for _ in range(sc.kills):
        role = rng.choice(roles)
        plan.append(
            {
                "role": role,
                "window": rng.randrange(max(1, sc.windows - 1)),
                "phase": rng.choice(PHASES[role == VALIDATOR]),
                "delay_s": rng.uniform(0.0, 0.5),
            }
        )
    return sorted(plan, key=lambda k: (k["window"], k["delay_s"]))


def run_scenario(sc: FaultScenario, out: Path) -> dict[str, Any]:
    """Run ``sc`` with fresh storage; returns its figures (see the module docstring)."""
    from moto.server import ThreadedMotoServer

    from netcomm import FaultPlan, FaultProxy, S3Config, S3Storage

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jsonl"):
        old.unlink()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server._server.server_port}"
    # moto keeps its buckets per process, not per server: every run needs a bucket of its own
    bucket = f"reliability-{next(_buckets)}-{os.getpid()}"
    S3Storage(
        S3Config(bucket=bucket, endpoint_url=url, access_key_id="testing", secret_access_key="x")
    ).create_bucket()
    proxy = None
    if sc.fault_rate:
        r = sc.fault_rate
        plan = FaultPlan(
            drop=r / 4,
            server_error=r / 4,
            slow=r / 4,
            truncate=r / 8,
            corrupt=r / 8,
            delay_s=0.5,
            methods=frozenset({"GET", "HEAD", "PUT"}),
            seed=sc.seed,
        )
        proxy = FaultProxy(url, plan).start()
    config = out / "config.json"
    config.write_text(
        json.dumps(
            {
                "scenario": asdict(sc),
                "endpoint": proxy.url if proxy else url,
                "bucket": bucket,
                "out": str(out),
            }
        )
    )
    roles = [f"peer-{i}" for i in range(sc.peers)] + [VALIDATOR]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def launch(role: str) -> subprocess.Popen:
        err = (out / f"{role}.stderr").open("ab")
        return subprocess.Popen(
            [sys.executable, __file__, str(config), role], env=env, stdout=err, stderr=err
        )

    # each role works through its own kills in order, independently of the others: a slow
    # role's pending kill must not hold back the kills aimed at roles that run ahead
    plan = kill_plan(sc, roles)
    pending = {role: [k for k in plan if k["role"] == role] for role in roles}
    fire_at: dict[str, float | None] = dict.fromkeys(roles)
    started = time.monotonic()
    procs = {role: launch(role) for role in roles}
    kills: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    crashes = 0
    try:
        while True:
            for role, p in procs.items():
                if p.poll() not in (None, 0):
                    crashes += 1  # died on its own: restart it, as a process manager would
                    procs[role] = launch(role)
                    fire_at[role] = None  # a kill timed for the dead process is re-aimed
            if all(p.poll() == 0 for p in procs.values()):
                break
            if time.monotonic() - started > ROLE_TIMEOUT_S:
                raise TimeoutError(f"{sc.name}: roles did not finish in {ROLE_TIMEOUT_S} s")
            for role in roles:
                if not pending[role]:
                    continue
                target, proc = pending[role][0], procs[role]
                if proc.poll() is not None:
                    skipped.append({**pending[role].pop(0), "reason": "the role finished first"})
                    fire_at[role] = None
                    continue
                path = out / f"{role}.jsonl"
                window, phase = _position(path, proc.pid)
                order = PHASES[role == VALIDATOR]
                reached = phase != "startup" and (
                    window > target["window"]
                    or (
                        window == target["window"]
                        and phase in order
                        and order.index(phase) >= order.index(target["phase"])
                    )
                )
                if reached and fire_at[role] is None:
                    fire_at[role] = time.monotonic() + target["delay_s"]
                deadline = fire_at[role]
                if deadline is not None and time.monotonic() >= deadline:
                    window, phase = _position(path, proc.pid)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills.append(
                        {
                            "role": role,
                            "window": window,
                            "phase": phase,
                            "at_s": round(time.monotonic() - started, 2),
                        }
                    )
                    procs[role] = launch(role)
                    pending[role].pop(0)
                    fire_at[role] = None
            time.sleep(0.02)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        if proxy is not None:
            proxy.stop()
        server.stop()
    figures = _figures(sc, out, roles)
    figures.update(
        {
            "scenario": asdict(sc),
            "seconds": time.monotonic() - started,
            "kills": len(kills),
            "kill_points": kills,
            "kills_planned": sc.kills,
            "kills_skipped": skipped,
            "unexpected_exits": crashes,
            "faults_injected": sum(proxy.injected.values()) if proxy else 0,
            "faults_by_kind": dict(proxy.injected) if proxy else {},
        }
    )
    return figures


def _figures(sc: FaultScenario, out: Path, roles: list[str]) -> dict[str, Any]:
    logs = {role: _read(out / f"{role}.jsonl") for role in roles}
    published: dict[tuple[str, int], set[str]] = {}
    for role, events in logs.items():
        for e in events:
            if e["event"] == "published":
                published.setdefault((role, e["window"]), set()).add(e["sha"])
    last_gather: dict[tuple[str, int], dict[str, Any]] = {}
    corrupt = ok_checked = 0
    for role, events in logs.items():
        for e in events:
            if e["event"] != "gathered":
                continue
            last_gather[(role, e["window"])] = e["statuses"]
            for peer, s in e["statuses"].items():
                if s["status"] == "ok":
                    ok_checked += 1
                    corrupt += s["sha"] not in published.get((peer, e["window"]), set())
    lost = [
        {"role": role, "window": w, "peer": peer, "status": s["status"], "reason": s["reason"]}
        for (role, w), statuses in sorted(last_gather.items())
        for peer, s in sorted(statuses.items())
        if s["status"] != "ok"
    ]
    done = {
        role: sorted({e["window"] for e in events if e["event"] == "window_done"})
        for role, events in logs.items()
    }
    finals = {
        role: next((e for e in reversed(events) if e["event"] == "final"), None)
        for role, events in logs.items()
    }
    models = {r: f["model_sha"] for r, f in finals.items() if f is not None}
    return {
        "windows_expected": sc.windows * len(roles),
        "windows_completed": sum(len(v) for v in done.values()),
        "updates_lost": len(lost),
        "lost": lost[:20],
        "ok_payloads_checked": ok_checked,
        "corrupt_accepted": corrupt,
        "republished_differently": sum(len(v) > 1 for v in published.values()),
        "final_sha256": {r: f["sha"] for r, f in finals.items() if f is not None},
        "all_models_equal": len(set(models.values())) == 1 and len(models) == len(roles),
    }


if __name__ == "__main__":
    role_main(Path(sys.argv[1]), sys.argv[2])
