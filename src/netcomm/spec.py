"""The receiver's view of the model: parameter names, shapes and dtypes, and their fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from sparseloco.names import canonical_name


@dataclass(frozen=True)
class ModelSpec:
    """Names, shapes and dtypes of a model's parameters, sorted by name.

    Two peers can exchange updates only if their specs are equal; the :attr:`fingerprint`
    written into every envelope lets a receiver reject a foreign model's update before
    decompressing it.
    """

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    def __post_init__(self) -> None:
        names = [e[0] for e in self.entries]
        if names != sorted(names) or len(set(names)) != len(names):
            raise ValueError(
                "ModelSpec entries must have unique names in sorted order; build it with "
                "ModelSpec.from_named_tensors"
            )

    @classmethod
    def from_named_tensors(
        cls, named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> ModelSpec:
        """From ``model.named_parameters()`` or a ``{name: tensor}`` mapping; names become
        their wire form (:func:`sparseloco.canonical_name`: wrapper prefixes dropped)."""
        items = named.items() if isinstance(named, Mapping) else named
        entries = [
            (canonical_name(n), tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."))
            for n, t in items
        ]
        return cls(tuple(sorted(entries)))

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ModelSpec:
        """From a module's named parameters."""
        return cls.from_named_tensors(module.named_parameters())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, shape, _ in self.entries}

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the canonical JSON list ``[[name, shape, dtype], ...]``."""
        canon = json.dumps([[n, list(s), d] for n, s, d in self.entries], separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()
