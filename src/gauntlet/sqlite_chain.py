"""A local chain that separate processes share, stored in one SQLite file.

:class:`SqliteSubnet` is the multi-process counterpart of :class:`~gauntlet.InMemorySubnet`:
the same registrations, stakes, commitments, weights and blocks, and the same rules (the
validation functions of :mod:`gauntlet.chain` are reused), but every process that opens
the same file sees the same subnet. :meth:`SqliteSubnet.connect` gives one hotkey's
:class:`SqliteChain`, a :class:`~gauntlet.Chain`.

Blocks: with ``block_time_s`` the block is ``offset + floor((now - genesis) / block_time_s)``
from the genesis time stored at creation, so every process reads the same block without a
block producer; :meth:`SqliteSubnet.advance` adds to ``offset`` (the only way blocks move
when ``block_time_s`` is ``None``). A produced block's hash is random 32 bytes, drawn by
the first process that reads it and stored with ``INSERT OR IGNORE`` in the same transaction
as the read, so every process reads the one value that won.

Skipping idle time (a simulation speed-up; a real chain keeps its block time): after
:meth:`SqliteSubnet.skip_idle` names the run's nodes, a node that waits for a later block
says so (:meth:`SqliteChain.idle_until`), and when every named node is waiting for a later
block or has finished, the transaction that records the last wait moves the chain straight
to the earliest block awaited. Nothing a node computes changes (it only ever reads block
numbers, and nobody had work left before that block); the run takes as long as its
work instead of its windows. A node that is running, or that died without saying it
finished, keeps the wall-clock pace.

Concurrency and crashes: WAL journal, a busy timeout, and every write in one
``BEGIN IMMEDIATE`` transaction that reads, checks and writes (so a rate limit cannot be
raced). A process killed mid-write loses at most its own open transaction.

The subnet parameters (netuid, weight limits, block time) are stored in a ``meta`` table; a
later open of the same file resumes its history, or raises :class:`ChainError` when the
parameters it asks for differ.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gauntlet.chain import (
    Metagraph,
    SetWeightsResult,
    WeightLimits,
    check_block_produced,
    check_commitment,
    check_set_weights,
    weight_matrix_of,
)
from gauntlet.errors import ChainError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS neurons (
    uid INTEGER PRIMARY KEY, hotkey TEXT NOT NULL UNIQUE, stake REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS commitments (
    hotkey TEXT PRIMARY KEY REFERENCES neurons(hotkey), block INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS block_hashes (block INTEGER PRIMARY KEY, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS weights (
    hotkey TEXT PRIMARY KEY REFERENCES neurons(hotkey), block INTEGER NOT NULL,
    vector TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS clock (
    hotkey TEXT PRIMARY KEY, until_block INTEGER, finished INTEGER NOT NULL DEFAULT 0
);
"""


class SqliteSubnet:
    """A subnet in one SQLite file, shared by every process that opens it.

    Args:
        path: the database file (created with its parent folders when missing).
        netuid: the subnet id.
        limits: the weight rules it enforces.
        block_time_s: seconds per block of the wall-clock block number, or ``None`` for
            blocks that move only through :meth:`advance`.
        busy_timeout_s: how long a write waits for another process's transaction.

    Raises:
        ChainError: the file holds a subnet with other parameters, or is not a database.
    """

    def __init__(
        self,
        path: str | Path,
        netuid: int = 1,
        limits: WeightLimits | None = None,
        block_time_s: float | None = None,
        busy_timeout_s: float = 30.0,
    ) -> None:
        if block_time_s is not None and not block_time_s > 0:
            raise ChainError(f"block_time_s must be > 0 seconds or None, got {block_time_s}")
        self.path = Path(path)
        self.netuid = netuid
        self.limits = limits or WeightLimits()
        self.block_time_s = block_time_s
        # One connection per handle, shared by the node's threads under a lock: sqlite3
        # connections must not be used by two threads at once.
        self._lock = threading.Lock()
        self._db = self._open(busy_timeout_s)
        self._genesis = self._init_meta()

    def _open(self, busy_timeout_s: float) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE.
            db = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode survives a killed process (only power loss can drop the
            # last commits), at a fraction of FULL's fsyncs.
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ChainError(f"cannot open the local chain {self.path}: {exc}") from None
        return db

    def _params(self) -> dict[str, str]:
        return {
            "netuid": str(self.netuid),
            "limits": json.dumps(asdict(self.limits), sort_keys=True),
            "block_time_s": json.dumps(self.block_time_s),
        }

    def _init_meta(self) -> float:
        """Store this subnet's parameters, or check them against the stored ones."""
        wanted = self._params()
        with self._write() as db:
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not stored:
                rows = {**wanted, "genesis": repr(time.time()), "block_offset": "0"}
                db.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
                stored = rows
        differ = [k for k, v in wanted.items() if stored.get(k) != v]
        if differ:
            detail = "; ".join(f"{k}: file has {stored.get(k)}, asked {wanted[k]}" for k in differ)
            raise ChainError(
                f"{self.path} holds a subnet with other parameters ({detail}); use another "
                "chain file or the same parameters"
            )
        return float(stored["genesis"])

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so that its reads and checks stay valid."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise ChainError(f"local chain {self.path} is busy: {exc}") from None
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _block(self, db: sqlite3.Connection) -> int:
        (offset,) = db.execute("SELECT value FROM meta WHERE key = 'block_offset'").fetchone()
        if self.block_time_s is None:
            return int(offset)
        return int(offset) + math.floor((time.time() - self._genesis) / self.block_time_s)

    def block(self) -> int:
        """The current block."""
        with self._lock:
            return self._block(self._db)

    def block_hash(self, block: int) -> str:
        """``0x`` + 64 hex digits of ``block``'s hash; :class:`ChainError` before it exists."""
        with self._write() as db:
            check_block_produced(block, self._block(db))
            db.execute(
                "INSERT OR IGNORE INTO block_hashes VALUES (?, ?)",
                (int(block), "0x" + secrets.token_hex(32)),
            )
            (value,) = db.execute(
                "SELECT hash FROM block_hashes WHERE block = ?", (int(block),)
            ).fetchone()
        return str(value)

    def advance(self, blocks: int = 1) -> int:
        """Move the chain ``blocks`` blocks ahead (for every process); returns the new block."""
        with self._write() as db:
            db.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'block_offset'",
                (int(blocks),),
            )
            return self._block(db)

    def skip_idle(self, hotkeys: Sequence[str]) -> None:
        """Skip idle time from now on: whenever every one of ``hotkeys`` waits for a later
        block (or has finished), the chain moves to the earliest block awaited (see the
        module docstring). Until each of them has said it waits, nothing is skipped."""
        with self._write() as db:
            db.execute("DELETE FROM clock")  # the nodes of an earlier run in the same file
            db.executemany(
                "INSERT INTO clock (hotkey, until_block) VALUES (?, NULL)", [(h,) for h in hotkeys]
            )
            self._skip_if_idle(db)

    def _skip_if_idle(self, db: sqlite3.Connection) -> None:
        """Move to the earliest awaited block when every named node that has not finished
        waits for a block after the current one."""
        rows = db.execute("SELECT until_block FROM clock WHERE finished = 0").fetchall()
        if not rows:
            return
        now = self._block(db)
        awaited = [r[0] for r in rows]
        if any(b is None or b <= now for b in awaited):
            return  # someone is working, or about to wake up
        db.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'block_offset'",
            (min(awaited) - now,),
        )

    def _set_clock(self, hotkey: str, until_block: int | None, finished: bool) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE clock SET until_block = ?, finished = ? WHERE hotkey = ?",
                (until_block, int(finished), hotkey),
            )
            if until_block is not None or finished:
                self._skip_if_idle(db)

    def register(self, hotkey: str, stake: float = 0.0) -> int:
        """Register ``hotkey`` (idempotent) and set its stake; returns its uid."""
        with self._write() as db:
            db.execute(
                "INSERT INTO neurons (uid, hotkey, stake) "
                "VALUES ((SELECT COUNT(*) FROM neurons), ?, ?) "
                "ON CONFLICT(hotkey) DO UPDATE SET stake = excluded.stake",
                (hotkey, float(stake)),
            )
            (uid,) = db.execute("SELECT uid FROM neurons WHERE hotkey = ?", (hotkey,)).fetchone()
        return int(uid)

    def connect(self, hotkey: str) -> SqliteChain:
        """``hotkey``'s :class:`~gauntlet.Chain` handle on this subnet."""
        return SqliteChain(self, hotkey)

    def metagraph(self) -> Metagraph:
        """The registered neurons, uids ascending, at the current block."""
        with self._lock:
            sql = "SELECT uid, hotkey, stake FROM neurons ORDER BY uid"
            rows = self._db.execute(sql).fetchall()
            block = self._block(self._db)
        return Metagraph(
            netuid=self.netuid,
            block=block,
            uids=[r[0] for r in rows],
            hotkeys=[r[1] for r in rows],
            stakes=[r[2] for r in rows],
            validator_permit=[r[2] > 0 for r in rows],
        )

    def weight_matrix(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(validator hotkeys, stakes, row-normalized weights validators × uids), for Yuma."""
        rows = self._read(
            "SELECT n.hotkey, w.vector FROM weights w JOIN neurons n USING (hotkey) ORDER BY n.uid"
        )
        stakes = dict(self._read("SELECT hotkey, stake FROM neurons"))
        (n_uids,) = self._read("SELECT COUNT(*) FROM neurons")[0]
        vectors = {hk: {int(u): v for u, v in json.loads(vec).items()} for hk, vec in rows}
        return weight_matrix_of(vectors, stakes, n_uids)

    def commitments(self) -> dict[str, str]:
        """Every hotkey's latest commitment, sorted by hotkey."""
        return dict(self._read("SELECT hotkey, data FROM commitments ORDER BY hotkey"))

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` verdict (``"ok"`` when the file is sound)."""
        return "; ".join(r[0] for r in self._read("PRAGMA integrity_check"))

    def close(self) -> None:
        """Close this process's connection (the file and its history stay)."""
        with self._lock:
            self._db.close()

    def _commit(self, hotkey: str, data: str) -> None:
        with self._write() as db:
            registered = db.execute("SELECT 1 FROM neurons WHERE hotkey = ?", (hotkey,)).fetchone()
            check_commitment(hotkey, registered is not None, self.netuid, data)
            db.execute(
                "INSERT OR REPLACE INTO commitments VALUES (?, ?, ?)",
                (hotkey, self._block(db), data),
            )

    def _set_weights(
        self, hotkey: str, uids: Sequence[int], values: Sequence[int], version_key: int
    ) -> SetWeightsResult:
        with self._write() as db:
            stake = db.execute("SELECT stake FROM neurons WHERE hotkey = ?", (hotkey,)).fetchone()
            last = db.execute("SELECT block FROM weights WHERE hotkey = ?", (hotkey,)).fetchone()
            (n_uids,) = db.execute("SELECT COUNT(*) FROM neurons").fetchone()
            block = self._block(db)
            result, nonzero = check_set_weights(
                self.limits,
                hotkey=hotkey,
                stake=None if stake is None else stake[0],
                n_uids=n_uids,
                block=block,
                last_set=None if last is None else last[0],
                uids=uids,
                values=values,
                version_key=version_key,
            )
            if result.success:
                db.execute(
                    "INSERT OR REPLACE INTO weights VALUES (?, ?, ?)",
                    (hotkey, block, json.dumps(nonzero)),
                )
        return result


class SqliteChain:
    """One hotkey's :class:`~gauntlet.Chain` handle on a :class:`SqliteSubnet`."""

    def __init__(self, subnet: SqliteSubnet, hotkey: str) -> None:
        self._subnet = subnet
        self._hotkey = hotkey

    @property
    def netuid(self) -> int:
        return self._subnet.netuid

    @property
    def hotkey(self) -> str:
        return self._hotkey

    def metagraph(self) -> Metagraph:
        return self._subnet.metagraph()

    def block(self) -> int:
        return self._subnet.block()

    def block_hash(self, block: int) -> str:
        return self._subnet.block_hash(block)

    def weight_limits(self) -> WeightLimits:
        return self._subnet.limits

    def get_commitment(self, hotkey: str) -> str | None:
        rows = self._subnet._read("SELECT data FROM commitments WHERE hotkey = ?", (hotkey,))
        return rows[0][0] if rows else None

    def get_all_commitments(self) -> dict[str, str]:
        return self._subnet.commitments()

    def commit(self, data: str) -> None:
        self._subnet._commit(self._hotkey, data)

    def set_weights(
        self, uids: Sequence[int], values: Sequence[int], version_key: int = 0
    ) -> SetWeightsResult:
        return self._subnet._set_weights(self._hotkey, list(uids), list(values), version_key)

    def idle_until(self, block: int) -> None:
        """This node has nothing to do before ``block`` (it waits for it); with idle
        skipping on, the chain may move there at once (:meth:`SqliteSubnet.skip_idle`)."""
        self._subnet._set_clock(self._hotkey, int(block), finished=False)

    def busy(self) -> None:
        """This node is working again (its wait is over)."""
        self._subnet._set_clock(self._hotkey, None, finished=False)

    def finished(self) -> None:
        """This node has stopped: idle skipping no longer waits for it."""
        self._subnet._set_clock(self._hotkey, None, finished=True)
