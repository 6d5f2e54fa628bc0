"""The rules miners and validators of one run share, so that both compute the same values.

* the Gauntlet configuration (data assignment, sync sample count) derived from the run;
* the outer optimizer's configuration (preset, α, H);
* the two exchange channels: updates (key prefix ``""``) and proofs (``"proof"``), each
  ``{channel}/updates/{window:012d}/{hotkey}.nce`` in the publisher's own storage;
* the proof payload: a proof-of-data digest and the sampled parameter values for the sync
  check, signed like an update;
* the validator's aggregation set for a window: ``selection/{window:012d}.json`` in the
  validator's storage, with the digest of its model after stepping on that set (a miner
  whose model differs after the same step is out of sync and re-syncs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gauntlet import (
    AssignmentConfig,
    GauntletConfig,
    assign_samples,
    data_digest,
    sample_values,
    sync_positions,
)
from netcomm import EnvelopeLimits, ExchangeConfig, ModelSpec, ObjectNotFoundError, Storage
from sparseloco.config import CodecConfig, OuterConfig, preset
from sparseloco.names import canonical_name
from sparseloco.payload import DenseUpdate, Payload
from subnet.config import ExchangeSettings, RunConfig, ValidatorSettings
from subnet.task import Task

UPDATES = ""
PROOFS = "proof"
PROOF_DIGEST = "digest"
PROOF_SYNC = "sync_values"


class Protocol:
    """The shared rules of a run (see the module docstring).

    Args:
        run: the run's configuration.
        task: its model and data.
        validator: evaluation sizes (they enter the Gauntlet configuration; miners may keep
            the defaults, since only the assignment part affects them).
    """

    def __init__(
        self, run: RunConfig, task: Task, validator: ValidatorSettings | None = None
    ) -> None:
        v = validator or ValidatorSettings()
        self.eval_batch_size = v.eval_batch_size
        self.run = run
        self.task = task
        samples = run.inner_steps * run.batch_size
        self.gauntlet = GauntletConfig(
            assignment=AssignmentConfig(
                num_samples=task.num_samples,
                samples_per_peer=samples,
                eval_assigned=min(samples, v.eval_assigned),
                eval_random=v.eval_random,
            )
        )
        base = preset(run.preset)
        changes: dict[str, Any] = {"inner_steps": run.inner_steps}
        if run.outer_lr is not None:
            changes["lr"] = run.outer_lr
        self.outer: OuterConfig = base.replace(**changes)
        shapes = {
            canonical_name(n): tuple(p.shape) for n, p in task.make_model().named_parameters()
        }
        self.shapes = shapes
        n_sync = len(sync_positions(shapes, 0, run.seed, self.gauntlet.signals.sync_samples))
        self.proof_spec = ModelSpec.from_named_tensors(
            {PROOF_DIGEST: torch.zeros(32), PROOF_SYNC: torch.zeros(n_sync)}
        )

    @property
    def seed(self) -> str:
        return self.run.seed

    @property
    def codec(self) -> CodecConfig:
        return self.outer.codec

    def exchange_config(self, settings: ExchangeSettings, *, proofs: bool) -> ExchangeConfig:
        """Exchange timing for one channel (proofs carry no codec)."""
        mb = settings.max_object_mb << 20
        return ExchangeConfig(
            deadline_s=settings.gather_deadline_s,
            poll_interval_s=settings.poll_interval_s,
            codec=None if proofs else self.codec,
            # The body is compressed; 4x covers incompressible data with ample room.
            limits=EnvelopeLimits(max_object_bytes=mb, max_decompressed_bytes=4 * mb),
        )

    def assignment(self, hotkey: str, window: int) -> list[int]:
        """The sample ids ``hotkey`` trains on in ``window``."""
        return assign_samples(hotkey, window, self.seed, self.gauntlet.assignment)

    def batches(self, ids: Sequence[int]) -> list[Any]:
        """``ids`` cut into batches of ``run.batch_size``."""
        b = self.run.batch_size
        return [self.task.batch(ids[i : i + b]) for i in range(0, len(ids), b)]

    def eval_batches(self, ids: Sequence[int]) -> list[Any]:
        """``ids`` cut into the validator's evaluation batches (``eval_batch_size``)."""
        b = self.eval_batch_size
        return [self.task.batch(ids[i : i + b]) for i in range(0, len(ids), b)]

    def digest(self, hotkey: str, window: int, ids: Sequence[int]) -> str:
        """The proof-of-data digest of training on ``ids``."""
        contents = self.task.contents(ids) if self.task.contents is not None else None
        return data_digest(hotkey, window, ids, contents)

    def sync_positions(self, window: int) -> list[tuple[str, int]]:
        return sync_positions(self.shapes, window, self.seed, self.gauntlet.signals.sync_samples)

    def proof(
        self, params: Iterable[tuple[str, torch.Tensor]], window: int, digest: str
    ) -> DenseUpdate:
        """The proof payload: ``digest`` and the values of ``params`` (the global model the
        window's update starts from, e.g. ``outer.global_parameters()``) at the window's sync
        positions."""
        named = {canonical_name(n): p for n, p in params}
        values = sample_values(named, self.sync_positions(window))
        digest_t = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.float32)
        return DenseUpdate({PROOF_DIGEST: digest_t, PROOF_SYNC: values.to(torch.float32)})


def read_proof(payload: Payload) -> tuple[str, torch.Tensor]:
    """(digest hex, float64 sync values) of a verified proof payload."""
    if not isinstance(payload, DenseUpdate):
        raise ValueError("a proof must be a dense payload")
    digest = bytes(int(v) for v in payload.tensors[PROOF_DIGEST].tolist()).hex()
    return digest, payload.tensors[PROOF_SYNC].to(torch.float64)


def selection_key(window: int) -> str:
    return f"selection/{window:012d}.json"


def state_digest(params: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named parameters (canonical names, dtypes, shapes and bytes, names sorted;
    e.g. ``model.named_parameters()`` or ``outer.global_parameters()``): equal on two nodes
    exactly when those parameters are bit-identical, whatever wraps their models."""
    h = hashlib.sha256()
    named = ((canonical_name(n), p) for n, p in params)
    for name, p in sorted(named, key=lambda item: item[0]):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class Selection:
    """A validator's aggregation set for a window and the digest of its model after the
    window's outer step (what every miner that stepped on the same set must hold)."""

    peers: list[str]
    state: str


def write_selection(storage: Storage, window: int, peers: Sequence[str], state: str) -> None:
    """Publish the validator's aggregation set for ``window`` with its post-step digest."""
    doc = {"peers": sorted(peers), "state": state}
    storage.put(selection_key(window), json.dumps(doc, sort_keys=True).encode())


def read_selection(storage: Storage, window: int) -> Selection | None:
    """The aggregation set of ``window``, or ``None`` when it is not published (or malformed)."""
    try:
        doc = json.loads(storage.get(selection_key(window)))
    except (ObjectNotFoundError, ValueError):
        return None
    if not isinstance(doc, dict) or set(doc) != {"peers", "state"}:
        return None
    peers, state = doc["peers"], doc["state"]
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
        return None
    if not isinstance(state, str) or len(state) != 64:
        return None
    return Selection(sorted(peers), state)
