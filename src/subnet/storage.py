"""A node's own storage (write access) and the storage of a peer it reads (from its locator),
both through the node's modelled network link when ``exchange.link`` is set."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from netcomm import (
    Link,
    LinkProxy,
    LocalStorage,
    S3Config,
    S3Storage,
    ShapedStorage,
    Storage,
    parse_link,
)
from subnet.commitments import Locator
from subnet.config import NodeConfigError, StorageConfig


class NodeLink:
    """A node's modelled link: one :class:`netcomm.Link` shared by all its storage traffic,
    with one :class:`netcomm.LinkProxy` per S3 endpoint it talks to (started on first use).

    Args:
        spec: :func:`netcomm.parse_link` text; ``""`` = no shaping.
    """

    def __init__(self, spec: str) -> None:
        self.link = Link(parse_link(spec)) if spec else None
        self._proxies: dict[str, LinkProxy] = {}
        self._lock = threading.Lock()

    def endpoint(self, url: str) -> str:
        """``url``, or the local proxy that carries its bytes over the link."""
        if self.link is None or not url:
            if self.link is not None:
                raise NodeConfigError(
                    "exchange.link shapes S3 traffic through a loopback proxy: give "
                    "storage.endpoint_url (a loopback S3 server)"
                )
            return url
        with self._lock:
            if url not in self._proxies:
                try:
                    self._proxies[url] = LinkProxy(url, self.link).start()
                except ValueError as exc:
                    raise NodeConfigError(f"exchange.link: {exc}") from None
            return self._proxies[url].url

    def local(self, storage: Storage) -> Storage:
        return storage if self.link is None else ShapedStorage(storage, self.link)

    def close(self) -> None:
        with self._lock:
            for proxy in self._proxies.values():
                proxy.stop()
            self._proxies.clear()


NO_LINK = NodeLink("")


def own_prefix(cfg: StorageConfig, hotkey: str) -> str:
    """Where a node works: its configured prefix; local nodes default to their hotkey."""
    if cfg.prefix:
        return cfg.prefix
    return hotkey if cfg.kind == "local" else ""


def open_own_storage(
    cfg: StorageConfig,
    hotkey: str,
    s3_options: Mapping[str, Any] | None = None,
    link: NodeLink = NO_LINK,
) -> Storage:
    """The node's own storage, with its write credentials (or boto3's default chain).

    ``s3_options`` are extra :class:`~netcomm.S3Config` fields (timeouts, retries).
    """
    prefix = own_prefix(cfg, hotkey)
    if cfg.kind == "local":
        return link.local(LocalStorage(Path(cfg.root) / prefix))
    return S3Storage(
        S3Config(
            bucket=cfg.bucket,
            endpoint_url=link.endpoint(cfg.endpoint_url) or None,
            region=cfg.region or _default_region(cfg.endpoint_url),
            access_key_id=cfg.access_key_id or None,
            secret_access_key=(
                cfg.secret_access_key.reveal() if cfg.secret_access_key is not None else None
            ),
            prefix=prefix,
            **dict(s3_options or {}),
        )
    )


def open_peer_storage(
    loc: Locator,
    local_root: str | Path,
    s3_options: Mapping[str, Any] | None = None,
    link: NodeLink = NO_LINK,
) -> Storage:
    """Read access to the node described by ``loc``.

    Local locators resolve inside this node's own shared ``local_root`` (the locator's
    prefix was checked against traversal when it was decoded).
    """
    if loc.kind == "local":
        return link.local(LocalStorage(Path(local_root) / loc.prefix))
    secret = loc.read_secret_access_key
    return S3Storage(
        S3Config(
            bucket=loc.bucket,
            endpoint_url=link.endpoint(loc.endpoint_url) or None,
            region=loc.region or _default_region(loc.endpoint_url),
            access_key_id=loc.read_access_key_id or None,
            secret_access_key=secret.reveal() if secret is not None else None,
            prefix=loc.prefix,
            **dict(s3_options or {}),
        )
    )


def _default_region(endpoint_url: str) -> str:
    return "auto" if ".r2.cloudflarestorage.com" in endpoint_url else "us-east-1"
