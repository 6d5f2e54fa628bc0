"""Checkpoints of model, optimizer and error-feedback state on any storage backend.

Layout under ``prefix`` (default ``"checkpoints"``)::

    {prefix}/{step:012d}/model.safetensors
    {prefix}/{step:012d}/optimizer.safetensors        (when an optimizer state is saved)
    {prefix}/{step:012d}/error_feedback.safetensors   (when error-feedback buffers are saved)
    {prefix}/{step:012d}/manifest.json
    {prefix}/latest.json

Tensor files are written first, then the manifest (sizes and SHA-256 of every file, the
optimizer state's non-tensor structure as JSON, user metadata), and ``latest.json`` last, so a
crash at any point leaves ``latest`` pointing at a complete checkpoint. An optimizer
``state_dict`` is split into its tensors (stored in safetensors under ``t0``, ``t1``, ...)
and a JSON tree in which dicts with non-string keys, tuples and non-finite floats are tagged
(``{"$dict": [[k, v], ...]}``, ``{"$tuple": [...]}``, ``{"$float": "nan"}``,
``{"$tensor": "t0"}``). Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from netcomm.errors import CheckpointError, ObjectNotFoundError
from netcomm.storage import Storage, join_key, validate_key

CHECKPOINT_FORMAT = "netcomm.checkpoint"
CHECKPOINT_VERSION = 1
_MAX_JSON_BYTES = 64 << 20


@dataclass
class Checkpoint:
    """A loaded checkpoint (tensors on the CPU unless ``map_location`` said otherwise)."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    error_feedback: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    """Save and load checkpoints through a :class:`~netcomm.storage.Storage`.

    Args:
        storage: any backend (local folder, S3, ...).
        prefix: key prefix of the checkpoints.
    """

    def __init__(self, storage: Storage, prefix: str = "checkpoints") -> None:
        validate_key(prefix)
        self.storage = storage
        self.prefix = prefix

    def _key(self, step: int, name: str) -> str:
        return join_key(self.prefix, f"{step:012d}", name)

    @property
    def latest_key(self) -> str:
        return join_key(self.prefix, "latest.json")

    def save(
        self,
        step: int,
        model: Mapping[str, torch.Tensor],
        optimizer: Mapping[str, Any] | None = None,
        error_feedback: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Write a checkpoint for ``step`` and point ``latest`` at it; returns the manifest key.

        Args:
            model: ``model.state_dict()``.
            optimizer: an optimizer's ``state_dict()`` (tensors, dicts, lists, tuples, ints,
                floats, bools, strings, None).
            error_feedback: error-feedback buffers kept outside the optimizer
                (``ErrorFeedback.state_dict()``).
            meta: JSON-serializable user metadata (data position, run id, ...).
        """
        if not isinstance(step, int) or step < 0:
            raise CheckpointError(f"step must be a non-negative integer, got {step!r}")
        files: dict[str, dict[str, Any]] = {}
        tree, parts = _parts(model, optimizer, error_feedback)
        for name, tensors in parts.items():
            data = st_save(_detached(tensors))
            key = self._key(step, f"{name}.safetensors")
            self.storage.put(key, data)
            files[name] = {
                "key": key,
                "size": len(data),
                "sha256": _sha(data),
                "names": list(tensors),  # safetensors sorts names; state_dict order is kept here
            }
        try:
            manifest = _dumps(
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "step": step,
                    "files": files,
                    "optimizer": tree,
                    "meta": dict(meta or {}),
                }
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"meta is not JSON-serializable: {exc}") from None
        manifest_key = self._key(step, "manifest.json")
        self.storage.put(manifest_key, manifest)
        latest = {"step": step, "manifest": manifest_key, "sha256": _sha(manifest)}
        self.storage.put(self.latest_key, _dumps(latest))
        return manifest_key

    def latest_step(self) -> int | None:
        """The step ``latest`` points at, or ``None`` when nothing was saved yet."""
        try:
            return int(self._latest()["step"])
        except ObjectNotFoundError:
            return None

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (a manifest), ascending."""
        out = []
        for info in self.storage.list(self.prefix + "/"):
            rest = info.key[len(self.prefix) + 1 :]
            step, _, name = rest.partition("/")
            if name == "manifest.json" and step.isdigit():
                out.append(int(step))
        return sorted(out)

    def load(self, step: int | None = None, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Load ``step`` (default: the latest) and verify every file's size and SHA-256."""
        if step is None:
            try:
                latest = self._latest()
            except ObjectNotFoundError:
                raise CheckpointError(f"no checkpoint under {self.prefix!r} yet") from None
            manifest_bytes = self._read(latest["manifest"], None, latest.get("sha256"))
        else:
            manifest_bytes = self._read(self._key(step, "manifest.json"), None, None)
        manifest = _loads(manifest_bytes, "manifest")
        if manifest.get("format") != CHECKPOINT_FORMAT or manifest.get("version") != 1:
            raise CheckpointError(f"unsupported checkpoint format {manifest.get('format')!r}")
        files = manifest["files"]
        tensors = {}
        for name, entry in sorted(files.items()):
            data = self._read(entry["key"], entry["size"], entry["sha256"])
            loaded = st_load(data)
            if sorted(loaded) != sorted(entry["names"]):
                raise CheckpointError(f"{entry['key']!r} holds other tensors than its manifest")
            tensors[name] = {k: loaded[k].to(map_location) for k in entry["names"]}
        optimizer = None
        if manifest.get("optimizer") is not None:
            optimizer = _decode(manifest["optimizer"], tensors.get("optimizer", {}))
        return Checkpoint(
            step=int(manifest["step"]),
            model=tensors.get("model", {}),
            optimizer=optimizer,
            error_feedback=tensors.get("error_feedback"),
            meta=manifest.get("meta", {}),
        )

    def _latest(self) -> dict[str, Any]:
        latest = _loads(self.storage.get(self.latest_key), "latest pointer")
        if not isinstance(latest.get("step"), int) or not isinstance(latest.get("manifest"), str):
            raise CheckpointError("latest pointer is malformed")
        return latest

    def _read(self, key: str, size: int | None, sha256: str | None) -> bytes:
        try:
            data = self.storage.get(key)
        except ObjectNotFoundError:
            raise CheckpointError(f"checkpoint file {key!r} is missing") from None
        if size is not None and len(data) != size:
            raise CheckpointError(f"{key!r} is {len(data)} bytes, manifest says {size}")
        if sha256 is not None and _sha(data) != sha256:
            raise CheckpointError(f"{key!r} does not match its SHA-256 in the manifest")
        return data


def checkpoint_blobs(ck: Checkpoint) -> list[bytes]:
    """``ck`` as byte strings: a JSON head (step, meta, the optimizer's tree, each part's
    tensor names), then each part's safetensors; :func:`checkpoint_from_blobs` reverses it.
    How rank 0 of a multi-process peer hands a checkpoint to its other ranks (nothing is
    pickled)."""
    tree, parts = _parts(ck.model, ck.optimizer, ck.error_feedback)
    head = {
        "step": ck.step,
        "meta": ck.meta,
        "optimizer": tree,
        "parts": {name: list(tensors) for name, tensors in parts.items()},
    }
    return [_dumps(head), *(st_save(_detached(tensors)) for tensors in parts.values())]


def checkpoint_from_blobs(blobs: list[bytes]) -> Checkpoint:
    """The :class:`Checkpoint` of :func:`checkpoint_blobs`' byte strings."""
    head = _loads(blobs[0], "checkpoint head")
    tensors = {}
    for (name, names), data in zip(head["parts"].items(), blobs[1:], strict=True):
        loaded = st_load(data)
        tensors[name] = {k: loaded[k] for k in names}
    optimizer = None
    if head["optimizer"] is not None:
        optimizer = _decode(head["optimizer"], tensors.get("optimizer", {}))
    return Checkpoint(
        step=int(head["step"]),
        model=tensors["model"],
        optimizer=optimizer,
        error_feedback=tensors.get("error_feedback"),
        meta=head["meta"],
    )


def _parts(
    model: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any] | None,
    error_feedback: Mapping[str, torch.Tensor] | None,
) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """The optimizer state's JSON tree (``None`` without one) and the tensors of each file."""
    tree = None
    parts: dict[str, dict[str, torch.Tensor]] = {"model": dict(model)}
    if optimizer is not None:
        opt_tensors: dict[str, torch.Tensor] = {}
        tree = _encode(optimizer, opt_tensors, "optimizer")
        parts["optimizer"] = opt_tensors
    if error_feedback is not None:
        parts["error_feedback"] = dict(error_feedback)
    return tree, parts


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dumps(obj: Any) -> bytes:
    # Key order is kept: a state_dict round-trips with its own order.
    return json.dumps(obj, indent=1, allow_nan=False).encode()


def _loads(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > _MAX_JSON_BYTES:
        raise CheckpointError(f"{what} is larger than {_MAX_JSON_BYTES} bytes")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting
        raise CheckpointError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} is not a JSON object")
    return obj


def _detached(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; those sharing storage (tied weights) are copied apart."""
    out = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{name!r} is a {type(t).__name__}, not a tensor")
        c = t.detach().to("cpu").contiguous()
        ptr = c.untyped_storage().data_ptr()
        if ptr in seen and c.numel():
            c = c.clone()
        seen.add(ptr)
        out[name] = c
    return out


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj
        return {"$tensor": name}
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        pairs = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, bool | int | str)):
                raise CheckpointError(f"{path}: dict key {k!r} of type {type(k).__name__}")
            pairs.append([k, _encode(v, tensors, f"{path}[{k!r}]")])
        return {"$dict": pairs}
    raise CheckpointError(
        f"{path}: cannot store a {type(obj).__name__} without pickling; convert it to "
        "tensors, numbers, strings, lists or dicts"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "$tensor":
            if value not in tensors:
                raise CheckpointError(f"optimizer state refers to missing tensor {value!r}")
            return tensors[value]
        if tag == "$tuple":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "$float":
            return float(value)
        if tag == "$dict":
            return {k: _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in obj.items()}
