"""Typed errors of the netcomm package.

All derive from :class:`NetcommError`, itself a :class:`sparseloco.errors.SparseLoCoError`, so a
caller that already handles sparseloco's errors handles these too.
"""

from __future__ import annotations

from sparseloco.errors import ConfigError, ExchangeError, SparseLoCoError


class NetcommError(SparseLoCoError):
    """Base class of every error netcomm raises on purpose."""


class NetcommConfigError(NetcommError, ConfigError):
    """A netcomm configuration value is invalid; the message says how to fix it."""


class StorageError(NetcommError, RuntimeError):
    """A storage operation failed and retrying it will not help."""


class TransientStorageError(StorageError):
    """A storage operation failed in a way a retry may cure (connection, 5xx, truncation)."""


class ObjectNotFoundError(StorageError):
    """The key does not exist."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no object at key {key!r}")


class InvalidKeyError(StorageError, ValueError):
    """A key is malformed or would escape the storage root."""


class EnvelopeError(NetcommError, ValueError):
    """A received envelope was rejected.

    Attributes:
        reason: a short stable code for logs and statuses, one of ``"format"``, ``"version"``,
            ``"too_large"``, ``"signature"``, ``"peer"``, ``"replay"`` (signed for another
            window), ``"fingerprint"``, ``"kind"`` (dense on a sparse channel or vice versa),
            ``"codec"``, ``"checksum"``, ``"decompress"``, ``"tensors"`` (safetensors
            structure), ``"shape"``, ``"corrupt"`` (index ranges/order, buffer lengths, table),
            ``"nonfinite"``.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class NotEnoughPeersError(NetcommError, ExchangeError):
    """Fewer than ``min_peers`` updates were usable by the deadline.

    Attributes:
        result: the :class:`sparseloco.exchange.GatherResult` with every peer's status.
    """

    def __init__(self, message: str, result: object) -> None:
        self.result = result
        super().__init__(message)


class CheckpointError(NetcommError, RuntimeError):
    """A checkpoint cannot be written or read (missing file, bad checksum, unsupported value)."""
