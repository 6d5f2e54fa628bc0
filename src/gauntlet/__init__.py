"""gauntlet: contribution scoring, ratings, weights and the chain interface.

A validator's window, in a few lines::

    from gauntlet import Scorer, WindowInputs, GauntletConfig

    scorer = Scorer(model, loss_fn, batches_for, seed="run-1", config=GauntletConfig())
    report = scorer.score_window(WindowInputs(window, gather, eval_seed, digests, sync_values))
    cw = scorer.scoreboard.chain_weights(chain.metagraph(), chain.weight_limits())
    chain.set_weights(cw.uids, cw.values)

Formulas and defaults: ``docs/gauntlet.md``.
"""

from gauntlet.assignment import (
    assign_samples,
    cross_partners,
    data_digest,
    derive_seed,
    draw_ids,
    eval_assigned_samples,
    random_samples,
)
from gauntlet.bittensor_chain import BittensorChain
from gauntlet.chain import (
    MAX_COMMITMENT_BYTES,
    Chain,
    InMemoryChain,
    InMemorySubnet,
    Metagraph,
    SetWeightsResult,
    WeightLimits,
)
from gauntlet.clipping import (
    accepted_reference,
    reference_factors,
    update_norms,
    window_reference,
)
from gauntlet.config import (
    AssignmentConfig,
    EvalConfig,
    GauntletConfig,
    RatingConfig,
    SignalConfig,
    WeightsConfig,
)
from gauntlet.decoding import DecodedUpdate, InvalidUpdate, content_digest, decode_update
from gauntlet.errors import (
    ChainError,
    GauntletConfigError,
    GauntletError,
    UnsupportedSDKError,
    WeightsError,
)
from gauntlet.evaluate import (
    Baseline,
    EvalResult,
    Evaluator,
    LossFn,
    assigned_indicator,
    cross_indicators,
    mean_loss,
    relative_gain,
)
from gauntlet.ratings import ordinal, rate_match, rating_factor
from gauntlet.scoreboard import PeerRecord, Scoreboard
from gauntlet.scorer import (
    PeerOutcome,
    Scorer,
    WindowInputs,
    WindowReport,
    is_void,
)
from gauntlet.signals import (
    CopyVerdict,
    PairSimilarity,
    SyncResult,
    blame_copies,
    effective_bma,
    index_overlap,
    pair_similarities,
    sample_values,
    sync_positions,
    sync_score,
    update_bma,
)
from gauntlet.sketches import sketch_cosine, update_sketch
from gauntlet.sqlite_chain import SqliteChain, SqliteSubnet
from gauntlet.weights import (
    U16_MAX,
    ChainWeights,
    cap_weights,
    normalize_scores,
    rank_profile,
    to_u16,
)
from gauntlet.yuma import YumaResult, yuma_consensus

__all__ = [
    "MAX_COMMITMENT_BYTES",
    "U16_MAX",
    "AssignmentConfig",
    "Baseline",
    "BittensorChain",
    "Chain",
    "ChainError",
    "ChainWeights",
    "CopyVerdict",
    "DecodedUpdate",
    "EvalConfig",
    "EvalResult",
    "Evaluator",
    "GauntletConfig",
    "GauntletConfigError",
    "GauntletError",
    "InMemoryChain",
    "InMemorySubnet",
    "InvalidUpdate",
    "LossFn",
    "Metagraph",
    "PairSimilarity",
    "PeerOutcome",
    "PeerRecord",
    "RatingConfig",
    "Scoreboard",
    "Scorer",
    "SetWeightsResult",
    "SignalConfig",
    "SqliteChain",
    "SqliteSubnet",
    "SyncResult",
    "UnsupportedSDKError",
    "WeightLimits",
    "WeightsConfig",
    "WeightsError",
    "WindowInputs",
    "WindowReport",
    "YumaResult",
    "accepted_reference",
    "assign_samples",
    "assigned_indicator",
    "blame_copies",
    "cap_weights",
    "content_digest",
    "cross_indicators",
    "cross_partners",
    "data_digest",
    "decode_update",
    "derive_seed",
    "draw_ids",
    "effective_bma",
    "eval_assigned_samples",
    "index_overlap",
    "is_void",
    "mean_loss",
    "normalize_scores",
    "ordinal",
    "pair_similarities",
    "random_samples",
    "rank_profile",
    "rate_match",
    "rating_factor",
    "reference_factors",
    "relative_gain",
    "sample_values",
    "sketch_cosine",
    "sync_positions",
    "sync_score",
    "to_u16",
    "update_bma",
    "update_norms",
    "update_sketch",
    "window_reference",
    "yuma_consensus",
]
