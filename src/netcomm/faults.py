"""Fault injection for testing deployments: a storage wrapper and a loopback HTTP proxy.

Both draw one random number per eligible request and inject at most one fault, with the
probabilities of a :class:`FaultPlan`. :class:`FaultyStorage` wraps any backend (no network
needed); :class:`FaultProxy` sits between an S3 client and an S3-compatible server on
127.0.0.1 and breaks real HTTP exchanges (dropped connections, 503s, slow responses, bodies
cut short or with flipped bytes).
"""

from __future__ import annotations

import http.client
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from netcomm.errors import NetcommConfigError, TransientStorageError
from netcomm.storage import Bytes, ObjectInfo, Storage

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass(frozen=True)
class FaultPlan:
    """Probabilities of each fault per eligible request (their sum must be at most 1).

    Args:
        drop: the connection fails (proxy: closed without a response).
        server_error: the server answers 503 (storage wrapper: a transient error).
        slow: the response is delayed by ``delay_s``.
        truncate: the body is cut to half its length (proxy: after a full Content-Length).
        corrupt: one byte of the body is flipped.
        delay_s: the delay of a slow response.
        methods: HTTP methods eligible (proxy); the wrapper affects reads (get, ranged get,
            head; truncation and corruption only apply to bodies).
        only: when set, only requests whose key or path contains this string are eligible.
        seed: seed of the random draws.
    """

    drop: float = 0.0
    server_error: float = 0.0
    slow: float = 0.0
    truncate: float = 0.0
    corrupt: float = 0.0
    delay_s: float = 1.0
    methods: frozenset[str] = frozenset({"GET"})
    only: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (self.drop, self.server_error, self.slow, self.truncate, self.corrupt)
        if any(r < 0 for r in rates) or sum(rates) > 1.0 + 1e-9:
            raise NetcommConfigError("FaultPlan rates must be >= 0 and sum to at most 1")
        if self.delay_s < 0:
            raise NetcommConfigError("FaultPlan.delay_s must be >= 0")


class _Dice:
    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()
        self.injected: Counter[str] = Counter()

    def roll(self, target: str) -> str | None:
        plan = self.plan
        if plan.only is not None and plan.only not in target:
            return None
        with self._lock:
            r = self._rng.random()
            position = self._rng.random()
        for name in ("drop", "server_error", "slow", "truncate", "corrupt"):
            r -= getattr(plan, name)
            if r < 0:
                with self._lock:
                    self.injected[name] += 1
                return name if name != "corrupt" else f"corrupt:{position}"
        return None


def _flip(data: Bytes, spec: str) -> Bytes:
    if not data:
        return data
    pos = int(float(spec.split(":", 1)[1]) * len(data))
    out = bytearray(data)
    out[pos] ^= 0xFF
    return bytes(out)


class FaultyStorage:
    """A :class:`~netcomm.storage.Storage` that injects faults into another one's reads.

    ``injected`` counts the faults by kind.
    """

    def __init__(self, inner: Storage, plan: FaultPlan) -> None:
        self.inner = inner
        self._dice = _Dice(plan)

    @property
    def injected(self) -> Counter[str]:
        return self._dice.injected

    def _before(self, key: str) -> str | None:
        fault = self._dice.roll(key)
        if fault == "drop":
            raise TransientStorageError(f"injected connection error reading {key!r}")
        if fault == "server_error":
            raise TransientStorageError(f"injected HTTP 503 reading {key!r}")
        if fault == "slow":
            time.sleep(self._dice.plan.delay_s)
        return fault

    @staticmethod
    def _after(fault: str | None, data: Bytes) -> Bytes:
        if fault == "truncate":
            return data[: len(data) // 2]
        if fault and fault.startswith("corrupt"):
            return _flip(data, fault)
        return data

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        fault = self._before(key)
        return bytes(self._after(fault, self.inner.get(key)))

    def get_range(self, key: str, start: int, end: int) -> Bytes:
        fault = self._before(key)
        return self._after(fault, self.inner.get_range(key, start, end))

    def head(self, key: str) -> ObjectInfo:
        self._before(key)
        return self.inner.head(key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client went away (a killed process, a reset keep-alive connection)
        super().handle_error(request, client_address)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that forwards to ``upstream`` and injects faults.

    Use ``proxy.url`` as the S3 endpoint. ``injected`` counts the faults by kind. Start and
    stop it with :meth:`start` / :meth:`stop` or as a context manager.
    """

    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
            raise NetcommConfigError(f"FaultProxy only forwards to loopback, got {upstream!r}")
        self.plan = plan
        self._upstream = (parts.hostname, parts.port)
        self._dice = _Dice(plan)
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def injected(self) -> Counter[str]:
        return self._dice.injected

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _forward(self) -> None:
                body = self._body()
                fault = None
                if self.command in proxy.plan.methods:
                    fault = proxy._dice.roll(self.path)
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault == "server_error":
                    self._reply(
                        503,
                        [("Content-Type", "application/xml")],
                        b"<Error><Code>ServiceUnavailable</Code>"
                        b"<Message>injected</Message></Error>",
                    )
                    return
                if fault == "slow":
                    time.sleep(proxy.plan.delay_s)
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                try:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in ("transfer-encoding", "content-length")
                    }
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, resp_headers = resp.status, resp.getheaders()
                finally:
                    conn.close()
                if self.command == "HEAD":
                    self.send_response(status)
                    for k, v in resp_headers:
                        if k.lower() not in _HOP_HEADERS - {"content-length"}:
                            self.send_header(k, v)
                    self.end_headers()
                    return
                if fault == "truncate" and data:
                    self.send_response(status)
                    self._headers(resp_headers, len(data))
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if fault and fault.startswith("corrupt"):
                    data = _flip(data, fault)
                self._reply(status, resp_headers, data)

            def _headers(self, headers: list[tuple[str, str]], length: int) -> None:
                for k, v in headers:
                    if k.lower() not in _HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                self._headers(headers, len(data))
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
