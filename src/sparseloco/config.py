"""Typed configurations and named presets for the codec and the outer optimizers.

Presets (see ``../shared/REFERENCE.md`` §1):

* ``"covenant-72b"``: Templar's Covenant-72B run: 64×64 chunks, k=64 (1.5625 %), 2-bit
  values, error-feedback decay β=0.95, outer SGD α=1.0 with no momentum, H=30 inner steps,
  "mean over the peers that selected a coordinate" with median-norm clipping.
* ``"sparseloco-512m"``: the SparseLoCo paper's 512M setting: k=128 of 4096, H=15, the
  paper's plain mean over R peers.
* ``"covenant-72b-rice"``: Covenant's settings with sorted, Rice-coded index gaps instead of
  fixed 12-bit indices (same selection and values, fewer bits on the wire).
* ``"covenant-72b-signmag"``: Covenant's settings with 2-bit sign + magnitude codes: the
  sign, and |v| above or below a per-tensor, per-sign threshold placed where the squared
  error of the two bin means is smallest (the Lloyd–Max optimum for one magnitude bit; see
  :mod:`sparseloco.quantize`).
* ``"covenant-72b-ranked"``: Covenant's settings with 2-bit rank-group codes: each chunk's
  entries are sent group by group of their ranks by |v| ({0}, {1, 2}, {3…6}, …) and the
  sign + magnitude bit is decoded with the group's own magnitude centroids, so the 12-bit
  indices carry the group for free
  (:mod:`sparseloco.quantize`).
* ``"covenant-72b-ranked-rice"``: the same update with Rice-coded index gaps and each entry's
  rank group (1.9 bits) instead of the order: identical decoded values in fewer bytes, at the
  cost of Rice's slower decoding and validation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from sparseloco.errors import ConfigError, UnknownPresetError

IndexCoding = Literal["packed", "rice"]
Reducer = Literal["mean_selected", "mean"]
Backend = Literal["auto", "torch", "triton"]
ValueCoding = Literal["uniform", "signmag", "ranked"]

_VALUE_BITS = {"uniform": (2, 4, 8), "signmag": (1, 2, 4), "ranked": (1, 2, 4)}
_INDEX_CODINGS = ("packed", "rice")
_REDUCERS = ("mean_selected", "mean")
_BACKENDS = ("auto", "torch", "triton")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CodecConfig:
    """How a pseudo-gradient is compressed.

    Args:
        chunk_size: side S of the square chunks a 2-D tensor is cut into (S×S entries; a
            dimension not divisible by S uses its largest divisor ≤ S). 1-D tensors are cut
            into rows of S the same way. At most 256 so that an index fits in 16 bits.
        topk: entries kept per full chunk, by largest magnitude; a smaller chunk keeps
            ``min(topk, chunk entries)``. Must not exceed S².
        value_bits: bits per kept value (2^bits quantization bins): 2, 4 or 8 for
            ``"uniform"``, 1, 2 or 4 for ``"signmag"`` and ``"ranked"``.
        value_coding: ``"uniform"`` (Templar's bins 6σ/2^bits wide around the mean),
            ``"signmag"`` (a sign bit plus value_bits−1 bits of |v| in Lloyd–Max bins fitted
            per tensor and sign) or ``"ranked"`` (each chunk's entries sent group by group
            of their ranks by |v|, with the same sign + Lloyd–Max magnitude bits fitted per
            group;
            with Rice-coded indices each entry's rank group is sent instead of the order).
            See :mod:`sparseloco.quantize`. The codings
            other than ``"uniform"`` run on the torch reference (the Triton compress kernel
            implements only ``"uniform"``); decode + aggregate takes any.
        index_coding: ``"packed"`` stores each in-chunk index in a fixed ⌈log2 S²⌉-bit field
            (12 bits for S=64, two per three bytes); ``"rice"`` stores the gaps between sorted
            indices with a Rice code whose parameter is chosen per tensor.
        error_decay: β of the error-feedback update e ← β·e + Δ.
        backend: ``"torch"`` (reference, any device), ``"triton"`` (CUDA kernels; raises if
            they cannot run) or ``"auto"`` (Triton on CUDA tensors when importable).
    """

    chunk_size: int = 64
    topk: int = 64
    value_bits: int = 2
    index_coding: IndexCoding = "packed"
    error_decay: float = 0.95
    backend: Backend = "auto"
    value_coding: ValueCoding = "uniform"

    def __post_init__(self) -> None:
        # Exact types, since a codec also arrives from other peers' bytes: 2.0 == 2 and
        # True == 1 would pass the range checks below and fail later as a TypeError.
        for name in ("chunk_size", "topk", "value_bits"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not isinstance(self.error_decay, int | float) or isinstance(self.error_decay, bool):
            raise ConfigError(f"error_decay must be a number, got {self.error_decay!r}")
        for name in ("index_coding", "backend"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not 1 <= self.chunk_size <= 256:
            raise ConfigError(f"chunk_size must be an integer in [1, 256], got {self.chunk_size!r}")
        if self.topk < 1:
            raise ConfigError(f"topk must be a positive integer, got {self.topk!r}")
        if self.topk > self.chunk_size**2:
            raise ConfigError(
                f"topk={self.topk} is larger than a chunk of {self.chunk_size}x{self.chunk_size}"
                f"={self.chunk_size**2} entries; lower topk or raise chunk_size"
            )
        if type(self.value_coding) is not str or self.value_coding not in _VALUE_BITS:
            raise ConfigError(
                f"value_coding must be one of {tuple(_VALUE_BITS)}, got {self.value_coding!r}"
            )
        allowed = _VALUE_BITS[self.value_coding]
        # type() rather than isinstance: True and 2.0 compare equal to allowed widths.
        if type(self.value_bits) is not int or self.value_bits not in allowed:
            raise ConfigError(
                f"value_bits must be one of {allowed} for value_coding={self.value_coding!r}, "
                f"got {self.value_bits!r}"
            )
        if self.index_coding not in _INDEX_CODINGS:
            raise ConfigError(
                f"index_coding must be one of {_INDEX_CODINGS}, got {self.index_coding!r}"
            )
        if not 0.0 <= self.error_decay <= 1.0:
            raise ConfigError(f"error_decay must lie in [0, 1], got {self.error_decay!r}")
        if self.backend not in _BACKENDS:
            raise ConfigError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")

    @property
    def index_bits(self) -> int:
        """Width of one packed in-chunk index: 12 for chunks up to 4096 entries, else 16."""
        return 12 if self.chunk_size**2 <= 4096 else 16

    @property
    def levels(self) -> int:
        """Number of quantization bins, 2**value_bits."""
        return 1 << self.value_bits

    @property
    def density(self) -> float:
        """Fraction of a full chunk that is kept."""
        return self.topk / self.chunk_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown CodecConfig fields: {sorted(unknown)}")
        return cls(**data)

    def wire_fields(self) -> dict[str, Any]:
        """The fields a decoder must agree on (the backend is a local choice).

        ``value_coding`` is left out while it is ``"uniform"`` so that uniform payloads stay
        byte-identical to those of earlier versions (which did not know the field).
        """
        fields = {k: v for k, v in self.to_dict().items() if k != "backend"}
        if fields["value_coding"] == "uniform":
            del fields["value_coding"]
        return fields

    @classmethod
    def from_preset(cls, name: str) -> CodecConfig:
        return preset(name).codec


@dataclass(frozen=True)
class OuterConfig:
    """Everything one outer round of SparseLoCo needs besides the model and the exchange.

    Args:
        codec: the compression of pseudo-gradients.
        lr: outer learning rate α of θ ← θ₀ − α·agg (param groups may override it).
        momentum: outer momentum μ (0 = plain SGD, SparseLoCo's choice: error feedback stands
            in for momentum).
        nesterov: Nesterov form of the outer momentum (needs momentum > 0).
        inner_steps: H, inner optimizer steps between outer rounds (used by the hook).
        reducer: ``"mean_selected"`` averages each coordinate over the peers that selected it
            (Templar's code); ``"mean"`` divides the sum by the number of peers R (paper text).
        clip_to_median: scale each peer's decoded tensor to at most the median norm over peers.
        error_dtype: dtype of the error-feedback buffer, ``"float32"`` or ``"bfloat16"``.
        offload: keep θ₀ and the error buffer in (pinned when CUDA is present) CPU memory.
    """

    codec: CodecConfig = field(default_factory=CodecConfig)
    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    inner_steps: int = 30
    reducer: Reducer = "mean_selected"
    clip_to_median: bool = True
    error_dtype: Literal["float32", "bfloat16"] = "float32"
    offload: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.codec, CodecConfig):
            raise ConfigError(f"codec must be a CodecConfig, got {type(self.codec).__name__}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError("nesterov=True needs momentum > 0")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ConfigError(f"inner_steps must be a positive integer, got {self.inner_steps!r}")
        if self.reducer not in _REDUCERS:
            raise ConfigError(f"reducer must be one of {_REDUCERS}, got {self.reducer!r}")
        if self.error_dtype not in ("float32", "bfloat16"):
            raise ConfigError(
                f"error_dtype must be 'float32' or 'bfloat16', got {self.error_dtype!r}"
            )

    def replace(self, **changes: Any) -> OuterConfig:
        """A copy with some fields changed; ``codec`` may be given as a dict of its changes."""
        codec = changes.pop("codec", None)
        if isinstance(codec, dict):
            changes["codec"] = replace(self.codec, **codec)
        elif codec is not None:
            changes["codec"] = codec
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OverlapConfig:
    """Where an overlapped peer starts each window (``overlap=`` of the outer optimizers;
    ``True`` means these defaults for SparseLoCo, :meth:`local` for DiLoCo).

    At the boundary after window k the global model Θ_k = OuterStep(Θ_{k−1}, g_{k−1}) is
    known (applied there, or by a ``finish()`` during window k), but Θ_{k+1} =
    OuterStep(Θ_k, g_k), which blocking rounds would start window k+1 from, is not: g_k is
    still being gathered. The local model starts window k+1 from a prediction of it::

        θ ← s_{k+1} = Θ_k + a·(Θ_k − Θ_{k−1}) − v·α·D(m_k) − w·Δ_k

    a (``extrapolation``) moves it along the global model's last step, a look-ahead for the
    other peers' part of g_k. v (``message_weight``) takes that share of the step this
    peer's own message m_k (encoded at the boundary, with error feedback) would make were it
    the only one: D(m_k) is g_k with this peer alone (its decoded values, zero elsewhere), α
    the ``lr`` of the parameter's group (read even where an ``outer_optimizer`` takes the
    step, which ignores it otherwise); under ``mean_selected`` it is g_k on the coordinates
    no other peer selected, up to the median-norm clipping (``clip_to_median``). w
    (``own_weight``) adds that share of this peer's dense fresh progress Δ_k, most of which
    the message leaves in the error buffer for later rounds. The rest of g_k cannot be
    predicted coordinate by coordinate (each peer's top-k picks other coordinates); what a,
    v and w set is how far ahead, and along what, the next window starts. g_k is applied to
    Θ alone (at the next boundary, which starts window k+2 the same way, or by a
    ``finish()`` τ steps in, which keeps the progress since s_{k+1} on top of Θ_{k+1}), so
    every peer's Θ stays the same whatever a, v and w.

    The defaults were chosen by a sweep (``benchmarks/overlap_rule.py``) on
    ``benchmarks/utilisation.py``'s model with 2 peers, 60 rounds and seeds 0 and 1 (other
    seeds and 4 peers out of sample; README, "Communication and utilisation"). With v > 0
    the boundary encodes the message itself (the background round does with v = 0), which
    costs time there, unless it is stepped with ``defer_message=True``
    (``OuterLoop(..., defer_message=True)``): the background round then encodes it too
    and the message's step is added after the window's first inner step. a = 0,
    v = 0, w = 1 (``OverlapConfig.local()``) continues from the own progress alone, the
    rule of earlier versions (and :class:`~sparseloco.optim.DiLoCo`'s default): exact for
    one peer with dense updates, but with 2 peers and Covenant's codec it ends several per
    cent above blocking rounds' held-out loss.
    """

    extrapolation: float = 0.75
    own_weight: float = 0.5
    message_weight: float = 0.75

    def __post_init__(self) -> None:
        for name in ("extrapolation", "own_weight", "message_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value!r}")

    @classmethod
    def local(cls) -> OverlapConfig:
        """a = 0, v = 0, w = 1: start from the own progress only (the rule of earlier
        versions)."""
        return cls(extrapolation=0.0, own_weight=1.0, message_weight=0.0)


_COVENANT = OuterConfig(
    codec=CodecConfig(chunk_size=64, topk=64, value_bits=2, error_decay=0.95),
    lr=1.0,
    inner_steps=30,
    reducer="mean_selected",
    clip_to_median=True,
)

PRESETS: dict[str, OuterConfig] = {
    "covenant-72b": _COVENANT,
    # Covenant's settings with another index or value coding (the module docstring).
    "covenant-72b-rice": _COVENANT.replace(codec={"index_coding": "rice"}),
    "covenant-72b-signmag": _COVENANT.replace(codec={"value_coding": "signmag"}),
    "covenant-72b-ranked": _COVENANT.replace(codec={"value_coding": "ranked"}),
    "covenant-72b-ranked-rice": _COVENANT.replace(
        codec={"value_coding": "ranked", "index_coding": "rice"}
    ),
    "sparseloco-512m": OuterConfig(
        codec=CodecConfig(chunk_size=64, topk=128, value_bits=2, error_decay=0.95),
        lr=1.0,
        inner_steps=15,
        reducer="mean",
        clip_to_median=True,
    ),
}


def preset(name: str) -> OuterConfig:
    """The named :class:`OuterConfig`; raises :class:`UnknownPresetError` listing the names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
