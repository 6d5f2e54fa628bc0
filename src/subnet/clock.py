"""Windows from the chain's block number, and a wall clock for the in-memory chain.

Every node computes ``window = (block - start_block) // blocks_per_window`` from the same
chain, so miners and validators agree on the window without talking to each other. A node
that falls behind does not replay the windows it missed: :meth:`WindowClock.wait_for`
returns the *current* window once it is at least the one asked for.
"""

from __future__ import annotations

import threading

from gauntlet import Chain, InMemorySubnet, SqliteChain
from subnet.config import WindowConfig


class Stopped(Exception):
    """The node was asked to stop while it waited."""


class WindowClock:
    """Reads windows off a chain.

    Args:
        chain: anything with ``block()`` (a :class:`gauntlet.Chain`).
        config: ``blocks_per_window``, ``start_block`` and the polling interval.
        stop: set it to make waits raise :class:`Stopped`.
    """

    def __init__(
        self, chain: Chain, config: WindowConfig, stop: threading.Event | None = None
    ) -> None:
        self.chain = chain
        self.config = config
        self.stop = stop or threading.Event()

    def window_of(self, block: int) -> int:
        """The window ``block`` falls in (-1 before ``start_block``)."""
        if block < self.config.start_block:
            return -1
        return (block - self.config.start_block) // self.config.blocks_per_window

    def window(self) -> int:
        """The current window."""
        return self.window_of(self.chain.block())

    def first_block(self, window: int) -> int:
        """The first block of ``window``."""
        return self.config.start_block + window * self.config.blocks_per_window

    def wait_for(self, window: int, *, idle: bool = True) -> int:
        """Block until the current window is at least ``window``; returns the current one.

        On the local chain the wait is announced (:meth:`gauntlet.SqliteChain.idle_until`),
        so a run that skips idle time moves on as soon as every node waits. Only a node
        with nothing else to do for the windows before may announce it: a thread that
        waits beside the node's work passes ``idle=False``."""
        now = self.window()
        if now >= window:
            return now
        local = self.chain if idle and isinstance(self.chain, SqliteChain) else None
        if local is not None:
            local.idle_until(self.first_block(window))
        try:
            while (now := self.window()) < window:
                if self.stop.wait(self.config.poll_s):
                    raise Stopped
            return now
        finally:
            if local is not None:
                local.busy()

    def finished(self) -> None:
        """Tell the local chain this node has stopped (idle skipping stops waiting for it)."""
        if isinstance(self.chain, SqliteChain):
            self.chain.finished()


class BlockTicker:
    """Advances an :class:`InMemorySubnet` by one block every ``block_time_s`` seconds.

    The in-memory chain has no block producer; this thread plays that part for local runs
    (a real chain makes its own blocks). Use it as a context manager.
    """

    def __init__(self, subnet: InMemorySubnet, block_time_s: float) -> None:
        self.subnet = subnet
        self.block_time_s = block_time_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="block-ticker", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.block_time_s):
            self.subnet.advance(1)

    def __enter__(self) -> BlockTicker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
