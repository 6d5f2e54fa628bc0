"""netcomm: object-storage exchange of updates between untrusting peers.

Quick use::

    from netcomm import (ExchangeConfig, LocalStorage, ModelSpec, PeerRecord, StaticDirectory,
                         StorageExchange, Ed25519Signer)

    signer = Ed25519Signer.generate()
    storage = LocalStorage("/shared/bucket")            # or S3Storage(S3Config(...))
    directory = StaticDirectory([PeerRecord("peer-0", storage, signer.public_key), ...])
    exchange = StorageExchange("peer-0", storage, directory, signer,
                               ModelSpec.from_module(model), ExchangeConfig(deadline_s=30))
    outer = sparseloco.SparseLoCo(model.named_parameters(), exchange)

Modules: :mod:`~netcomm.storage` (interface, keys, local folder), :mod:`~netcomm.s3`
(S3-compatible backend), :mod:`~netcomm.envelope` (wire format), :mod:`~netcomm.signing`,
:mod:`~netcomm.directory`, :mod:`~netcomm.exchange`, :mod:`~netcomm.checkpoint`,
:mod:`~netcomm.joining` (a new peer catches up: :func:`join`), :mod:`~netcomm.faults`
(fault injection for tests), :mod:`~netcomm.link` (WAN link model). See ``docs/netcomm.md``.
"""

from netcomm.checkpoint import Checkpoint, CheckpointStore
from netcomm.directory import PeerDirectory, PeerRecord, StaticDirectory, update_key
from netcomm.envelope import (
    FORMAT_VERSION,
    BodyDigest,
    BodyHasher,
    Envelope,
    EnvelopeLimits,
    open_envelope,
    read_header,
    seal_envelope,
)
from netcomm.errors import (
    CheckpointError,
    EnvelopeError,
    InvalidKeyError,
    NetcommConfigError,
    NetcommError,
    NotEnoughPeersError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from netcomm.exchange import ExchangeConfig, StorageExchange
from netcomm.faults import FaultPlan, FaultProxy, FaultyStorage
from netcomm.joining import JoinReport, join, window_updates
from netcomm.link import (
    Link,
    LinkProxy,
    LinkSpec,
    ShapedStorage,
    TokenBucket,
    parse_link,
)
from netcomm.s3 import S3Config, S3Storage
from netcomm.signing import (
    Ed25519Signer,
    Ed25519Verifier,
    Signer,
    Verifier,
    default_verifiers,
)
from netcomm.spec import ModelSpec
from netcomm.storage import (
    LocalStorage,
    ObjectInfo,
    Storage,
    StreamingStorage,
    join_key,
    read_range,
    validate_key,
)

__all__ = [
    "FORMAT_VERSION",
    "BodyDigest",
    "BodyHasher",
    "Checkpoint",
    "CheckpointError",
    "CheckpointStore",
    "Ed25519Signer",
    "Ed25519Verifier",
    "Envelope",
    "EnvelopeError",
    "EnvelopeLimits",
    "ExchangeConfig",
    "FaultPlan",
    "FaultProxy",
    "FaultyStorage",
    "InvalidKeyError",
    "JoinReport",
    "Link",
    "LinkProxy",
    "LinkSpec",
    "LocalStorage",
    "ModelSpec",
    "NetcommConfigError",
    "NetcommError",
    "NotEnoughPeersError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "PeerDirectory",
    "PeerRecord",
    "S3Config",
    "S3Storage",
    "ShapedStorage",
    "Signer",
    "StaticDirectory",
    "Storage",
    "StorageError",
    "StorageExchange",
    "StreamingStorage",
    "TokenBucket",
    "TransientStorageError",
    "Verifier",
    "default_verifiers",
    "join",
    "join_key",
    "open_envelope",
    "parse_link",
    "read_header",
    "read_range",
    "seal_envelope",
    "update_key",
    "validate_key",
    "window_updates",
]
