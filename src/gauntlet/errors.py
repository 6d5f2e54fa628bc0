"""Typed errors of the scorer, the weight conversion and the chain interface.

All derive from :class:`GauntletError`; the configuration error is also a ``ValueError`` so
callers that validate user input can catch the standard type.
"""

from __future__ import annotations


class GauntletError(Exception):
    """Base class of every error this package raises on purpose."""


class GauntletConfigError(GauntletError, ValueError):
    """A configuration value is out of range; the message says which and how to fix it."""


class WeightsError(GauntletError, ValueError):
    """Scores cannot be turned into weights the chain accepts (e.g. no registered uids)."""


class ChainError(GauntletError, RuntimeError):
    """A chain read or write failed or was rejected; the message carries the chain's reason."""


class UnsupportedSDKError(ChainError):
    """The installed ``bittensor`` SDK lacks the API the adapter needs; names its version."""
