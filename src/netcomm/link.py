"""A WAN link model: one peer's upload/download bandwidth and latency, on real bytes.

A :class:`LinkSpec` says what the link is (``parse_link("100mbit,50ms")``); a :class:`Link`
is one peer's link at run time, a token bucket per direction and a one-way delay, shared by
every connection and storage of that peer, so parallel transfers split its bandwidth as
they would on one network interface. Two ways to put a peer behind its link:

* :class:`LinkProxy`, a TCP proxy on 127.0.0.1 in front of a loopback server (an S3 endpoint
  such as moto's): every byte between the client's sockets and the server's passes through
  it, paced by the bucket of its direction and delivered ``rtt_s / 2`` after it was sent.
  Use ``proxy.url`` as the peer's endpoint. Connection set-up is not delayed (clients keep
  their connections open).
* :class:`ShapedStorage`, for a backend without sockets (:class:`~netcomm.storage.LocalStorage`):
  each call takes one round trip plus the time its bytes need on the link, holding the
  caller until then (a node wraps its own and every peer's storage in one).

"up" is from the peer to the storage (publish), "down" from the storage to the peer (gather).
"""

from __future__ import annotations

import contextlib
import math
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from netcomm.errors import NetcommConfigError
from netcomm.storage import Bytes, ObjectInfo, Progress, Storage, read_range

MIN_CHUNK, MAX_CHUNK = 16 * 1024, 256 * 1024  # bounds of what the proxy reads at once
_RATE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(bit|kbit|mbit|gbit)(?:/s)?", re.IGNORECASE)
_TIME = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(us|ms|s)", re.IGNORECASE)
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_FIELD_WORDS = {
    "up_bit_s": "the upload rate",
    "down_bit_s": "the download rate",
    "rtt_s": "the RTT",
}
_SPEC_HELP = "write e.g. '100mbit,50ms', '1gbit' or 'up=10mbit,down=100mbit,20ms'"


@dataclass(frozen=True)
class LinkSpec:
    """One peer's link: bandwidth each way (bits per second, ``None`` = unlimited) and RTT.

    Args:
        up_bit_s: upload bandwidth, peer to storage.
        down_bit_s: download bandwidth, storage to peer.
        rtt_s: round-trip time added; each direction delays its bytes by half of it.
    """

    up_bit_s: float | None = None
    down_bit_s: float | None = None
    rtt_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("up_bit_s", "down_bit_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise NetcommConfigError(f"LinkSpec.{name} must be a finite rate > 0 or None")
        if not (math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise NetcommConfigError("LinkSpec.rtt_s must be a finite number of seconds >= 0")

    def __str__(self) -> str:
        """The spec in the form :func:`parse_link` reads."""
        items = [] if self.rtt_s == 0 else [f"rtt={_format_time(self.rtt_s)}"]
        if self.up_bit_s == self.down_bit_s:
            return ",".join([_format_rate(self.up_bit_s), *items])
        rates = [f"up={_format_rate(self.up_bit_s)}", f"down={_format_rate(self.down_bit_s)}"]
        return ",".join(rates + items)


def parse_link(text: str) -> LinkSpec:
    """Read a link spec: comma-separated items, each a rate or a latency.

    A bare rate (``100mbit``, ``1gbit``, ``512kbit``, ``2.5mbit/s``; decimal units of bits
    per second) sets both directions, ``up=RATE`` / ``down=RATE`` one each; a bare time or
    ``rtt=TIME`` (``50ms``, ``0.1s``, ``500us``) is the round-trip time. ``unlimited`` as a
    rate leaves a direction unshaped. Raises :class:`~netcomm.errors.NetcommConfigError` (a
    ``ValueError``) with a one-line message on anything else.
    """
    compact = text.replace(" ", "").lower()
    if not compact:
        raise NetcommConfigError(f"link spec {text!r} is empty; {_SPEC_HELP}")
    fields: dict[str, float | None] = {}
    for item in compact.split(","):
        name, value = _parse_item(text, item)
        names = ("up_bit_s", "down_bit_s") if name == "rate" else (name,)
        for field_name in names:
            if field_name in fields:
                raise NetcommConfigError(
                    f"link spec {text!r} sets {_FIELD_WORDS[field_name]} twice; {_SPEC_HELP}"
                )
            fields[field_name] = value
    return LinkSpec(**fields)


def _parse_item(text: str, item: str) -> tuple[str, float | None]:
    """(field name or ``"rate"`` for both directions, value) of one spec item."""
    key, _, value = item.rpartition("=")
    if key in ("", "up", "down") and (value == "unlimited" or _RATE.fullmatch(value)):
        rate = None if value == "unlimited" else _read(_RATE, _RATE_UNITS, value)
        return (f"{key}_bit_s" if key else "rate"), rate
    if key in ("", "rtt") and _TIME.fullmatch(value):
        return "rtt_s", _read(_TIME, _TIME_UNITS, value)
    raise NetcommConfigError(
        f"link spec {text!r}: {item!r} is neither a rate (100mbit) nor a time (50ms); {_SPEC_HELP}"
    )


def _read(pattern: re.Pattern[str], units: dict[str, float], value: str) -> float:
    number, unit = pattern.fullmatch(value).groups()  # type: ignore[union-attr]
    return float(number) * units[unit.lower()]


def _format_rate(bit_s: float | None) -> str:
    if bit_s is None:
        return "unlimited"
    for unit in ("gbit", "mbit", "kbit"):
        if bit_s >= _RATE_UNITS[unit]:
            return f"{bit_s / _RATE_UNITS[unit]:g}{unit}"
    return f"{bit_s:g}bit"


def _format_time(seconds: float) -> str:
    return f"{seconds * 1e3:g}ms"


class TokenBucket:
    """Paces bytes to ``rate`` bytes per second, allowing bursts of ``burst`` bytes.

    :meth:`take` reserves its bytes in call order (a reservation may run the bucket into
    debt) and sleeps until they are paid for, so any number of threads sharing one bucket
    get ``rate`` together. The default burst, 10 ms of traffic and at least 64 KiB, lets a
    proxy thread the machine did not schedule for a few milliseconds catch up, so that CPU
    load on the simulating machine does not narrow the simulated link.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(64 * 1024, rate / 100)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Block until ``nbytes`` may pass."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate
        if wait > 0:
            time.sleep(wait)


class Link:
    """One peer's link at run time; share it between all of that peer's proxies and storages.

    ``up`` and ``down`` are its two directions: call one with a byte count to wait until
    those bytes may pass; ``sent`` and ``received`` count the bytes that went each way.
    ``burst_bytes`` overrides the buckets' default burst (:class:`TokenBucket`), e.g. one
    packet for messages much smaller than 64 KiB that should still be paced.
    """

    def __init__(self, spec: LinkSpec, burst_bytes: float | None = None) -> None:
        self.spec = spec
        self.delay_s = spec.rtt_s / 2
        self.up = Direction(spec.up_bit_s, burst_bytes)
        self.down = Direction(spec.down_bit_s, burst_bytes)

    def __repr__(self) -> str:
        return f"Link({str(self.spec)!r})"

    @property
    def sent(self) -> int:
        return self.up.nbytes

    @property
    def received(self) -> int:
        return self.down.nbytes


class Direction:
    """One direction of a :class:`Link`: its bucket (none if unlimited) and byte count.

    ``chunk`` is how much a proxy reads at once: 2 ms of traffic within [16 KiB, 256 KiB].
    """

    def __init__(self, bit_s: float | None, burst_bytes: float | None = None) -> None:
        self.bucket = None if bit_s is None else TokenBucket(bit_s / 8, burst_bytes)
        self.chunk = (
            MAX_CHUNK if bit_s is None else int(min(MAX_CHUNK, max(MIN_CHUNK, bit_s / 4000)))
        )
        self.nbytes = 0
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> None:
        """Block until ``nbytes`` may pass."""
        if self.bucket is not None:
            self.bucket.take(nbytes)
        with self._lock:
            self.nbytes += nbytes


class LinkProxy:
    """A TCP proxy on 127.0.0.1 that carries every byte to and from ``upstream`` over ``link``.

    Args:
        upstream: ``http://127.0.0.1:PORT`` (loopback only) of the server to reach.
        link: the peer's :class:`Link` (share one between proxies of the same peer), or a
            :class:`LinkSpec` for a link of its own.

    Use ``proxy.url`` as the endpoint; start and stop it with :meth:`start` / :meth:`stop` or
    as a context manager.
    """

    def __init__(self, upstream: str, link: Link | LinkSpec) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
            raise NetcommConfigError(f"LinkProxy only forwards to loopback, got {upstream!r}")
        self.link = link if isinstance(link, Link) else Link(link)
        self._upstream = (parts.hostname, parts.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # how often the accept loop looks at `_stopped`
        self._stopped = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> LinkProxy:
        _spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stopped.set()
        with self._lock:
            for sock in (self._listener, *self._sockets):
                _shut(sock)
            self._sockets.clear()

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return
            try:
                server = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                client.close()
                continue
            self._open(client, server)

    def _open(self, client: socket.socket, server: socket.socket) -> None:
        for sock in (client, server):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._stopped.is_set():
                client.close()
                server.close()
                return
            self._sockets |= {client, server}
        ends = _Ends(lambda: self._close(client, server))
        _Pipe(client, server, self.link.up, self.link.delay_s, ends).start()
        _Pipe(server, client, self.link.down, self.link.delay_s, ends).start()

    def _close(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._sockets.discard(sock)
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Close ``sock``, waking any thread blocked on it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class _Ends:
    """Closes a proxied connection once both directions ended, or at once if one failed."""

    def __init__(self, close: Callable[[], None]) -> None:
        self._close = close
        self._count = 0
        self._lock = threading.Lock()

    def ended(self, *, failed: bool) -> None:
        with self._lock:
            self._count += 1
            done = failed or self._count == 2
        if done:
            self._close()


class _Pipe:
    """One direction of one proxied connection: bytes are read, paced, delayed and sent.

    Without a delay one thread does it all. With one, a reader paces the bytes into a queue
    and a writer sends each ``delay_s`` after it passed; the queue holds at most what the
    link carries in ``delay_s`` (the reader waits on the bucket), the bandwidth-delay product.
    """

    def __init__(
        self, src: socket.socket, dst: socket.socket, way: Direction, delay_s: float, ends: _Ends
    ) -> None:
        self._src, self._dst, self._way, self._delay = src, dst, way, delay_s
        self._ends = ends
        self._queue: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def start(self) -> None:
        if self._delay:
            _spawn(self._read)
            _spawn(self._write)
        else:
            _spawn(self._relay)

    def _recv(self) -> bytes:
        """The next paced bytes, or ``b""`` at the end of the stream."""
        try:
            data = self._src.recv(self._way.chunk)
        except OSError:
            return b""
        if data:
            self._way(len(data))
        return data

    def _send(self, data: bytes) -> bool:
        """Pass ``data`` on (``b""``: the end of the stream); False once the pipe is done."""
        try:
            if not data:  # the sender finished: pass the end of stream on
                self._dst.shutdown(socket.SHUT_WR)
                self._ends.ended(failed=False)
                return False
            self._dst.sendall(data)
            return True
        except OSError:  # the other side went away: drop the whole connection
            self._ends.ended(failed=True)
            return False

    def _relay(self) -> None:
        while self._send(self._recv()):
            pass

    def _read(self) -> None:
        while True:
            data = self._recv()
            self._queue.put((time.monotonic() + self._delay, data))
            if not data:
                return

    def _write(self) -> None:
        while True:
            due, data = self._queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not self._send(data):
                return


def _spawn(target: Callable[[], None]) -> None:
    threading.Thread(target=target, daemon=True, name="netcomm-link").start()


class ShapedStorage:
    """A :class:`~netcomm.storage.Storage` whose calls take as long as ``link`` makes them.

    For backends without sockets (a local folder): each call waits one round trip, and the
    bytes it moves (``put`` up, ``get``/``get_range`` down) pass the link's bucket of their
    direction, so concurrent calls share the bandwidth. The bytes are the inner backend's;
    only their timing is the link's. ``head``, ``list`` and ``delete`` cost a round trip.
    """

    def __init__(self, inner: Storage, link: Link | LinkSpec) -> None:
        self.inner = inner
        self.link = link if isinstance(link, Link) else Link(link)

    def __repr__(self) -> str:
        return f"ShapedStorage({self.inner!r}, {self.link!r})"

    def put(self, key: str, data: bytes) -> None:
        self._round_trip()
        self.link.up(len(data))
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        self._round_trip()
        return self._fetched(self.inner.get(key))

    def get_range(self, key: str, start: int, end: int) -> Bytes:
        self._round_trip()
        return self._fetched(self.inner.get_range(key, start, end))

    def get_range_streamed(self, key: str, start: int, end: int, progress: Progress) -> Bytes:
        self._round_trip()
        return self._fetched(read_range(self.inner, key, start, end, progress))

    def head(self, key: str) -> ObjectInfo:
        self._round_trip()
        return self.inner.head(key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        self._round_trip()
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._round_trip()
        self.inner.delete(key)

    def _fetched(self, data: Bytes) -> Bytes:
        self.link.down(len(data))
        return data

    def _round_trip(self) -> None:
        if self.link.spec.rtt_s:
            time.sleep(self.link.spec.rtt_s)
