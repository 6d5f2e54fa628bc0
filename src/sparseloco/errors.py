"""Typed errors raised by the codec, the aggregation and the outer optimizers.

Every error names the tensor (or config field) and the problem, so a caller can log it and
drop the offending input without guessing. All of them derive from :class:`SparseLoCoError`.
"""

from __future__ import annotations


class SparseLoCoError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(SparseLoCoError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class UnknownPresetError(ConfigError, KeyError):
    """A preset name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class UpdateError(SparseLoCoError, ValueError):
    """An update (pseudo-gradient or compressed message) is unusable.

    Attributes:
        tensor: name of the offending tensor, or ``None`` when the problem is global.
    """

    def __init__(self, message: str, tensor: str | None = None) -> None:
        self.tensor = tensor
        super().__init__(f"{tensor}: {message}" if tensor is not None else message)


class NonFiniteError(UpdateError):
    """A tensor holds NaN or Inf where finite values are required."""


class ShapeMismatchError(UpdateError):
    """A tensor's shape or element count does not match what the receiver expects."""


class CorruptUpdateError(UpdateError):
    """A compressed tensor is internally inconsistent (lengths, index ranges, order, table)."""


class SafetensorsFormatError(CorruptUpdateError):
    """Bytes that are not a well-formed safetensors encoding of payload tensors."""


class CodecMismatchError(UpdateError):
    """Encoder and decoder disagree on the codec configuration."""


class BackendUnavailableError(SparseLoCoError, RuntimeError):
    """A compute backend was requested explicitly but cannot run here; the message says why."""


class ExchangeError(SparseLoCoError, RuntimeError):
    """Publishing or gathering through an exchange failed."""


class RankError(ExchangeError):
    """A round failed on one or more ranks of processes that step together (the ranks of a
    DDP/FSDP2 peer, or :class:`~sparseloco.exchange.DistributedExchange`'s peers); every rank
    raises this same error from the same collective, and none steps.

    Attributes:
        window: the window of the round.
        phase: where it failed: ``"check"``, ``"encode"``, ``"gather"`` (publish, gather,
            payload checks, aggregation), ``"commit"``, ``"apply"``, ``"publish"``
            (:class:`~sparseloco.exchange.DistributedExchange`'s serialization) or ``"join"``.
        failed: each failed rank (in the group) and its error, ``"Type: message"``. The
            rank's own error, if it is one of them, is ``__cause__``.
    """

    def __init__(self, message: str, window: int, phase: str, failed: dict[int, str]) -> None:
        self.window = window
        self.phase = phase
        self.failed = failed
        super().__init__(message)


class BackgroundRoundError(ExchangeError):
    """The background part of an overlapped round (publish, gather, payload checks or
    aggregation) failed; raised at the next round boundary, before anything changes.

    Attributes:
        window: the window whose round failed.
        phase: ``"publish"``, ``"gather"`` or ``"aggregate"``. The failure is ``__cause__``.
    """

    def __init__(self, message: str, window: int, phase: str) -> None:
        self.window = window
        self.phase = phase
        super().__init__(f"window {window}: {message}")
