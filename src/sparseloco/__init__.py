"""sparseloco: the SparseLoCo outer optimizer, its codec and aggregation, and baselines.

Quick use::

    from sparseloco import SparseLoCo, OuterLoop, InProcessHub

    exchange = InProcessHub(["peer-0", "peer-1"]).connect("peer-0")   # or netcomm's exchange
    outer = SparseLoCo(model.named_parameters(), exchange, "covenant-72b")
    with OuterLoop(inner_optimizer, outer, on_round=print):
        ...  # the usual loop: loss.backward(); inner_optimizer.step()
"""

from sparseloco.aggregate import aggregate, iter_aggregate, iter_aggregate_dense
from sparseloco.chunking import ChunkLayout
from sparseloco.codec import (
    CompressedTensor,
    CompressedUpdate,
    ErrorFeedback,
    decode,
    decode_sparse,
    decode_tensor,
    encode,
    encode_tensor,
)
from sparseloco.config import PRESETS, CodecConfig, OuterConfig, OverlapConfig, preset
from sparseloco.errors import (
    BackendUnavailableError,
    BackgroundRoundError,
    CodecMismatchError,
    ConfigError,
    CorruptUpdateError,
    ExchangeError,
    NonFiniteError,
    RankError,
    ShapeMismatchError,
    SparseLoCoError,
    UnknownPresetError,
    UpdateError,
)
from sparseloco.exchange import (
    DistributedExchange,
    Exchange,
    GatherResult,
    InProcessExchange,
    InProcessHub,
    PeerStatus,
)
from sparseloco.lockstep import Lockstep
from sparseloco.loop import OuterLoop, apply_due, skipped_by_grad_scaler
from sparseloco.names import canonical_name
from sparseloco.optim import (
    DataParallel,
    DiLoCo,
    OuterOptimizer,
    RoundReport,
    SparseLoCo,
)
from sparseloco.payload import DenseUpdate, Payload, payload_from_tensors, validate_payload
from sparseloco.ranks import RankZeroExchange, leave_rank

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BackendUnavailableError",
    "BackgroundRoundError",
    "ChunkLayout",
    "CodecConfig",
    "CodecMismatchError",
    "CompressedTensor",
    "CompressedUpdate",
    "ConfigError",
    "CorruptUpdateError",
    "DataParallel",
    "DenseUpdate",
    "DiLoCo",
    "DistributedExchange",
    "ErrorFeedback",
    "Exchange",
    "ExchangeError",
    "GatherResult",
    "InProcessExchange",
    "InProcessHub",
    "Lockstep",
    "NonFiniteError",
    "OuterConfig",
    "OuterLoop",
    "OuterOptimizer",
    "OverlapConfig",
    "Payload",
    "PeerStatus",
    "RankError",
    "RankZeroExchange",
    "RoundReport",
    "ShapeMismatchError",
    "SparseLoCo",
    "SparseLoCoError",
    "UnknownPresetError",
    "UpdateError",
    "aggregate",
    "apply_due",
    "canonical_name",
    "decode",
    "decode_sparse",
    "decode_tensor",
    "encode",
    "encode_tensor",
    "iter_aggregate",
    "iter_aggregate_dense",
    "leave_rank",
    "payload_from_tensors",
    "preset",
    "skipped_by_grad_scaler",
    "validate_payload",
]
