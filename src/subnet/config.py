"""The typed configuration of a miner or validator, loaded from one TOML file.

Every section is a frozen dataclass that checks its fields on construction and raises
:class:`NodeConfigError` with a sentence naming the field (``storage.bucket``) and the fix.
:func:`load_config` reads TOML with :mod:`tomllib`, refuses unknown keys and wrong types, and
resolves secrets: a secret field ``x`` may be given inline (``x = "..."``) or as the name of
an environment variable (``x_env = "VAR"``). Secrets are held in :class:`Secret`, whose
``repr``/``str`` never show the value, so printing or logging a config leaks nothing.

Sections (see ``docs/miner.md`` and ``examples/configs/``):

* top level: ``role`` (``"miner"``/``"validator"``), ``hotkey``, ``state_dir``;
* ``[run]`` (+ ``[run.model]``, ``[run.data]``): what is trained; identical on every node
  of a run;
* ``[window]``: how blocks map to windows;
* ``[storage]``: this node's own bucket (local folder or S3) and the read-only keys it
  publishes;
* ``[chain]``: in-memory, a local SQLite file shared by processes, or a Bittensor network;
* ``[exchange]``: deadlines and polling;
* ``[miner]`` / ``[validator]``: role-specific settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from netcomm.link import parse_link
from sparseloco.config import PRESETS, OverlapConfig
from sparseloco.errors import ConfigError
from sparseloco.models.gpt import GPTConfig

_HOTKEY = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: miner behaviours. ``honest`` is the only one for real mining; the others are the
#: adversaries a validator must pay nothing: free-rider (zero update), noise (random update
#: with an honest norm), copier (republishes ``miner.victim``'s update, lightly perturbed),
#: stale (trains from the global model three windows old), wrong-data (trains on data that
#: is not its assignment), poisoner (sign-flipped, amplified update).
BEHAVIOURS = ("honest", "free-rider", "noise", "copier", "stale", "wrong-data", "poisoner")
ADVERSARY_KINDS = BEHAVIOURS[1:]


class NodeConfigError(ConfigError):
    """A node configuration value is missing, unknown, of the wrong type or out of range."""


class Secret:
    """A string that is never shown: ``repr``/``str`` print ``***``; :meth:`reveal` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise NodeConfigError("a secret must be a non-empty string")
        self._value = value

    def reveal(self) -> str:
        """The secret value (pass it to the client that needs it; never log it)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise NodeConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """The training text.

    Args:
        path: text files or token shards (file or folder); ``""`` = the Python standard
            library's sources (present on every machine, so every node builds the same data).
        corpus_bytes: bytes of the standard-library corpus (or tokens of ``path``) to use.
    """

    path: str = ""
    corpus_bytes: int = 2_000_000

    def __post_init__(self) -> None:
        _check(self.corpus_bytes >= 1024, "run.data.corpus_bytes must be >= 1024")


def _default_model() -> GPTConfig:
    return GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)


@dataclass(frozen=True)
class RunConfig:
    """What the network trains; every miner and validator of one run must agree on it.

    Args:
        seed: the run's public seed (model init, data assignment, evaluation sets).
        preset: SparseLoCo preset (codec, β, α, reducer).
        outer_lr: overrides the preset's outer learning rate α (unset: the preset's).
        inner_steps: AdamW steps per window (H).
        batch_size: sequences per inner step.
        inner_lr: AdamW learning rate.
        model: the GPT's shape (``[run.model]``, fields of :class:`GPTConfig`).
        data: the training text (``[run.data]``).
    """

    seed: str = "sparseloco"
    preset: str = "covenant-72b"
    outer_lr: float | None = None
    inner_steps: int = 10
    batch_size: int = 8
    inner_lr: float = 2e-3
    model: GPTConfig = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        _check(bool(self.seed), "run.seed must be a non-empty string")
        _check(
            self.preset in PRESETS,
            f"run.preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}",
        )
        _check(self.inner_steps >= 1, "run.inner_steps must be >= 1")
        _check(self.batch_size >= 1, "run.batch_size must be >= 1")
        _check(_positive(self.inner_lr), "run.inner_lr must be a finite number > 0")
        _check(
            self.outer_lr is None or _positive(self.outer_lr),
            "run.outer_lr must be a finite number > 0 (or left out for the preset's)",
        )


@dataclass(frozen=True)
class WindowConfig:
    """How blocks map to windows: ``window = (block - start_block) // blocks_per_window``.

    Args:
        blocks_per_window: blocks in one window (Bittensor makes a block every 12 s).
        start_block: the block where window 0 starts.
        block_time_s: seconds per block of the in-memory and local chains (ignored on a
            real chain, which makes its own blocks).
        poll_s: how often a waiting node reads the block number.
    """

    blocks_per_window: int = 5
    start_block: int = 0
    block_time_s: float = 12.0
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        _check(self.blocks_per_window >= 1, "window.blocks_per_window must be >= 1")
        _check(self.start_block >= 0, "window.start_block must be >= 0")
        _check(_positive(self.block_time_s), "window.block_time_s must be > 0 seconds")
        _check(_positive(self.poll_s), "window.poll_s must be > 0 seconds")


@dataclass(frozen=True)
class StorageConfig:
    """This node's own storage: it writes there, everyone else reads.

    Args:
        kind: ``"local"`` (a folder shared by every node of the run, e.g. on one machine or
            an NFS mount) or ``"s3"`` (any S3-compatible bucket: R2, AWS, MinIO).
        root: local only: the shared folder; each node works in ``root/prefix``.
        prefix: the node's area: a sub-folder of ``root`` (local; defaults to the hotkey) or
            a key prefix inside the bucket (s3; default none).
        bucket / endpoint_url / region: s3 only: where the bucket is. R2's endpoint is
            ``https://<account id>.r2.cloudflarestorage.com`` with region ``auto``.
        access_key_id / secret_access_key: s3 write credentials (kept private; unset: boto3's
            default chain).
        read_access_key_id / read_secret_access_key: s3 read-only credentials, published on
            chain so that others can download (unset: readers use their own credentials).
    """

    kind: Literal["local", "s3"] = "local"
    root: str = "runs/node/storage"
    prefix: str = ""
    bucket: str = ""
    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: Secret | None = None
    read_access_key_id: str = ""
    read_secret_access_key: Secret | None = None

    def __post_init__(self) -> None:
        _check(self.kind in ("local", "s3"), "storage.kind must be 'local' or 's3'")
        if self.kind == "local":
            _check(bool(self.root), "storage.root must name a folder for kind = 'local'")
            return
        _check(bool(self.bucket), "storage.bucket must name a bucket for kind = 's3'")
        _check(
            bool(self.access_key_id) == (self.secret_access_key is not None),
            "storage.access_key_id and storage.secret_access_key go together (or leave both "
            "out to use boto3's default credentials)",
        )
        _check(
            bool(self.read_access_key_id) == (self.read_secret_access_key is not None),
            "storage.read_access_key_id and storage.read_secret_access_key go together",
        )


@dataclass(frozen=True)
class ChainConfig:
    """Which chain: in-memory (one process), local (one SQLite file) or a Bittensor network.

    Args:
        kind: ``"memory"``, ``"local"`` or ``"bittensor"``.
        netuid: the subnet.
        path: local only: the SQLite file every node of the run opens (created when
            missing); its blocks follow ``window.block_time_s``.
        network: bittensor only: ``finney``, ``test``, ``local`` or a websocket URL.
        wallet_name / wallet_hotkey: bittensor only: the wallet whose hotkey commits and
            sets weights (its ss58 address is this node's id).
        wallet_path: bittensor only: the folder holding the wallets (``btcli``'s default).
        stake: memory and local: the stake this hotkey registers with (validators need > 0).
    """

    kind: Literal["memory", "local", "bittensor"] = "memory"
    netuid: int = 1
    path: str = "runs/node/chain.sqlite"
    network: str = "finney"
    wallet_name: str = "default"
    wallet_hotkey: str = "default"
    wallet_path: str = "~/.bittensor/wallets"
    stake: float = 0.0

    def __post_init__(self) -> None:
        _check(
            self.kind in ("memory", "local", "bittensor"),
            "chain.kind must be 'memory', 'local' or 'bittensor'",
        )
        _check(self.kind != "local" or bool(self.path), "chain.path must name a file")
        if self.kind == "bittensor":
            for name in ("network", "wallet_name", "wallet_hotkey", "wallet_path"):
                _check(bool(getattr(self, name)), f"chain.{name} must not be empty")
        _check(self.netuid >= 0, "chain.netuid must be >= 0")
        _check(self.stake >= 0, "chain.stake must be >= 0")


@dataclass(frozen=True)
class ExchangeSettings:
    """Deadlines and polling of the storage exchange.

    Args:
        gather_deadline_s: how long one gather may take.
        poll_interval_s: how often an object not yet there is looked for again.
        selection_timeout_s: miners: how long to wait for the validator's aggregation set.
        max_object_mb: largest update accepted from a peer.
        link: a modelled network link for this node's storage traffic (measurements and
            tests; :func:`netcomm.parse_link` syntax such as ``"100mbit,50ms"``; ``""`` =
            none). S3 endpoints on loopback go through a :class:`netcomm.LinkProxy` that
            paces the real socket bytes; a local folder through :class:`netcomm.ShapedStorage`
            (timing only: there are no sockets).
    """

    gather_deadline_s: float = 30.0
    poll_interval_s: float = 0.5
    selection_timeout_s: float = 120.0
    max_object_mb: int = 1024
    link: str = ""

    def __post_init__(self) -> None:
        for name in ("gather_deadline_s", "poll_interval_s", "selection_timeout_s"):
            _check(_positive(getattr(self, name)), f"exchange.{name} must be > 0 seconds")
        _check(self.max_object_mb >= 1, "exchange.max_object_mb must be >= 1")
        if self.link:
            try:
                parse_link(self.link)
            except ValueError as exc:
                raise NodeConfigError(f"exchange.link: {exc}") from None


#: miner settings → the :class:`sparseloco.OverlapConfig` field each sets
_OVERLAP_FIELDS = {
    "overlap_extrapolation": "extrapolation",
    "overlap_message_weight": "message_weight",
    "overlap_own_weight": "own_weight",
}


@dataclass(frozen=True)
class MinerSettings:
    """Miner-only settings.

    Args:
        aggregate: ``"validator"``: aggregate the set the followed validator accepted for the
            window (every miner then steps identically); ``"all"``: every valid update found.
        validator: hotkey of the validator to follow; ``""`` = the validator with the most
            stake that has a commitment.
        keep_checkpoints: local checkpoints kept (older ones are deleted).
        behaviour: ``"honest"``, or one of the adversaries of :data:`ADVERSARY_KINDS`, for
            testing validators (``sparseloco simulate --adversaries``).
        victim: the copier's victim (the hotkey whose update it republishes).
        overlap: publish window w's update and start training window w + 1 at once, while
            w's aggregation set is scored, gathered and aggregated in the background;
            w's aggregate is applied one window late with the delayed rule of
            :class:`sparseloco.SparseLoCo` (``overlap=True``), so the miner does not wait
            for the validator's scoring between windows.
        apply_after: with ``overlap``: apply the previous window's aggregate after this many
            inner steps of the next window (waiting there if it has not arrived: Streaming
            DiLoCo's τ, a smaller loss cost than a whole window late); 0 = at the window's
            end.
        apply_wait: with ``apply_after``: ``true`` waits there for the aggregate if it has
            not arrived; ``false`` applies it at the first inner step from ``apply_after``
            on at which it has (else at the window's end), so training never waits
            (``OuterLoop(wait=False)``).
        overlap_extrapolation / overlap_message_weight / overlap_own_weight: with
            ``overlap``: a, v and w of :class:`sparseloco.OverlapConfig`, where each window
            starts (0.75, 0.75 and 0.5).
    """

    aggregate: Literal["validator", "all"] = "validator"
    validator: str = ""
    keep_checkpoints: int = 2
    behaviour: Literal[
        "honest", "free-rider", "noise", "copier", "stale", "wrong-data", "poisoner"
    ] = "honest"
    victim: str = ""
    overlap: bool = False
    apply_after: int = 0
    apply_wait: bool = True
    overlap_extrapolation: float = OverlapConfig.extrapolation
    overlap_message_weight: float = OverlapConfig.message_weight
    overlap_own_weight: float = OverlapConfig.own_weight

    def __post_init__(self) -> None:
        _check(
            self.aggregate in ("validator", "all"),
            "miner.aggregate must be 'validator' or 'all'",
        )
        _check(self.keep_checkpoints >= 1, "miner.keep_checkpoints must be >= 1")
        _check(
            self.behaviour in BEHAVIOURS,
            f"miner.behaviour must be one of {', '.join(BEHAVIOURS)}",
        )
        _check(
            self.behaviour != "copier" or bool(self.victim),
            "miner.victim must name the hotkey a copier copies",
        )
        _check(self.apply_after >= 0, "miner.apply_after must be >= 0 inner steps")
        _check(
            self.overlap or self.apply_after == 0,
            "miner.apply_after needs miner.overlap = true",
        )
        _check(
            self.apply_wait or self.apply_after > 0,
            "miner.apply_wait = false needs miner.apply_after >= 1",
        )
        for name, field_ in _OVERLAP_FIELDS.items():
            _check(0.0 <= getattr(self, name) <= 1.0, f"miner.{name} must lie in [0, 1]")
            _check(
                self.overlap or getattr(self, name) == getattr(OverlapConfig, field_),
                f"miner.{name} needs miner.overlap = true (with overlap off, remove it; the "
                f"defaults are a = {OverlapConfig.extrapolation}, w = {OverlapConfig.own_weight}, "
                f"v = {OverlapConfig.message_weight})",
            )

    def overlap_config(self) -> OverlapConfig | bool:
        """The outer optimizer's ``overlap=``: ``False``, or where each window starts."""
        if not self.overlap:
            return False
        return OverlapConfig(**{f: getattr(self, n) for n, f in _OVERLAP_FIELDS.items()})


@dataclass(frozen=True)
class ValidatorSettings:
    """Validator-only settings.

    Args:
        weights_every: set weights on chain every K windows.
        eval_assigned / eval_random: samples evaluated per peer on its own data and on the
            shared random set (64 each: with 16 the assigned-data indicator is close to a
            coin flip for honest peers in short runs).
        eval_batch_size: sequences per forward pass when evaluating (one pass per set by
            default: the validator's scoring is on every miner's critical path). A set's
            loss is the mean of its batches' means, so validators that must agree use the
            same value, as they use the same evaluation sizes.
        eval_threads: threads the peers' evaluations are split over, each on its own copy
            of the model (``gauntlet.Evaluator``'s ``threads``; the results are bit-identical
            to one thread's). More than 1 pays where cores idle while the validator scores,
            e.g. the local simulation's miners waiting for the set; default 1.
        heldout_batches: held-out batches for the logged global loss (0 = none).
        keep_checkpoints: model checkpoints kept in the bucket.
        aggregate: the aggregation set it publishes for the miners and steps on itself:
            ``"accepted"`` (evaluated, and helpful or in good standing) or ``"valid"`` (every
            update that passed verification).
    """

    weights_every: int = 5
    eval_assigned: int = 64
    eval_random: int = 64
    eval_batch_size: int = 64
    eval_threads: int = 1
    heldout_batches: int = 4
    keep_checkpoints: int = 2
    aggregate: Literal["accepted", "valid"] = "accepted"

    def __post_init__(self) -> None:
        _check(
            self.aggregate in ("accepted", "valid"),
            "validator.aggregate must be 'accepted' or 'valid'",
        )
        names = ("weights_every", "eval_assigned", "eval_random", "eval_batch_size", "eval_threads")
        for name in (*names, "keep_checkpoints"):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            _check(ok, f"validator.{name} must be an integer >= 1")
        _check(self.heldout_batches >= 0, "validator.heldout_batches must be >= 0")


@dataclass(frozen=True)
class NodeConfig:
    """One node's whole configuration (see the module docstring for the sections).

    Args:
        role: ``"miner"`` or ``"validator"``.
        hotkey: this node's id on the in-memory chain (letters, digits, ``.``, ``_``,
            ``-``); on Bittensor the wallet's hotkey address is used instead.
        state_dir: local folder for the signing key and (miners) checkpoints.
    """

    role: Literal["miner", "validator"]
    hotkey: str = ""
    state_dir: str = "runs/node"
    run: RunConfig = field(default_factory=RunConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    exchange: ExchangeSettings = field(default_factory=ExchangeSettings)
    miner: MinerSettings = field(default_factory=MinerSettings)
    validator: ValidatorSettings = field(default_factory=ValidatorSettings)

    def __post_init__(self) -> None:
        _check(self.role in ("miner", "validator"), "role must be 'miner' or 'validator'")
        _check(bool(self.state_dir), "state_dir must name a folder")
        if self.chain.kind != "bittensor":
            _check(
                bool(_HOTKEY.match(self.hotkey)),
                f"hotkey {self.hotkey!r} must be 1-64 letters, digits, '.', '_' or '-' "
                "(it names this node on the in-memory or local chain)",
            )
        _check(
            self.miner.apply_after < self.run.inner_steps,
            f"miner.apply_after must be < run.inner_steps ({self.run.inner_steps})",
        )

    def replace(self, **changes: Any) -> NodeConfig:
        """A copy with top-level fields or whole sections replaced."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for logs; secrets appear as ``"***"``."""
        return _plain(self)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _plain(obj: Any, *, secrets: bool = True) -> Any:
    """Nested dicts of ``obj``'s fields; secrets as ``"***"`` (kept as :class:`Secret` when
    ``secrets`` is False)."""
    if isinstance(obj, Secret):
        return "***" if secrets else obj
    if dataclasses.is_dataclass(obj):
        return {
            f.name: _plain(getattr(obj, f.name), secrets=secrets) for f in dataclasses.fields(obj)
        }
    return obj


def dump_config(cfg: NodeConfig) -> str:
    """``cfg`` as TOML that :func:`load_config` reads back to an equal config.

    Unset optional fields are left out. Inline secrets are refused: a written file must not
    hold them (name an environment variable with ``x_env`` instead).
    """
    lines: list[str] = []
    _dump_table(_plain(cfg, secrets=False), [], lines)
    return "\n".join(lines) + "\n"


def _dump_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
    if path:
        lines.append(f"\n[{'.'.join(path)}]")
    lines.extend(f"{key} = {_toml_value(value, [*path, key])}" for key, value in scalars.items())
    for key, value in table.items():
        if isinstance(value, dict):
            _dump_table(value, [*path, key], lines)


def _toml_value(value: Any, path: list[str]) -> str:
    if isinstance(value, Secret):
        raise NodeConfigError(
            f'{".".join(path)} holds an inline secret; write {path[-1]}_env = "VAR" instead'
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    raise NodeConfigError(f"{'.'.join(path)}: cannot write {value!r} as TOML")


def load_config(path: str | Path) -> NodeConfig:
    """Read a node configuration from a TOML file; relative paths stay relative to the CWD."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise NodeConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise NodeConfigError(f"{path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NodeConfigError(f"cannot read config file {path}: {exc}") from None
    return config_from_dict(data)


def config_from_dict(
    data: dict[str, Any], environ: typing.Mapping[str, str] | None = None
) -> NodeConfig:
    """Build a :class:`NodeConfig` from nested plain values (the parsed TOML)."""
    return _build(NodeConfig, data, "", os.environ if environ is None else environ)


def _build(cls: type, data: Any, where: str, environ: typing.Mapping[str, str]) -> Any:
    if not isinstance(data, dict):
        raise NodeConfigError(f"{where.rstrip('.') or 'the config'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.removesuffix("_env") if key.endswith("_env") else key
        path = f"{where}{name}"
        if name not in names or (key != name and _unwrap(hints[name]) is not Secret):
            raise NodeConfigError(
                f"unknown key {where}{key}; known keys here: {', '.join(sorted(names))}"
            )
        if key != name:
            if not isinstance(value, str) or value not in environ:
                raise NodeConfigError(
                    f"{where}{key} names the environment variable {value!r}, which is not set"
                )
            value = environ[value]
        if name in kwargs:
            raise NodeConfigError(f"{path} is given twice (inline and through {name}_env)")
        kwargs[name] = _convert(hints[name], value, path, environ)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise NodeConfigError(f"{where or 'the config'}: {exc}") from None
    except ConfigError as exc:
        if isinstance(exc, NodeConfigError):
            raise
        raise NodeConfigError(f"{where.rstrip('.') or 'the config'}: {exc}") from None


def _unwrap(hint: Any) -> Any:
    """``X | None`` → ``X``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _convert(hint: Any, value: Any, path: str, environ: typing.Mapping[str, str]) -> Any:
    target = _unwrap(hint)
    if dataclasses.is_dataclass(target):
        return _build(target, value, path + ".", environ)
    if target is Secret:
        if not isinstance(value, str) or not value:
            raise NodeConfigError(f"{path} must be a non-empty string")
        return Secret(value)
    if typing.get_origin(target) is Literal:
        allowed = typing.get_args(target)
        if value not in allowed:
            raise NodeConfigError(f"{path} must be one of {list(allowed)}, got {value!r}")
        return value
    if target is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise NodeConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    names = {int: "an integer", str: "a string", bool: "true or false"}
    if target in names:
        if not isinstance(value, target) or (target is int and isinstance(value, bool)):
            raise NodeConfigError(f"{path} must be {names[target]}, got {value!r}")
        return value
    raise NodeConfigError(f"{path}: unsupported field type {hint!r}")
