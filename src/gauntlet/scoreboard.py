"""All per-peer scoring state, its final score, its weights, and a pickle-free state dict.

Per peer (keyed by hotkey): the OpenSkill (μ, σ), the assigned-data BMA, the last sync
factor, counts of evaluations and failures by kind, and the last window's numbers. The final
score is

    score = rating_factor(μ, σ) × BMA_eff × sync

with ``rating_factor`` from :mod:`gauntlet.ratings` and ``BMA_eff`` from
:func:`gauntlet.signals.effective_bma`. Beside the peers it keeps the window-level state the
next windows need: the sync reference, the clip reference (:mod:`gauntlet.clipping`) and the
content digests of recent updates and aggregates (:meth:`Scoreboard.remember`) and their
sketches (:meth:`Scoreboard.remember_sketches`).
``state_dict()`` holds only JSON values (floats round-trip exactly through ``json``), so a
restarted validator loses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gauntlet.chain import Metagraph, WeightLimits
from gauntlet.config import GauntletConfig
from gauntlet.errors import GauntletError
from gauntlet.ratings import rating_factor
from gauntlet.signals import effective_bma
from gauntlet.weights import ChainWeights, normalize_scores, to_u16

STATE_VERSION = 1


@dataclass
class PeerRecord:
    """One peer's scoring state (plain values only)."""

    mu: float
    sigma: float
    bma: float = 0.0
    sync: float = 1.0
    evaluations: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    last_window: int = -1
    last_evaluated: int = -1
    last_status: str = ""
    last_gain_random: float | None = None
    last_gain_assigned: float | None = None


class Scoreboard:
    """Per-peer state plus the sync reference; see the module docstring for the score."""

    def __init__(self, config: GauntletConfig | None = None) -> None:
        self.config = config or GauntletConfig()
        self.peers: dict[str, PeerRecord] = {}
        self.typical_change: float | None = None
        self.sync_reference: dict[str, Any] | None = None
        self.clip_reference: dict[str, float] | None = None
        self.digests: dict[str, list[Any]] = {}
        self.sketches: list[list[Any]] = []

    def record(self, peer: str) -> PeerRecord:
        """The peer's record, created fresh on first sight."""
        rec = self.peers.get(peer)
        if rec is None:
            rc = self.config.rating
            rec = self.peers[peer] = PeerRecord(mu=rc.mu, sigma=rc.sigma)
        return rec

    def prune(self, keep: set[str] | list[str]) -> list[str]:
        """Forget peers not in ``keep`` (deregistered hotkeys); returns the removed ones."""
        gone = sorted(set(self.peers) - set(keep))
        for peer in gone:
            del self.peers[peer]
        return gone

    def remember(self, window: int, digests: Mapping[str, str]) -> None:
        """Keep each content digest → source (``"update"`` or ``"aggregate"``) as seen in
        ``window`` (an earlier sighting stays), and drop those seen ``replay_windows`` or more
        windows before it."""
        for digest, source in digests.items():
            self.digests.setdefault(digest, [int(window), source])
        oldest = int(window) - self.config.signals.replay_windows
        self.digests = {d: v for d, v in sorted(self.digests.items()) if v[0] > oldest}

    def remember_sketches(self, window: int, sketches: list[tuple[str, list[float]]]) -> None:
        """Keep (window, source, sketch) of the window's updates and aggregate; drop those
        ``replay_sketch_windows`` or more windows before it."""
        self.sketches += [[int(window), source, list(sk)] for source, sk in sketches]
        oldest = int(window) - self.config.signals.replay_sketch_windows
        self.sketches = [e for e in self.sketches if e[0] > oldest]

    def closest_earlier(
        self, sketches: Mapping[str, list[float] | None], window: int
    ) -> dict[str, tuple[float, int, str]]:
        """Per peer, (cosine, window, source) of the remembered sketch of an earlier window
        closest to its sketch, for peers with a sketch and something to compare with.

        One float64 matrix product for the whole window (peers × remembered sketches); a
        cosine is only compared with a threshold, so the last bits of its sum do not matter.
        """
        earlier = [e for e in self.sketches if e[0] < window]
        present = {p: sk for p, sk in sorted(sketches.items()) if sk is not None}
        peers = list(present)
        if not earlier or not peers:
            return {}
        dims = {len(e[2]) for e in earlier} | {len(sk) for sk in present.values()}
        if len(dims) != 1:
            return {}  # sketches of another size (another release): nothing comparable
        table = torch.tensor([e[2] for e in earlier], dtype=torch.float64)
        mine = torch.tensor(list(present.values()), dtype=torch.float64)
        cos = mine @ table.T
        best = cos.argmax(dim=1).tolist()
        return {
            p: (float(cos[i, j]), int(earlier[j][0]), str(earlier[j][1]))
            for i, (p, j) in enumerate(zip(peers, best, strict=True))
        }

    def first_seen(self, digest: str | None, window: int) -> tuple[int, str] | None:
        """(window, source) of an earlier window that had this content, else None."""
        entry = self.digests.get(digest) if digest is not None else None
        if entry is None or entry[0] >= window:
            return None
        return int(entry[0]), str(entry[1])

    def final_score(self, peer: str) -> float:
        """rating_factor(μ, σ) × BMA_eff × sync (0 for unknown peers)."""
        rec = self.peers.get(peer)
        if rec is None:
            return 0.0
        rating = rating_factor(rec.mu, rec.sigma, self.config.rating)
        updates = rec.evaluations + sum(rec.failures.values())  # each moved the BMA once
        bma = effective_bma(rec.bma, rec.evaluations, updates, self.config.signals)
        return rating * bma * rec.sync

    def final_scores(self) -> dict[str, float]:
        return {p: self.final_score(p) for p in sorted(self.peers)}

    def weights(self) -> dict[str, float]:
        """Normalized weights per hotkey under ``config.weights``."""
        return normalize_scores(self.final_scores(), self.config.weights)

    def chain_weights(self, metagraph: Metagraph, limits: WeightLimits) -> ChainWeights:
        """Weights for the registered uids in the chain's u16 form (unregistered peers drop)."""
        by_hotkey = metagraph.hotkey_to_uid()
        weights = {by_hotkey[p]: w for p, w in self.weights().items() if p in by_hotkey and w}
        wc = self.config.weights
        return to_u16(
            weights,
            metagraph.uids,
            max_weight_limit=limits.max_weight_limit,
            min_allowed_weights=limits.min_allowed_weights,
            burn_uid=wc.burn_uid,
            burn_fraction=wc.burn_fraction,
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: version, config, peers, sync reference, typical change, clip
        reference and the remembered content digests."""
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "peers": {p: asdict(r) for p, r in sorted(self.peers.items())},
            "typical_change": self.typical_change,
            "sync_reference": self.sync_reference,
            "clip_reference": self.clip_reference,
            "digests": self.digests,
            "sketches": self.sketches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the config in it replaces this one's."""
        if state.get("version") != STATE_VERSION:
            raise GauntletError(
                f"scoreboard state version {state.get('version')!r} is not {STATE_VERSION}; "
                "it was written by an incompatible gauntlet release"
            )
        self.config = GauntletConfig.from_dict(state["config"])
        self.peers = {p: PeerRecord(**r) for p, r in state["peers"].items()}
        self.typical_change = state["typical_change"]
        self.sync_reference = state["sync_reference"]
        # absent in states written before clip references and replay digests existed
        self.clip_reference = state.get("clip_reference")
        self.digests = {d: list(v) for d, v in state.get("digests", {}).items()}
        self.sketches = [list(e) for e in state.get("sketches", [])]
