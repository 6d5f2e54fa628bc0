"""What every participant of a simulated run shares: data, storage, directory, chain, clock."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gauntlet import AssignmentConfig, GauntletConfig, InMemorySubnet, assign_samples
from gauntlet.signals import sample_values, sync_positions
from netcomm import (
    CheckpointStore,
    Ed25519Signer,
    ExchangeConfig,
    LocalStorage,
    ModelSpec,
    ObjectNotFoundError,
    PeerRecord,
    S3Config,
    S3Storage,
    StaticDirectory,
    Storage,
    StorageExchange,
)
from sparseloco.config import preset
from sparseloco.data import TokenDataset, load_tokens, stdlib_corpus
from sparseloco.errors import ConfigError
from sparseloco.exchange import GatherResult
from sparseloco.models.gpt import GPT
from sparseloco.payload import DenseUpdate
from subnet.sim.config import SimConfig

PROOF_DIGEST = "digest"
PROOF_SYNC = "sync_values"


def open_storage(cfg: SimConfig) -> Storage:
    """The run's storage: a local folder (default ``<out>/storage``) or an S3 bucket."""
    if cfg.storage.startswith("s3://"):
        bucket, _, prefix = cfg.storage.removeprefix("s3://").partition("/")
        return S3Storage(S3Config(bucket=bucket, endpoint_url=cfg.s3_endpoint, prefix=prefix))
    return LocalStorage(Path(cfg.storage) if cfg.storage else cfg.out / "storage")


def load_dataset(cfg: SimConfig) -> TokenDataset:
    tokens = stdlib_corpus(cfg.corpus_bytes) if cfg.data is None else load_tokens(cfg.data)
    ds = TokenDataset(tokens, cfg.model.block_size)
    if ds.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data has token ids up to {ds.vocab_size - 1}; the model's vocab_size is "
            f"{cfg.model.vocab_size}"
        )
    return ds


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    _, loss = model(batch[0], batch[1])
    assert loss is not None
    return loss


def derive_key(seed: int, *parts: object) -> bytes:
    """32 deterministic bytes for the run's signing keys (a simulation, not a deployment)."""
    return hashlib.sha256(repr((seed, *parts)).encode()).digest()


@dataclass
class Swarm:
    """Shared state of a run; built once by the runner and handed to every participant."""

    cfg: SimConfig
    data: TokenDataset
    storage: Storage
    gauntlet: GauntletConfig
    subnet: InMemorySubnet
    signers: dict[str, Ed25519Signer]
    updates: StaticDirectory
    proofs: StaticDirectory
    checkpoints: CheckpointStore
    init_state: dict[str, torch.Tensor]
    spec: ModelSpec
    proof_spec: ModelSpec
    done: list[threading.Event] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, cfg: SimConfig) -> Swarm:
        torch.manual_seed(cfg.seed)
        data = load_dataset(cfg)
        model = GPT(cfg.model)
        samples = cfg.inner_steps * cfg.batch_size
        gcfg = GauntletConfig(
            assignment=AssignmentConfig(
                num_samples=data.num_train,
                samples_per_peer=samples,
                eval_assigned=min(samples, 16),
                eval_random=16,
            )
        )
        storage = open_storage(cfg)
        subnet = InMemorySubnet(netuid=1)
        subnet.register("validator", stake=1000.0)
        signers = {
            p: Ed25519Signer.from_seed(derive_key(cfg.seed, "key", p))
            for p in [*cfg.peer_ids, "validator"]
        }
        updates, proofs = StaticDirectory(), StaticDirectory()
        for p in cfg.peer_ids:
            subnet.register(p)
            key = signers[p].public_key
            updates.add(PeerRecord(p, storage, key, prefix=f"peers/{p}"))
            proofs.add(PeerRecord(p, storage, key, prefix=f"peers/{p}/proof"))
        named = dict(model.named_parameters())
        n_sync = gcfg.signals.sync_samples
        proof_spec = ModelSpec.from_named_tensors(
            {PROOF_DIGEST: torch.zeros(32), PROOF_SYNC: torch.zeros(n_sync)}
        )
        return cls(
            cfg=cfg,
            data=data,
            storage=storage,
            gauntlet=gcfg,
            subnet=subnet,
            signers=signers,
            updates=updates,
            proofs=proofs,
            checkpoints=CheckpointStore(storage, "checkpoints"),
            init_state={k: v.detach().clone() for k, v in model.state_dict().items()},
            spec=ModelSpec.from_named_tensors(named),
            proof_spec=proof_spec,
            done=[threading.Event() for _ in range(cfg.windows)],
        )

    @property
    def seed(self) -> str:
        return f"sparseloco-sim-{self.cfg.seed}"

    @property
    def codec(self):
        return preset(self.cfg.preset).codec

    def new_model(self) -> GPT:
        model = GPT(self.cfg.model)
        model.load_state_dict(self.init_state)
        return model

    def exchange(self, peer: str, *, proofs: bool = False) -> StorageExchange:
        directory = self.proofs if proofs else self.updates
        record = directory.lookup(peer)
        return StorageExchange(
            peer,
            self.storage,
            directory,
            self.signers[peer],
            self.proof_spec if proofs else self.spec,
            ExchangeConfig(
                deadline_s=self.cfg.deadline_s,
                poll_interval_s=0.02,
                codec=None if proofs else self.codec,
            ),
            prefix=record.prefix if record else f"peers/{peer}",
        )

    def assignment(self, peer: str, window: int) -> list[int]:
        return assign_samples(peer, window, self.seed, self.gauntlet.assignment)

    def contents(self, ids: Sequence[int]) -> list[torch.Tensor]:
        """Sample contents hashed into the proof-of-data digest."""
        return [self.data.train_batch([i])[0][0] for i in ids]

    def batches(self, ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        b = self.cfg.batch_size
        return [self.data.train_batch(ids[i : i + b]) for i in range(0, len(ids), b)]

    def sync_positions(self, window: int) -> list[tuple[str, int]]:
        return sync_positions(
            self.spec.shapes, window, self.seed, self.gauntlet.signals.sync_samples
        )

    def proof(self, model: nn.Module, window: int, digest: str) -> DenseUpdate:
        """Proof-of-data digest and sampled parameters, published beside each update."""
        values = sample_values(dict(model.named_parameters()), self.sync_positions(window))
        digest_t = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.float32)
        return DenseUpdate({PROOF_DIGEST: digest_t, PROOF_SYNC: values.to(torch.float32)})

    def selection_key(self, window: int) -> str:
        return f"selection/{window:012d}.json"

    def publish_selection(self, window: int, peers: list[str]) -> None:
        """The validator's accepted set for ``window``, which every peer then aggregates."""
        self.storage.put(self.selection_key(window), json.dumps(sorted(peers)).encode())

    def selected(self, window: int) -> list[str]:
        """Peers whose updates are aggregated in ``window``: the same answer for everyone.

        ``aggregate="all"``: every peer (invalid updates drop out in gather). ``"top"``: the
        set the validator accepted after scoring this window (evaluated, and a positive gain or
        a positive standing score).
        """
        if self.cfg.aggregate == "all":
            return self.cfg.peer_ids
        key = self.selection_key(window)
        while True:
            try:
                return list(json.loads(self.storage.get(key)))
            except ObjectNotFoundError:
                if self.stop.wait(0.02):
                    raise RuntimeError("run stopped") from None

    def wait(self, window: int) -> None:
        """Block until the validator finished ``window`` (or the run is stopping)."""
        if window < 0:
            return
        while not self.done[window].wait(0.1):
            if self.stop.is_set():
                raise RuntimeError("run stopped")


class SelectedExchange:
    """A peer's update exchange that gathers only the swarm's selected peers for each window."""

    def __init__(self, inner: StorageExchange, swarm: Swarm) -> None:
        self.inner = inner
        self.swarm = swarm

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    def publish(self, window: int, payload) -> int:
        return self.inner.publish(window, payload)

    def gather(self, window: int) -> GatherResult:
        chosen = self.swarm.selected(window)
        result = self.inner.gather(window, peers=chosen)
        result.self_selected = self.peer_id in chosen
        return result
