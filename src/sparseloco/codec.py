"""The SparseLoCo codec: error feedback, chunked top-k, low-bit values, packed indices.

For one tensor with pseudo-gradient Δ and error-feedback buffer e (REFERENCE §1, steps 3–8):

    e ← β·e + Δ
    I  = per chunk, the k entries of largest |e| (ties to the lower index), ascending
         (``value_coding="ranked"`` with packed indices: rank group by rank group, ascending
         inside each; with Rice-coded ones ascending, each with its group label; a
         group holds ranks of |e| in the chunk, equal magnitudes ranked by ascending index)
    v  = e[I];  (q, table) = quantize(v);  v̂ = table[q]   (ranked: ±table[g(r)·M + m])
    e[I] ← v − v̂          (so e_old·β + Δ = e_new + decode(sent) exactly up to rounding)

The message carries the packed indices (or Rice-coded gaps), the packed codes and the
L-entry table. :func:`encode` works tensor by tensor and mutates the error buffers in place;
:func:`decode` turns a message back into dense tensors. :func:`commit_tensor` makes the same
buffer update from a message already sent (e ← β·e + Δ − decode(sent)), for callers that
encode on a copy of the buffer and change the buffer itself only once the round succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseloco.chunking import ChunkLayout
from sparseloco.config import CodecConfig
from sparseloco.errors import (
    CodecMismatchError,
    CorruptUpdateError,
    NonFiniteError,
    ShapeMismatchError,
    UpdateError,
)
from sparseloco.packing import rice_decode_tail, unpack_codes, unpack_indices
from sparseloco.quantize import (
    rank_bounds,
    rank_label_ones,
    rank_labels,
    ranked_decode,
    ranked_table_size,
)
from sparseloco.serialization import strict_json_loads

FORMAT = "sparseloco.compressed/1"


@dataclass(frozen=True)
class CompressedTensor:
    """One tensor's share of a compressed update.

    Attributes:
        shape: shape of the dense tensor.
        indices: ``uint8`` packed in-chunk indices (``"packed"`` coding) or the Rice
            remainder stream (``"rice"``); empty when every entry is kept.
        gaps: ``uint8`` Rice unary stream (with ``"ranked"``, the rank-group labels after the
            gaps); empty unless ``"rice"`` coding.
        codes: ``uint8`` packed quantization codes, chunk-major, in the indices' order.
        table: decode table of :func:`table_size` entries: 2**value_bits ``float32``
            values, or the rank groups' ``bfloat16`` magnitudes of ``value_coding="ranked"``.
        rice_param: the Rice parameter p (0 for packed coding).
    """

    shape: tuple[int, ...]
    indices: torch.Tensor
    gaps: torch.Tensor
    codes: torch.Tensor
    table: torch.Tensor
    rice_param: int = 0

    @property
    def nbytes(self) -> int:
        """Payload bytes (buffers and table)."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"idx": self.indices, "gap": self.gaps, "code": self.codes, "table": self.table}

    def to(self, device: torch.device | str) -> CompressedTensor:
        return CompressedTensor(
            shape=self.shape,
            indices=self.indices.to(device),
            gaps=self.gaps.to(device),
            codes=self.codes.to(device),
            table=self.table.to(device),
            rice_param=self.rice_param,
        )


@dataclass(frozen=True)
class CompressedUpdate:
    """A whole compressed pseudo-gradient: the codec it was made with and its tensors."""

    codec: CodecConfig
    tensors: dict[str, CompressedTensor] = field(default_factory=dict)

    kind = "sparse"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def num_kept(self) -> int:
        """Number of transmitted (index, value) entries."""
        total = 0
        for t in self.tensors.values():
            layout = ChunkLayout.for_shape(t.shape, self.codec.chunk_size)
            total += layout.num_chunks * layout.k(self.codec.topk)
        return total

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat (tensors, string metadata) for safetensors; see :meth:`from_tensors`."""
        tensors: dict[str, torch.Tensor] = {}
        shapes: dict[str, list[int]] = {}
        rice: dict[str, int] = {}
        for name in sorted(self.tensors):
            ct = self.tensors[name]
            for part, buf in ct.buffers().items():
                tensors[f"{name}::{part}"] = buf.detach().contiguous().cpu()
            shapes[name] = list(ct.shape)
            if ct.rice_param:
                rice[name] = ct.rice_param
        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "codec": json.dumps(self.codec.wire_fields(), sort_keys=True),
            "shapes": json.dumps(shapes, sort_keys=True),
            "rice": json.dumps(rice, sort_keys=True),
        }
        return tensors, meta

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]
    ) -> CompressedUpdate:
        """Rebuild from :meth:`to_tensors` output; checks structure, not contents."""
        if meta.get("format") != FORMAT:
            raise CorruptUpdateError(f"unknown payload format {meta.get('format')!r}")
        try:
            fields = {k: _canonical_meta(meta, k) for k in ("codec", "shapes", "rice")}
            codec = CodecConfig.from_dict(fields["codec"])
            if set(fields["codec"]) != set(codec.wire_fields()):
                raise ValueError("codec metadata holds fields other than the wire fields")
        except (KeyError, TypeError, ValueError, RecursionError) as exc:  # deep nesting too
            raise CorruptUpdateError(f"bad payload metadata: {exc}") from None
        shapes, rice = fields["shapes"], fields["rice"]
        if not isinstance(shapes, dict) or not isinstance(rice, dict):
            raise CorruptUpdateError("bad payload metadata: shapes/rice must be objects")
        if set(rice) - set(shapes) or any(p == 0 for p in rice.values()):
            # the writer lists only the nonzero parameters of its own tensors
            raise CorruptUpdateError("bad payload metadata: rice parameters are not canonical")
        expected = {f"{n}::{p}" for n in shapes for p in ("idx", "gap", "code", "table")}
        if set(tensors) != expected:
            extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
            raise CorruptUpdateError(
                f"payload tensors do not match: extra {extra}, missing {missing}"
            )
        out: dict[str, CompressedTensor] = {}
        for name, shape in shapes.items():
            if not (
                isinstance(shape, list)
                and all(type(s) is int and 0 <= s < 2**40 for s in shape)
                and len(shape) <= 8
            ):
                raise CorruptUpdateError("bad shape in payload metadata", tensor=name)
            p = rice.get(name, 0)
            if type(p) is not int or not 0 <= p <= 16:
                raise CorruptUpdateError(f"bad rice parameter {p!r}", tensor=name)
            out[name] = CompressedTensor(
                shape=tuple(shape),
                indices=tensors[f"{name}::idx"],
                gaps=tensors[f"{name}::gap"],
                codes=tensors[f"{name}::code"],
                table=tensors[f"{name}::table"],
                rice_param=p,
            )
        return cls(codec=codec, tensors=out)

    def check_matches(self, shapes: Mapping[str, tuple[int, ...]], codec: CodecConfig) -> None:
        """Raise unless this update has exactly these tensor names/shapes and this codec."""
        if self.codec.wire_fields() != codec.wire_fields():
            raise CodecMismatchError(
                f"update was encoded with {self.codec.wire_fields()}, receiver expects "
                f"{codec.wire_fields()}"
            )
        check_shapes({n: t.shape for n, t in self.tensors.items()}, shapes)


def check_shapes(
    got: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """Raise :class:`ShapeMismatchError` unless ``got`` has exactly ``expected``'s names and
    shapes."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise ShapeMismatchError(f"tensor names differ: missing {missing}, extra {extra}")
    for name, shape in expected.items():
        if tuple(got[name]) != tuple(shape):
            raise ShapeMismatchError(
                f"shape {tuple(got[name])} != expected {tuple(shape)}", tensor=name
            )


class ErrorFeedback:
    """The error-feedback buffers e, one per tensor name, in chunked layout.

    Buffers are created as zeros on first use with the requested device and dtype
    (float32 by default; bfloat16 halves the memory at the cost of rounding the residual).
    """

    def __init__(self, config: CodecConfig) -> None:
        self.config = config
        self.buffers: dict[str, torch.Tensor] = {}

    def buffer(
        self,
        name: str,
        shape: tuple[int, ...] | torch.Size,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pin_memory: bool = False,
    ) -> torch.Tensor:
        layout = ChunkLayout.for_shape(shape, self.config.chunk_size)
        buf = self.buffers.get(name)
        if buf is None:
            buf = torch.zeros(layout.buffer_shape, device=device, dtype=dtype)
            if pin_memory:
                buf = buf.pin_memory()
            self.buffers[name] = buf
        elif tuple(buf.shape) != layout.buffer_shape:
            raise ShapeMismatchError(
                f"error buffer has shape {tuple(buf.shape)}, expected {layout.buffer_shape}",
                tensor=name,
            )
        return buf

    def dense(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The buffer of ``name`` in the tensor's own shape (a copy)."""
        layout = ChunkLayout.for_shape(shape, self.config.chunk_size)
        return layout.from_chunks(self.buffers[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.buffers)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, value in state.items():
            if name in self.buffers:
                if self.buffers[name].shape != value.shape:
                    raise ShapeMismatchError(
                        f"error buffer shape {tuple(value.shape)} != "
                        f"{tuple(self.buffers[name].shape)}",
                        tensor=name,
                    )
                self.buffers[name].copy_(value)
            else:
                self.buffers[name] = value.clone()


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` if ``tensor`` has NaN or Inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError("contains NaN or Inf", tensor=name)


def encode_tensor(
    name: str,
    delta: torch.Tensor,
    error: torch.Tensor,
    config: CodecConfig,
) -> CompressedTensor:
    """Encode one pseudo-gradient ``delta``, updating its chunked error buffer in place.

    Raises :class:`NonFiniteError` or :class:`ShapeMismatchError` before touching ``error``.
    """
    from sparseloco.kernels import compress

    check_finite(name, delta)
    return compress(delta, error, _buffer_layout(name, delta, error, config), config)


def commit_tensor(
    name: str,
    delta: torch.Tensor,
    error: torch.Tensor,
    sent: CompressedTensor,
    config: CodecConfig,
) -> None:
    """e ← β·e + Δ − D(sent) in place: error feedback with the decoding of a sent message.

    ``sent`` is the message :func:`encode_tensor` made from the same ``delta`` and buffer;
    the buffer then comes out bit-identical to the one ``encode_tensor`` leaves, and the
    residual matches ``sent`` by construction, whatever backend encoded it (decoded by
    :func:`decode_sparse`, as every receiver decodes it). Raises like :func:`encode_tensor`
    on a wrong shape or device, before touching ``error``; Δ is not checked for NaN/Inf (the
    encoder did).
    """
    from sparseloco.kernels.reference import subtract_decoded

    layout = _buffer_layout(name, delta, error, config)
    if tuple(sent.shape) != layout.shape:
        raise ShapeMismatchError(
            f"message has shape {tuple(sent.shape)}, expected {layout.shape}", tensor=name
        )
    _, idx, values = decode_sparse(name, sent.to(error.device), config)
    subtract_decoded(delta, error, layout, config, idx, values)


def _buffer_layout(
    name: str, delta: torch.Tensor, error: torch.Tensor, config: CodecConfig
) -> ChunkLayout:
    """``delta``'s chunk layout, once ``error`` is checked to be its buffer (shape, device)."""
    layout = ChunkLayout.for_shape(delta.shape, config.chunk_size)
    if tuple(error.shape) != layout.buffer_shape:
        raise ShapeMismatchError(
            f"error buffer has shape {tuple(error.shape)}, expected {layout.buffer_shape} "
            f"for a tensor of shape {tuple(delta.shape)}",
            tensor=name,
        )
    if error.device != delta.device:
        raise UpdateError(
            f"error buffer on {error.device} but delta on {delta.device}", tensor=name
        )
    return layout


def encode(
    deltas: Mapping[str, torch.Tensor],
    error_feedback: ErrorFeedback,
    config: CodecConfig | None = None,
) -> CompressedUpdate:
    """Encode named pseudo-gradients; every input is checked before any buffer changes."""
    config = config or error_feedback.config
    if config.wire_fields() != error_feedback.config.wire_fields():
        raise CodecMismatchError("codec config differs from the error feedback's config")
    for name in sorted(deltas):
        check_finite(name, deltas[name])
    buffers = {
        name: error_feedback.buffer(name, deltas[name].shape, device=deltas[name].device)
        for name in sorted(deltas)
    }
    return CompressedUpdate(
        codec=config,
        tensors={
            name: encode_tensor(name, deltas[name], buffers[name], config) for name in buffers
        },
    )


def table_size(codec: CodecConfig, layout: ChunkLayout) -> int:
    """Entries of a tensor's decode table: 2**value_bits, or G·M for ``"ranked"``."""
    if codec.value_coding == "ranked":
        dense = layout.is_dense(codec.topk)
        return ranked_table_size(layout.k(codec.topk), codec.value_bits, dense)
    return codec.levels


def check_table(table: torch.Tensor, codec: CodecConfig, layout: ChunkLayout) -> None:
    """Raise :class:`CorruptUpdateError` unless ``table`` is a finite decode table of the
    right dtype and size (ranked: bfloat16 magnitudes, so ≥ 0: the sign is the code's)."""
    size = table_size(codec, layout)
    dtype = torch.bfloat16 if codec.value_coding == "ranked" else torch.float32
    if table.dtype != dtype or tuple(table.shape) != (size,):
        raise CorruptUpdateError(
            f"table must be {str(dtype).removeprefix('torch.')} of shape ({size},), got "
            f"{table.dtype} {tuple(table.shape)}"
        )
    if not bool(torch.isfinite(table).all()):
        raise CorruptUpdateError("table contains NaN or Inf")
    if codec.value_coding == "ranked" and bool(torch.signbit(table).any()):
        # −0.0 too: the sign is the code's, and one update has one encoding
        raise CorruptUpdateError("ranked table holds a negative magnitude")


def decode_values(
    codes: torch.Tensor,
    table: torch.Tensor,
    codec: CodecConfig,
    layout: ChunkLayout,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 values ``(num_chunks, k)`` of unpacked int64 ``codes`` in message order
    (``"ranked"``: each entry's rank group from its position, or ``groups`` when given)."""
    codes = codes.view(layout.num_chunks, layout.k(codec.topk))
    if codec.value_coding == "ranked":
        dense = layout.is_dense(codec.topk)
        groups = None if groups is None else groups.to(codes.device)
        return ranked_decode(codes, table, codec.value_bits, dense, groups)
    return table[codes]


def decode_sparse(
    name: str, ct: CompressedTensor, codec: CodecConfig
) -> tuple[ChunkLayout, torch.Tensor | None, torch.Tensor]:
    """Validate and unpack one tensor: (layout, in-chunk indices or None if dense, values).

    Indices and values have shape ``(num_chunks, k)``; indices are int64, values float32.
    Raises :class:`CorruptUpdateError` naming the tensor on any inconsistency.
    """
    layout = ChunkLayout.for_shape(ct.shape, codec.chunk_size)
    k, n_chunks = layout.k(codec.topk), layout.num_chunks
    count = n_chunks * k
    try:
        check_table(ct.table, codec, layout)
        codes = unpack_codes(ct.codes, codec.value_bits, count).view(n_chunks, k)
        groups = None
        if layout.is_dense(codec.topk):
            if ct.indices.numel() or ct.gaps.numel():
                raise CorruptUpdateError("dense tensor must not carry indices")
            return layout, None, decode_values(codes, ct.table, codec, layout)
        if codec.index_coding == "packed":
            idx = _packed_indices(ct, codec, layout)
        else:
            idx, groups = _rice_indices(ct, codec, layout)
        idx = idx.to(codes.device)
        return layout, idx, decode_values(codes, ct.table, codec, layout, groups)
    except CorruptUpdateError as exc:
        if exc.tensor is None:
            raise CorruptUpdateError(str(exc), tensor=name) from None
        raise


def _packed_indices(ct: CompressedTensor, codec: CodecConfig, layout: ChunkLayout) -> torch.Tensor:
    """The checked in-chunk indices ``(num_chunks, k)`` of fixed-width packed coding."""
    if ct.gaps.numel():
        raise CorruptUpdateError("packed index coding must not carry a gap stream")
    k, n_chunks = layout.k(codec.topk), layout.num_chunks
    idx = unpack_indices(ct.indices, codec.index_bits, n_chunks * k).view(n_chunks, k)
    if idx.numel() and int(idx.max()) >= layout.chunk_numel:
        raise CorruptUpdateError(
            f"index {int(idx.max())} out of range for chunks of {layout.chunk_numel}"
        )
    check_index_order(idx, codec)
    return idx


def _rice_indices(
    ct: CompressedTensor, codec: CodecConfig, layout: ChunkLayout
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The checked in-chunk indices ``(num_chunks, k)`` of Rice coding, and with
    ``"ranked"`` (more than one rank group) each entry's rank group from the label tail."""
    p = ct.rice_param
    if not 0 <= p <= codec.index_bits:
        raise CorruptUpdateError(f"rice parameter {p} out of range")
    k, n_chunks = layout.k(codec.topk), layout.num_chunks
    count = n_chunks * k
    labelled = codec.value_coding == "ranked" and len(rank_bounds(k)) > 2
    tail = count if labelled else 0
    # No valid stream is longer (a chunk's gaps add up to at most chunk_numel − k, each code
    # ends in a zero), so a longer one is refused before its bits are unpacked.
    ones = n_chunks * (((layout.chunk_numel - k) >> p) + (rank_label_ones(k) if labelled else 0))
    gaps, labels = rice_decode_tail(
        ct.gaps.cpu(), ct.indices.cpu(), p, count, tail, max_bits=ones + count + tail
    )
    idx = (gaps.view(n_chunks, k) + 1).cumsum(dim=1) - 1
    if count and int(idx[:, -1].max()) >= layout.chunk_numel:
        raise CorruptUpdateError(
            f"index {int(idx[:, -1].max())} out of range for chunks of {layout.chunk_numel}"
        )
    return idx, _label_groups(labels.view(n_chunks, k)) if labelled else None


def _label_groups(labels: torch.Tensor) -> torch.Tensor:
    """Each entry's rank group g = G − 1 − u from its label u ``(chunks, k)``; raises unless
    every chunk holds exactly the groups' sizes (1, 2, 4, … entries), as ranks would."""
    k = labels.shape[1]
    bounds = rank_bounds(k)
    if labels.numel() and int(labels.max()) > len(bounds) - 2:
        raise CorruptUpdateError(f"rank group label {int(labels.max())} out of range")
    groups = rank_labels(labels, k)
    counts = torch.zeros(labels.shape[0], len(bounds) - 1, dtype=torch.int64)
    counts.scatter_add_(1, groups, torch.ones_like(groups))
    if not bool((counts == torch.tensor(bounds).diff()).all()):
        raise CorruptUpdateError("rank groups do not hold their ranks' counts in a chunk")
    return groups


def check_index_order(idx: torch.Tensor, codec: CodecConfig) -> None:
    """Raise unless each chunk's indices ``(num_chunks, k)`` ascend strictly (ranked: ascend
    strictly inside each rank group and are distinct across them)."""
    k = idx.shape[1]
    if k < 2:
        return
    steps = idx[:, 1:] > idx[:, :-1]
    if codec.value_coding == "ranked":
        steps[:, [b - 1 for b in rank_bounds(k)[1:-1]]] = True  # a group starts: no order
        if not bool(steps.all()):
            raise CorruptUpdateError("indices are not strictly ascending within a rank group")
        if not bool((idx.sort(dim=1).values.diff(dim=1) > 0).all()):
            raise CorruptUpdateError("indices repeat within a chunk")
    elif not bool(steps.all()):
        raise CorruptUpdateError("indices are not strictly ascending within a chunk")


def decode_tensor(
    name: str, ct: CompressedTensor, codec: CodecConfig, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dense tensor of ``ct.shape`` holding the decoded values (zeros elsewhere)."""
    layout, idx, values = decode_sparse(name, ct, codec)
    if idx is None:
        return layout.from_chunks(values).to(dtype)
    out = torch.zeros(layout.numel, dtype=dtype, device=values.device)
    out[layout.flat_positions(idx).reshape(-1)] = values.reshape(-1).to(dtype)
    return out.view(layout.shape)


def decode(update: CompressedUpdate, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of ``update`` as dense tensors."""
    return {
        name: decode_tensor(name, ct, update.codec, dtype)
        for name, ct in sorted(update.tensors.items())
    }


def iter_sparse(
    update: CompressedUpdate, names: Iterable[str] | None = None
) -> Iterator[tuple[str, ChunkLayout, torch.Tensor | None, torch.Tensor]]:
    """(name, layout, indices, values) for each tensor, in sorted name order."""
    for name in sorted(update.tensors if names is None else names):
        yield (name, *decode_sparse(name, update.tensors[name], update.codec))


def _canonical_meta(meta: Mapping[str, str], key: str) -> Any:
    """Parse one JSON metadata field, which must be exactly as :meth:`to_tensors` writes it
    (so one payload has one encoding and no lax-parsing ambiguity reaches the decoder)."""
    value = strict_json_loads(meta[key])
    if json.dumps(value, sort_keys=True) != meta[key]:
        raise ValueError(f"{key} metadata is not in canonical form")
    return value
