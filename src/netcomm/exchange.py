"""The object-storage exchange: publish one signed envelope per window, gather the others'.

:class:`StorageExchange` implements :class:`sparseloco.exchange.Exchange`, so
``sparseloco.SparseLoCo(params, exchange=StorageExchange(...))`` works unchanged.

Gather semantics (every requested peer gets exactly one status):

* ``ok``: downloaded and fully verified (see :func:`netcomm.envelope.open_envelope`).
* ``missing``: not in the directory, or no object appeared before the deadline.
* ``late``: the object's storage timestamp is after the ``cutoff``; it is not downloaded.
* ``invalid``: the object was rejected (``reason`` starts with the
  :class:`~netcomm.errors.EnvelopeError` reason code), or it is larger than the cap. A
  ``replay`` is an envelope signed for another window, or one whose payload (BLAKE3 of its
  canonical safetensors bytes) was already accepted in an earlier window from any peer. Any
  other exception while reading one peer's bytes is a reader bug; it is logged and that peer
  is ``invalid`` with reason ``internal``, so no object can make ``gather`` raise.
* ``timeout``: the object exists but its download did not finish (or kept failing with
  transient errors) before the deadline.

Missing objects are polled every ``poll_interval_s``. A transfer that fails transiently
(connection error, 5xx, truncated body) or whose bytes fail the signature or checksum (transit
corruption looks the same as a bad publisher) is retried with backoff up to ``attempts`` times.
An object that reached ``ok`` or ``invalid`` is never downloaded again: a repeat gather of the
same window reuses the result as long as the object's etag is unchanged.

Pipelining: probes (``head``) and downloads each run on up to ``max_concurrency`` threads of
their own. A download thread hashes the body as its bytes arrive
(:func:`~netcomm.storage.read_range` with a :class:`~netcomm.envelope.BodyHasher`), so the
checksum is known by the last byte, and each finished download is verified on one of
``verify_threads`` others (one per core by default) while the next downloads proceed: the
verification overlaps transfer instead of holding a download thread, and no download waits
behind another peer's probe. The result says ``contents_validated``, so the optimizer does
not read every byte of the payloads a second time.

Memory: at most ``max_concurrency`` objects are held at once (being downloaded, waiting for
verification or being verified), each of at most
``limits.max_object_bytes`` (checked against the storage's size before downloading) and
decompressed to at most ``limits.max_decompressed_bytes`` (grown as bytes arrive, never sized
by a declared length), so the transient peak of one gather is about ``max_concurrency ×
(max_object_bytes + max_decompressed_bytes)`` on top of the accepted payloads it returns.
The caps are the configured ones tightened to :meth:`EnvelopeLimits.for_model`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

from netcomm.directory import PeerDirectory, PeerRecord, check_peer_id, update_key
from netcomm.envelope import (
    BodyDigest,
    BodyHasher,
    Envelope,
    EnvelopeLimits,
    open_envelope,
    seal_envelope,
)
from netcomm.errors import (
    EnvelopeError,
    NetcommConfigError,
    NotEnoughPeersError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from netcomm.signing import Signer, Verifier, default_verifiers
from netcomm.spec import ModelSpec
from netcomm.storage import Bytes, ObjectInfo, Storage, read_range
from sparseloco.config import CodecConfig
from sparseloco.exchange import GatherResult, PeerStatus
from sparseloco.payload import Payload

log = logging.getLogger(__name__)

# Failures a re-download can cure when they happened in transit: everything found before
# the signature and the body checksum have vouched for the bytes (a flipped bit can land in
# the version or a length field too). A genuinely bad object costs at most `attempts` reads.
_RETRYABLE_REASONS = frozenset(
    {"format", "version", "too_large", "signature", "checksum", "decompress"}
)


@dataclass(frozen=True)
class ExchangeConfig:
    """How a :class:`StorageExchange` publishes and gathers.

    Args:
        deadline_s: default time budget of ``gather``, seconds from the call.
        min_peers: default minimum of ``ok`` peers; fewer raises
            :class:`~netcomm.errors.NotEnoughPeersError` (0 never raises).
        max_concurrency: parallel probes, and parallel downloads, in one gather; also the
            most objects it holds at once (downloads waiting for or under verification
            included).
        verify_threads: threads verifying downloaded envelopes (``None``: one per CPU core,
            at most ``max_concurrency``).
        attempts: tries per object for transient or integrity failures.
        backoff_s / backoff_max_s: retry n waits ``min(backoff_max_s, backoff_s·2ⁿ)`` times a
            random factor in [0.5, 1], never past the deadline.
        poll_interval_s: how often a not-yet-published object is looked for again.
        compression: ``"auto"`` (zstd only when it saves at least ``min_compression_saving``
            of the bytes), ``"zstd"`` or ``"none"``, for published envelopes.
        min_compression_saving: the fraction ``"auto"`` requires zstd to save.
        compression_level: zstd level for published envelopes.
        compression_threads: zstd worker threads when publishing (0 = calling thread).
        limits: size caps for received envelopes.
        codec: the codec received sparse updates must use (``None``: any, checked later by
            the optimizer); setting it makes the channel sparse.
        kind: the one update kind the channel carries (``"sparse"``, ``"dense"``, or
            ``None``: either, unless ``codec`` is set); the other kind is ``invalid``.
        keep_windows: windows whose verified results are kept for repeat gathers.
        replay_memory: payload digests remembered for replay detection (oldest dropped
            first); a few windows' worth of peers is enough.
    """

    deadline_s: float = 60.0
    min_peers: int = 0
    max_concurrency: int = 8
    verify_threads: int | None = None
    attempts: int = 3
    backoff_s: float = 0.25
    backoff_max_s: float = 4.0
    poll_interval_s: float = 0.5
    compression: Literal["auto", "zstd", "none"] = "auto"
    min_compression_saving: float = 0.02
    compression_level: int = 3
    compression_threads: int = 0
    limits: EnvelopeLimits = field(default_factory=EnvelopeLimits)
    codec: CodecConfig | None = None
    keep_windows: int = 2
    kind: Literal["sparse", "dense"] | None = None
    replay_memory: int = 4096

    def __post_init__(self) -> None:
        positive = ("deadline_s", "poll_interval_s", "backoff_s", "backoff_max_s")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise NetcommConfigError(f"ExchangeConfig.{name} must be a finite number > 0")
        for name in ("max_concurrency", "attempts", "keep_windows", "replay_memory"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise NetcommConfigError(f"ExchangeConfig.{name} must be an integer >= 1")
        if self.verify_threads is not None and (
            not isinstance(self.verify_threads, int) or self.verify_threads < 1
        ):
            raise NetcommConfigError("ExchangeConfig.verify_threads must be None or an int >= 1")
        if not isinstance(self.min_peers, int) or self.min_peers < 0:
            raise NetcommConfigError("ExchangeConfig.min_peers must be an integer >= 0")
        if self.compression not in ("auto", "zstd", "none"):
            raise NetcommConfigError("ExchangeConfig.compression must be 'auto', 'zstd' or 'none'")
        if not 0.0 <= self.min_compression_saving < 1.0:
            raise NetcommConfigError("ExchangeConfig.min_compression_saving must lie in [0, 1)")
        if not 1 <= self.compression_level <= 22:
            raise NetcommConfigError("ExchangeConfig.compression_level must lie in [1, 22]")
        if not isinstance(self.limits, EnvelopeLimits):
            raise NetcommConfigError("ExchangeConfig.limits must be an EnvelopeLimits")
        if self.kind not in (None, "sparse", "dense"):
            raise NetcommConfigError("ExchangeConfig.kind must be 'sparse', 'dense' or None")
        if self.kind == "dense" and self.codec is not None:
            raise NetcommConfigError("ExchangeConfig.codec makes a sparse channel, not dense")


@dataclass
class _PeerState:
    peer: str
    record: PeerRecord | None
    key: str = ""
    info: ObjectInfo | None = None
    status: PeerStatus | None = None
    payload: Payload | None = None
    future: Future | None = None
    stage: Literal["probe", "download", "verify"] = "probe"
    next_try: float = 0.0
    tries: int = 0
    nbytes: int = 0
    started: float | None = None
    last_error: str = ""
    stored_at: float | None = None


class _Download(NamedTuple):
    """A whole object, and its body's BLAKE3 digest as hashed while it arrived."""

    blob: Bytes
    body_digest: BodyDigest | None


class _Pools(NamedTuple):
    """The threads of one gather: probes, downloads, and verification of finished downloads.

    Probes have their own threads so that no download waits behind another peer's probe.
    """

    probe: ThreadPoolExecutor
    download: ThreadPoolExecutor
    verify: ThreadPoolExecutor

    @classmethod
    def start(cls, width: int, verify_threads: int | None) -> _Pools:
        verifiers = min(width, verify_threads or os.cpu_count() or 1)
        return cls(
            ThreadPoolExecutor(width, thread_name_prefix="netcomm-probe"),
            ThreadPoolExecutor(width, thread_name_prefix="netcomm-gather"),
            ThreadPoolExecutor(verifiers, thread_name_prefix="netcomm-verify"),
        )

    def shutdown(self) -> None:
        """Stop without waiting: stragglers are abandoned and their results never read."""
        for pool in self:
            pool.shutdown(wait=False, cancel_futures=True)


class StorageExchange:
    """One peer's exchange through object storage.

    Args:
        peer_id: this peer's id (must match its record in the directory).
        storage: where this peer publishes (it needs write access there).
        directory: where the other peers' updates live and their public keys.
        signer: this peer's signing key.
        spec: the model's names/shapes/dtypes; updates for other models are rejected.
        config: timing, concurrency and caps (:class:`ExchangeConfig`).
        prefix: key prefix of this peer's objects in ``storage`` (its directory record's
            ``prefix``).
        verifiers: signature verifiers by scheme (Ed25519 by default).
    """

    def __init__(
        self,
        peer_id: str,
        storage: Storage,
        directory: PeerDirectory,
        signer: Signer,
        spec: ModelSpec,
        config: ExchangeConfig | None = None,
        *,
        prefix: str = "",
        verifiers: Mapping[str, Verifier] | None = None,
    ) -> None:
        check_peer_id(peer_id)
        update_key(prefix, 0, peer_id)  # validates the prefix up front
        self._peer_id = peer_id
        self.storage = storage
        self.directory = directory
        self.signer = signer
        self.spec = spec
        self.config = config or ExchangeConfig()
        self.prefix = prefix
        self.verifiers = dict(verifiers) if verifiers is not None else default_verifiers()
        # a configured cap can only tighten what this model's largest honest update needs
        self.limits = self.config.limits.tighten(EnvelopeLimits.for_model(spec))
        self._shapes = spec.shapes
        self._fingerprint = spec.fingerprint
        self._cache: dict[int, dict[str, tuple[str, PeerStatus, Payload | None]]] = {}
        # payload digest -> the window it was first accepted in (insertion-ordered, bounded)
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._rng = random.Random()

    @property
    def peer_id(self) -> str:
        return self._peer_id

    def publish(self, window: int, payload: Payload) -> int:
        """Seal ``payload`` for ``window`` and store it; returns the bytes written."""
        blob = seal_envelope(
            payload,
            window=window,
            publisher=self._peer_id,
            fingerprint=self._fingerprint,
            signer=self.signer,
            level=self.config.compression_level,
            threads=self.config.compression_threads,
            compression=self.config.compression,
            min_saving=self.config.min_compression_saving,
        )
        key = update_key(self.prefix, window, self._peer_id)
        for attempt in range(self.config.attempts):
            try:
                self.storage.put(key, blob)
                break
            except TransientStorageError:
                if attempt + 1 == self.config.attempts:
                    raise
                time.sleep(self._backoff(attempt))
        return len(blob)

    def published(self, window: int) -> Payload | None:
        """This peer's own update for ``window`` as stored, verified like any other peer's
        (:class:`~netcomm.errors.EnvelopeError` if it does not verify), or ``None`` when it
        published none: what a peer that restarts after publishing must aggregate too."""
        try:
            blob = self.storage.get(update_key(self.prefix, window, self._peer_id))
        except ObjectNotFoundError:
            return None
        return self._open(blob, self._peer_id, self.signer.public_key, window).payload

    def gather(
        self,
        window: int,
        peers: Sequence[str] | None = None,
        *,
        deadline: float | None = None,
        min_peers: int | None = None,
        cutoff: float | None = None,
    ) -> GatherResult:
        """Download and verify the other peers' updates for ``window``.

        Args:
            peers: peer ids to gather (default: every peer in the directory); this peer is
                always left out.
            deadline: seconds from now after which gather returns whatever it has
                (default ``config.deadline_s``).
            min_peers: raise :class:`NotEnoughPeersError` (carrying the result) if fewer
                peers are ``ok`` (default ``config.min_peers``).
            cutoff: epoch seconds; objects stored later are ``late`` (default: no cutoff).
        """
        cfg = self.config
        budget = cfg.deadline_s if deadline is None else deadline
        need = cfg.min_peers if min_peers is None else min_peers
        names = sorted(set(self.directory.peers() if peers is None else peers) - {self._peer_id})
        start = time.monotonic()
        end = start + budget
        states = {p: self._initial_state(window, p) for p in names}
        pools = _Pools.start(max(1, min(cfg.max_concurrency, len(names))), cfg.verify_threads)
        try:
            self._run(window, states, end, cutoff, pools)
        finally:
            pools.shutdown()
        # open_envelope validated every accepted payload's contents
        result = GatherResult(window=window, contents_validated=True)
        for name in names:
            st = states[name]
            status = st.status or self._unfinished(st)
            if st.stored_at is not None:
                status = replace(status, stored_at=st.stored_at)
            result.statuses[name] = status
            if status.status == "ok" and st.payload is not None:
                result.updates[name] = st.payload
        self._remember(window, states)
        ok = len(result.updates)
        if ok < need:
            raise NotEnoughPeersError(
                f"window {window}: {ok} usable updates, {need} required", result
            )
        return result

    # -- gather internals ---------------------------------------------------------------

    def _initial_state(self, window: int, peer: str) -> _PeerState:
        record = self.directory.lookup(peer)
        st = _PeerState(peer, record)
        if record is None:
            st.status = PeerStatus(peer, "missing", "not in the peer directory")
        else:
            st.key = update_key(record.prefix, window, peer)
        return st

    def _run(
        self,
        window: int,
        states: dict[str, _PeerState],
        end: float,
        cutoff: float | None,
        pools: _Pools,
    ) -> None:
        """Drive every peer to a status or until ``end``: probe, download, verify, retry."""
        cached = self._cache.get(window, {})
        while True:
            now = time.monotonic()
            pending = [s for s in states.values() if s.status is None]
            if not pending or now >= end:
                return
            queued = self._submit(pending, now, pools)
            inflight = [s.future for s in pending if s.future is not None]
            # a download waiting for a slot is woken by the completion that frees one
            idle = [s.next_try for s in pending if s.future is None and s.peer not in queued]
            wake = min([*idle, end])
            wait(inflight, timeout=max(0.0, wake - time.monotonic()), return_when=FIRST_COMPLETED)
            for st in pending:
                if st.future is not None and st.future.done():
                    future, st.future = st.future, None
                    if st.stage == "probe":
                        self._on_probe(st, future, cutoff, cached.get(st.peer))
                    elif st.stage == "download" and _complete(future):
                        st.stage = "verify"
                        got = future.result()[1]
                        st.future = pools.verify.submit(self._verify, window, st.record, got)
                    else:
                        self._on_fetch(st, future, window, end)

    def _submit(self, pending: list[_PeerState], now: float, pools: _Pools) -> set[str]:
        """Start the probes and downloads that are due, holding at most max_concurrency objects.

        Returns the peers whose download is due but waits for a slot.
        """
        held = sum(1 for s in pending if s.future is not None and s.stage != "probe")
        queued = set()
        for st in pending:
            if st.future is not None or st.next_try > now:
                continue
            if st.info is None:
                st.stage = "probe"
                st.future = pools.probe.submit(st.record.storage.head, st.key)  # type: ignore[union-attr]
            elif held < self.config.max_concurrency:
                held += 1
                st.stage = "download"
                st.started = st.started if st.started is not None else now
                st.future = pools.download.submit(self._download, st.record, st.info)  # type: ignore[arg-type]
            else:
                queued.add(st.peer)
        return queued

    def _on_probe(
        self,
        st: _PeerState,
        future: Future,
        cutoff: float | None,
        cached: tuple[str, PeerStatus, Payload | None] | None,
    ) -> None:
        now = time.monotonic()
        try:
            info: ObjectInfo = future.result()
        except ObjectNotFoundError:
            st.next_try = now + self.config.poll_interval_s
            return
        except TransientStorageError as exc:
            st.last_error = str(exc)
            st.next_try = now + self._backoff(0)
            return
        except StorageError as exc:
            st.status = PeerStatus(st.peer, "missing", f"cannot read storage: {exc}")
            return
        st.stored_at = info.mtime
        if cached is not None and cached[0] == info.etag:
            _, status, payload = cached
            st.status = PeerStatus(st.peer, status.status, status.reason or "already verified")
            st.payload = payload
            return
        if cutoff is not None and info.mtime > cutoff:
            st.status = PeerStatus(
                st.peer, "late", f"stored at {info.mtime:.3f}, cutoff {cutoff:.3f}"
            )
            return
        if info.size > self.limits.max_object_bytes:
            st.status = PeerStatus(
                st.peer,
                "invalid",
                f"too_large: object is {info.size} bytes, cap {self.limits.max_object_bytes}",
            )
            return
        st.info = info

    def _first_window(self, envelope: Envelope, window: int) -> int | None:
        """The earlier window this payload was accepted in, else None (and remember it)."""
        digest = envelope.payload_digest
        with self._lock:
            first = self._seen.setdefault(digest, window)
            while len(self._seen) > self.config.replay_memory:
                del self._seen[next(iter(self._seen))]
        return first if first < window else None

    def _on_fetch(self, st: _PeerState, future: Future, window: int, end: float) -> None:
        now = time.monotonic()
        latency = now - (st.started or now)
        st.tries += 1
        try:
            nbytes, outcome = future.result()
        except ObjectNotFoundError:
            # Deleted or replaced between head and get: look for it again.
            st.info = None
            st.next_try = now
            return
        except TransientStorageError as exc:
            nbytes, outcome = 0, exc
        except StorageError as exc:
            st.status = PeerStatus(st.peer, "invalid", f"storage: {exc}", st.nbytes, latency)
            return
        except Exception as exc:  # a bug reached by one peer's object must not end the gather
            log.exception("reading %s's object failed unexpectedly", st.peer)
            st.status = PeerStatus(st.peer, "invalid", _internal(exc), st.nbytes, latency)
            return
        st.nbytes += nbytes
        if isinstance(outcome, Envelope):
            replayed = self._first_window(outcome, window)
            if replayed is not None:
                reason = f"replay: payload already accepted in window {replayed}"
                st.status = PeerStatus(st.peer, "invalid", reason, st.nbytes, latency)
                return
            st.payload = outcome.payload
            st.status = PeerStatus(st.peer, "ok", "", st.nbytes, latency)
            return
        if not isinstance(outcome, EnvelopeError | TransientStorageError):
            st.status = PeerStatus(st.peer, "invalid", _internal(outcome), st.nbytes, latency)
            return
        is_envelope = isinstance(outcome, EnvelopeError)
        if is_envelope and outcome.reason not in _RETRYABLE_REASONS:
            st.status = PeerStatus(st.peer, "invalid", str(outcome), st.nbytes, latency)
            return
        st.last_error = str(outcome)
        if st.tries >= self.config.attempts:
            st.status = PeerStatus(
                st.peer,
                "invalid" if is_envelope else "timeout",
                f"{outcome} (after {st.tries} attempts)",
                st.nbytes,
                latency,
            )
            return
        st.next_try = min(end, now + self._backoff(st.tries - 1))

    @staticmethod
    def _download(record: PeerRecord, info: ObjectInfo) -> tuple[int, _Download | Exception]:
        """(bytes received, the object or why it is incomplete); storage errors propagate.

        The body is hashed as the bytes arrive, so its checksum is known by the last one.
        """
        hasher = BodyHasher()
        blob = read_range(record.storage, info.key, 0, info.size, hasher.update)
        if len(blob) != info.size:
            return len(blob), TransientStorageError(
                f"truncated download: {len(blob)} of {info.size} bytes"
            )
        return len(blob), _Download(blob, hasher.digest())

    def _open(
        self,
        blob: Bytes,
        peer: str,
        public_key: bytes,
        window: int,
        body_digest: BodyDigest | None = None,
    ) -> Envelope:
        """``peer``'s envelope for ``window`` on this channel, every check of the reader."""
        return open_envelope(
            blob,
            expected_peer=peer,
            public_key=public_key,
            verifiers=self.verifiers,
            window=window,
            fingerprint=self._fingerprint,
            shapes=self._shapes,
            codec=self.config.codec,
            kind=self.config.kind,
            limits=self.limits,
            body_digest=body_digest,
        )

    def _verify(
        self, window: int, record: PeerRecord, got: _Download
    ) -> tuple[int, Envelope | Exception]:
        """(bytes received, the verified envelope or why the bytes were rejected).

        Any exception but the typed ones is a reader bug; it is logged here, with its
        traceback, and returned so that only this peer is marked ``invalid``.
        """
        size = len(got.blob)
        try:
            return size, self._open(
                got.blob, record.peer_id, record.public_key, window, got.body_digest
            )
        except EnvelopeError as exc:
            return size, exc
        except Exception as exc:
            log.exception("opening %s's envelope raised an untyped error", record.peer_id)
            return size, exc

    @staticmethod
    def _unfinished(st: _PeerState) -> PeerStatus:
        waited = f"; last error: {st.last_error}" if st.last_error else ""
        if st.info is None:
            return PeerStatus(st.peer, "missing", f"no object by the deadline{waited}")
        return PeerStatus(
            st.peer, "timeout", f"download not finished by the deadline{waited}", st.nbytes
        )

    def _remember(self, window: int, states: dict[str, _PeerState]) -> None:
        with self._lock:
            box = self._cache.setdefault(window, {})
            for st in states.values():
                if (
                    st.info is not None
                    and st.status is not None
                    and st.status.status
                    in (
                        "ok",
                        "invalid",
                    )
                ):
                    box[st.peer] = (st.info.etag, st.status, st.payload)
            for old in sorted(self._cache)[: -self.config.keep_windows]:
                del self._cache[old]

    def _backoff(self, attempt: int) -> float:
        cfg = self.config
        return min(cfg.backoff_max_s, cfg.backoff_s * 2**attempt) * self._rng.uniform(0.5, 1.0)


def _complete(download: Future) -> bool:
    """Whether a finished download brought the whole object (else it goes to _on_fetch)."""
    return download.exception() is None and not isinstance(download.result()[1], Exception)


def _internal(exc: BaseException) -> str:
    return f"internal: {type(exc).__name__}: {exc}"
