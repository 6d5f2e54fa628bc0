"""A node's own storage (write access) and the storage of a peer it reads (from its locator)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from netcomm import LocalStorage, S3Config, S3Storage, Storage
from subnet.commitments import Locator
from subnet.config import StorageConfig


def own_prefix(cfg: StorageConfig, hotkey: str) -> str:
    """Where a node works: its configured prefix; local nodes default to their hotkey."""
    if cfg.prefix:
        return cfg.prefix
    return hotkey if cfg.kind == "local" else ""


def open_own_storage(
    cfg: StorageConfig, hotkey: str, s3_options: Mapping[str, Any] | None = None
) -> Storage:
    """The node's own storage, with its write credentials (or boto3's default chain).

    ``s3_options`` are extra :class:`~netcomm.S3Config` fields (timeouts, retries).
    """
    prefix = own_prefix(cfg, hotkey)
    if cfg.kind == "local":
        return LocalStorage(Path(cfg.root) / prefix)
    return S3Storage(
        S3Config(
            bucket=cfg.bucket,
            endpoint_url=cfg.endpoint_url or None,
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
    loc: Locator, local_root: str | Path, s3_options: Mapping[str, Any] | None = None
) -> Storage:
    """Read access to the node described by ``loc``.

    Local locators resolve inside this node's own shared ``local_root`` (the locator's
    prefix was checked against traversal when it was decoded).
    """
    if loc.kind == "local":
        return LocalStorage(Path(local_root) / loc.prefix)
    secret = loc.read_secret_access_key
    return S3Storage(
        S3Config(
            bucket=loc.bucket,
            endpoint_url=loc.endpoint_url or None,
            region=loc.region or _default_region(loc.endpoint_url),
            access_key_id=loc.read_access_key_id or None,
            secret_access_key=secret.reveal() if secret is not None else None,
            prefix=loc.prefix,
            **dict(s3_options or {}),
        )
    )


def _default_region(endpoint_url: str) -> str:
    return "auto" if ".r2.cloudflarestorage.com" in endpoint_url else "us-east-1"
