"""What peers exchange: a compressed update (SparseLoCo) or a dense one (the baselines).

Both kinds flatten to ``(tensors, metadata)`` for safetensors with ``to_tensors()`` and come
back with :func:`payload_from_tensors`; ``validate_payload`` checks one fully (every tensor
decodable, every value finite) so that an exchange hands over only usable updates. Bytes on
the wire are :mod:`sparseloco.serialization`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from sparseloco.codec import CompressedUpdate, check_finite, check_shapes
from sparseloco.errors import CorruptUpdateError
from sparseloco.validation import validate_update

DENSE_FORMAT = "sparseloco.dense/1"
_WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DenseUpdate:
    """Dense named tensors (a DiLoCo pseudo-gradient or a data-parallel gradient)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    kind = "dense"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {n: t.detach().contiguous().cpu() for n, t in sorted(self.tensors.items())}
        return tensors, {"format": DENSE_FORMAT, "kind": self.kind}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]
    ) -> DenseUpdate:
        if meta.get("format") != DENSE_FORMAT:
            raise CorruptUpdateError(f"unknown payload format {meta.get('format')!r}")
        for name, t in tensors.items():
            if t.dtype not in _WIRE_DTYPES.values():
                raise CorruptUpdateError(f"dtype {t.dtype} not allowed", tensor=name)
        return cls(tensors=dict(tensors))

    def check_matches(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise unless this update has exactly these tensor names and shapes."""
        check_shapes({n: t.shape for n, t in self.tensors.items()}, shapes)


Payload = CompressedUpdate | DenseUpdate


def wire_dtype(name: str) -> torch.dtype:
    try:
        return _WIRE_DTYPES[name]
    except KeyError:
        raise CorruptUpdateError(f"unknown wire dtype {name!r}") from None


def payload_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> Payload:
    """Rebuild a payload of either kind from its flat form (structure checks only)."""
    kind = meta.get("kind")
    if kind == CompressedUpdate.kind:
        return CompressedUpdate.from_tensors(tensors, meta)
    if kind == DenseUpdate.kind:
        return DenseUpdate.from_tensors(tensors, meta)
    raise CorruptUpdateError(f"unknown payload kind {kind!r}")


def validate_payload(payload: Payload) -> None:
    """Raise a typed error naming the first (by name) unusable tensor.

    A compressed tensor must be decodable by :func:`sparseloco.codec.decode_sparse` (checked
    without decoding, see :mod:`sparseloco.validation`); a dense one must be finite.
    """
    if isinstance(payload, CompressedUpdate):
        validate_update(payload)
    else:
        for name, t in sorted(payload.tensors.items()):
            check_finite(name, t)
