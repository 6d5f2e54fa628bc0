"""Turn a gathered payload into what the scorer needs, or reject it as invalid.

A payload is usable when it has exactly the model's tensor names and shapes (and, for a
compressed update, the expected codec), decodes without a structural error and every
decoded value is finite. Hand-crafted updates with a NaN/Inf decode table, out-of-range
indices or wrong shapes all end as :class:`InvalidUpdate` with the reason.

:func:`content_digest` names what an update *says*, not how it was sent: BLAKE2b-128 over the
decoded tensors, so the same content re-signed, re-enveloped or re-encoded for another window
has the same digest (the scorer's replay check).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from sparseloco.codec import CompressedUpdate, decode_sparse
from sparseloco.config import CodecConfig
from sparseloco.errors import SparseLoCoError
from sparseloco.payload import DenseUpdate, Payload


class InvalidUpdate(Exception):
    """The payload is unusable; ``str(exc)`` says why."""


@dataclass(frozen=True)
class DecodedUpdate:
    """A peer's update as dense float32 tensors plus, for sparse tensors, its chunk indices.

    Attributes:
        dense: parameter name → dense update of the parameter's shape.
        keys: name → sorted int64 keys ``chunk·chunk_numel + in-chunk index`` of the kept
            entries, for tensors sent sparsely (absent for dense ones).
        kept: name → (number of chunks, entries kept per chunk) of sparse tensors.
    """

    dense: dict[str, torch.Tensor]
    keys: dict[str, np.ndarray] = field(default_factory=dict)
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)


def decode_update(
    payload: Payload,
    shapes: Mapping[str, tuple[int, ...]],
    codec: CodecConfig | None = None,
) -> DecodedUpdate:
    """Decode ``payload`` for a model with parameter ``shapes``; raise :class:`InvalidUpdate`.

    ``codec``: the codec every peer must use (None accepts the payload's own codec). A codec
    makes the protocol sparse: a dense payload is then out of protocol and rejected, never
    scored (it would bypass the codec's sparsity and value limits).
    """
    if codec is not None and not isinstance(payload, CompressedUpdate):
        raise InvalidUpdate(
            f"a {type(payload).__name__} is out of protocol: every peer must send a sparse "
            "update with the expected codec"
        )
    try:
        if isinstance(payload, CompressedUpdate):
            payload.check_matches(shapes, codec or payload.codec)
            dense: dict[str, torch.Tensor] = {}
            keys: dict[str, np.ndarray] = {}
            kept: dict[str, tuple[int, int]] = {}
            for name in sorted(payload.tensors):
                layout, idx, values = decode_sparse(name, payload.tensors[name], payload.codec)
                if not bool(torch.isfinite(values).all()):
                    raise InvalidUpdate(f"{name}: decoded values are not finite")
                if idx is None:
                    dense[name] = layout.from_chunks(values).to(torch.float32)
                    continue
                flat = torch.zeros(layout.numel, dtype=torch.float32, device=values.device)
                flat[layout.flat_positions(idx).reshape(-1)] = values.reshape(-1)
                dense[name] = flat.view(layout.shape)
                chunk_ids = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
                keys[name] = np.sort(
                    (chunk_ids * layout.chunk_numel + idx).reshape(-1).cpu().numpy()
                )
                kept[name] = (int(idx.shape[0]), int(idx.shape[1]))
            return DecodedUpdate(dense=dense, keys=keys, kept=kept)
        if isinstance(payload, DenseUpdate):
            payload.check_matches(shapes)
            dense = {}
            for name in sorted(payload.tensors):
                t = payload.tensors[name].to(torch.float32)
                if not bool(torch.isfinite(t).all()):
                    raise InvalidUpdate(f"{name}: values are not finite")
                dense[name] = t
            return DecodedUpdate(dense=dense)
    except SparseLoCoError as exc:
        raise InvalidUpdate(str(exc)) from None
    raise InvalidUpdate(f"unsupported payload type {type(payload).__name__}")


def content_digest(dense: Mapping[str, torch.Tensor]) -> str | None:
    """Hex BLAKE2b-128 over (name, shape, float32 little-endian bytes) of every tensor in
    sorted name order; None for an update whose values are all zero (it says nothing, so
    sending it again is no replay)."""
    if not any(bool(t.any()) for t in dense.values()):
        return None
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(dense):
        t = dense[name].detach().to(device="cpu", dtype=torch.float32).contiguous() + 0.0  # −0 → +0
        h.update(f"{name}\x1f{tuple(t.shape)}\x1f".encode())
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()
