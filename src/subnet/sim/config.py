"""The simulation's typed configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from netcomm.link import parse_link
from sparseloco.config import PRESETS
from sparseloco.errors import ConfigError
from sparseloco.models.gpt import GPTConfig
from subnet.config import ADVERSARY_KINDS, MinerSettings

#: default window length per miner process on a real-time clock. A window holds the
#: validator's scoring of the previous one and then every miner's H inner steps, on cores the
#: processes share; an update that misses the window's end (plus a quarter window of grace)
#: counts as missing for that window. In hand-timed runs on 2 cores, 0.5 s lost updates at a
#: load near 4 and 0.6 s did not at 3.5; benchmarks/simulate.py times the default run.
SECONDS_PER_MINER = 0.6

#: the same when the chain skips idle time (the default): a window then ends as soon as every
#: node waits, so its length is only the cap a straggler meets; a generous one keeps a loaded
#: machine from making honest updates late.
SECONDS_PER_MINER_SKIPPING = 2.5


def default_model() -> GPTConfig:
    return GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)


@dataclass(frozen=True)
class SimConfig:
    """A local multi-peer run: every peer and validator is its own OS process.

    Args:
        peers: honest SparseLoCo peers.
        windows: outer rounds.
        inner_steps: AdamW steps per window (H).
        batch_size: sequences per inner step.
        inner_lr: AdamW learning rate.
        model: the GPT's shape (byte-level; vocab 256).
        preset: SparseLoCo preset (``covenant-72b`` …); ``outer_lr`` overrides its α.
        adversaries: adversary kinds to add, one peer each (see :data:`ADVERSARY_KINDS`).
        aggregate: ``"top"``: peers aggregate only the updates the validator accepted after
            scoring the window (evaluated, and a positive gain or a positive standing score);
            ``"all"``: every valid update.
        storage: a folder, or ``s3://bucket/prefix`` (with ``s3_endpoint`` and credentials
            from the environment); empty = ``<out>/storage``.
        data: text files or token shards; ``None`` = the Python standard library's sources.
        corpus_bytes: bytes of the standard library corpus to read.
        heldout_batches: held-out batches (of ``batch_size``) for the global loss curve.
        seed: the run's public seed (model init, data assignment, evaluation).
        out: run folder for metrics, summary, plots, node configs, logs, chain and storage.
        validators: validator processes (each scores every window and sets weights; the
            miners follow the one with the most stake, ``validator`` or ``validator-0``).
        window_s: seconds per window on the local chain's clock: room for H inner steps,
            the exchange and the validator's scoring of the previous window; ``None`` =
            :data:`SECONDS_PER_MINER` per miner process (at least 1 s), since the processes
            share the machine's cores, or :data:`SECONDS_PER_MINER_SKIPPING` with
            ``skip_idle``.
        blocks_per_window: blocks of ``window_s / blocks_per_window`` seconds per window.
        deadline_s: how long a miner waits for a window's aggregation set.
        link: every node's modelled network link (:func:`netcomm.parse_link`, e.g.
            ``"100mbit,50ms"``; ``""`` = none); see ``exchange.link`` of the node config.
        threads: torch intra-op threads per process.
        skip_idle: the local chain moves to the next awaited block as soon as every node
            waits for it (:meth:`gauntlet.SqliteSubnet.skip_idle`), so windows last as long as
            their work rather than ``window_s``; ``False`` keeps the wall-clock block time, as
            a real chain does.
        eval_samples: samples the validator evaluates per peer on its assigned data (at most
            the ``inner_steps × batch_size`` it trained on) and on the shared random set
            (``validator.eval_assigned`` / ``eval_random``): fewer score faster and noisier.
        overlap: miners train window w + 1 while w's update is scored and aggregated
            (``miner.overlap``); its aggregate is applied one window late.
        apply_after: with ``overlap``, apply it this many inner steps into the next window
            (``miner.apply_after``; 0 = at that window's end).
        apply_wait: with ``apply_after``: wait there for it (default), or apply it at the
            first step from there on at which it has arrived (``miner.apply_wait``).
    """

    peers: int = 4
    windows: int = 12
    inner_steps: int = 10
    batch_size: int = 8
    inner_lr: float = 2e-3
    model: GPTConfig = field(default_factory=default_model)
    preset: str = "covenant-72b"
    outer_lr: float | None = None
    adversaries: tuple[str, ...] = ()
    aggregate: Literal["top", "all"] = "top"
    storage: str = ""
    s3_endpoint: str | None = None
    data: str | None = None
    corpus_bytes: int = 2_000_000
    heldout_batches: int = 8
    seed: int = 0
    out: Path = Path("runs/latest")
    validators: int = 1
    window_s: float | None = None
    blocks_per_window: int = 4
    deadline_s: float = 120.0
    link: str = ""
    threads: int = 1
    skip_idle: bool = True
    eval_samples: int = 64
    overlap: bool = False
    apply_after: int = 0
    apply_wait: bool = True

    def __post_init__(self) -> None:
        for name in (
            "peers",
            "windows",
            "inner_steps",
            "batch_size",
            "heldout_batches",
            "validators",
            "blocks_per_window",
            "threads",
            "eval_samples",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [a for a in self.adversaries if a not in ADVERSARY_KINDS]
        if unknown:
            raise ConfigError(
                f"unknown adversary kinds {unknown}; choose from {', '.join(ADVERSARY_KINDS)}"
            )
        if "copier" in self.adversaries and self.peers < 1:
            raise ConfigError("a copier needs at least one honest peer to copy")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.aggregate not in ("top", "all"):
            raise ConfigError(f"aggregate must be 'top' or 'all', got {self.aggregate!r}")
        if self.inner_lr <= 0 or (self.outer_lr is not None and self.outer_lr <= 0):
            raise ConfigError("learning rates must be > 0")
        if self.link:
            try:
                parse_link(self.link)
            except ValueError as exc:
                raise ConfigError(f"--link: {exc}") from None
        if (self.window_s is not None and not self.window_s > 0) or not self.deadline_s > 0:
            raise ConfigError("window_s and deadline_s must be > 0 seconds")
        if not 0 <= self.apply_after < self.inner_steps:
            raise ConfigError(
                f"apply_after must be in [0, inner_steps) = [0, {self.inner_steps}); got "
                f"{self.apply_after}"
            )
        self.miner_settings()  # the miner's own rules for overlap, apply_after, apply_wait

    def miner_settings(self, behaviour: str = "honest", victim: str = "") -> MinerSettings:
        """A miner's ``[miner]`` settings in this simulation (``behaviour``: honest or one of
        :data:`~subnet.config.ADVERSARY_KINDS`)."""
        return MinerSettings(
            behaviour=behaviour,  # type: ignore[arg-type]
            victim=victim,
            overlap=self.overlap,
            apply_after=self.apply_after,
            apply_wait=self.apply_wait,
        )

    @property
    def honest_ids(self) -> list[str]:
        return [f"peer-{i}" for i in range(self.peers)]

    @property
    def adversary_ids(self) -> dict[str, str]:
        """peer id → adversary kind."""
        return {f"adv-{kind}": kind for kind in self.adversaries}

    @property
    def window_seconds(self) -> float:
        """``window_s``, or its default for this many miners."""
        if self.window_s is not None:
            return self.window_s
        per_miner = SECONDS_PER_MINER_SKIPPING if self.skip_idle else SECONDS_PER_MINER
        return max(1.0, per_miner * (self.peers + len(self.adversaries)))

    @property
    def validator_ids(self) -> list[str]:
        if self.validators == 1:
            return ["validator"]
        return [f"validator-{i}" for i in range(self.validators)]

    @property
    def peer_ids(self) -> list[str]:
        return sorted([*self.honest_ids, *self.adversary_ids])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d
