"""Chain commitments that say where a node's bucket is, and how to read it.

A Bittensor commitment holds at most 128 bytes. Templar's text format (account id + read key
id + read secret, 32+32+64 characters) already fills it, leaving no room for a signing key.
This format packs the same facts into bytes and writes them in Base85 (5 characters per 4
bytes, all printable ASCII):

=========  ============================================================================
byte 0     format version (1)
byte 1     flags: bit 0 s3 (else local), bit 1 validator (else miner), bits 2-3 endpoint
           (0 AWS default, 1 R2 account, 2 URL), bit 4 region, bit 5 prefix,
           bit 6 read credentials
16 bytes   the first 16 bytes of SHA-256 of the node's Ed25519 public key
endpoint   R2: the 16-byte account id (from ``https://<32 hex>.r2.cloudflarestorage.com``);
           URL: a string field
strings    [region], bucket (s3 only), [prefix], [read key id, read secret]
=========  ============================================================================

A string field is one tag byte (bit 7: the string is lower-case hex stored as bytes; bits
0-6: stored length) and the bytes. R2 keys are hex, so an R2 commitment with a 32-character
bucket name is 101 bytes = 127 characters. The full public key (32 bytes) does not fit next to
the credentials; it is in ``identity.json`` in the node's own storage, which only the owner
can write, and the reader accepts it only when its hash matches the digest on chain and it
names the committing hotkey.

A local commitment stores only the prefix: every node of a local run names the same shared
folder in its own config.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gauntlet import MAX_COMMITMENT_BYTES
from netcomm import validate_key
from netcomm.signing import ED25519
from subnet.config import NodeConfigError, Secret, StorageConfig

FORMAT_VERSION = 1
DIGEST_BYTES = 16
IDENTITY_KEY = "identity.json"
IDENTITY_FORMAT = "sparseloco.identity"

_S3, _VALIDATOR, _REGION, _PREFIX, _CREDS = 0x01, 0x02, 0x10, 0x20, 0x40
_ENDPOINT_SHIFT = 2
_ENDPOINT_NONE, _ENDPOINT_R2, _ENDPOINT_URL = 0, 1, 2
_R2 = re.compile(r"^https://([0-9a-f]{32})\.r2\.cloudflarestorage\.com/?$")
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")


class CommitmentError(ValueError):
    """A commitment cannot be encoded (too long) or decoded (malformed)."""


@dataclass(frozen=True)
class Locator:
    """Where one node's storage is and how others read it (what its commitment says).

    Attributes:
        kind: ``"local"`` or ``"s3"``.
        role: ``"miner"`` or ``"validator"``.
        key_digest: first 16 bytes of SHA-256 of the node's Ed25519 public key.
        prefix: the node's sub-folder of the shared root (local) or key prefix (s3).
        bucket / endpoint_url / region: s3 only; ``""`` endpoint = AWS.
        read_access_key_id / read_secret_access_key: s3 read-only credentials (public by
            design: everyone must be able to download).
    """

    kind: Literal["local", "s3"]
    role: Literal["miner", "validator"]
    key_digest: bytes = field(repr=False)
    prefix: str = ""
    bucket: str = ""
    endpoint_url: str = ""
    region: str = ""
    read_access_key_id: str = ""
    read_secret_access_key: Secret | None = None

    def __post_init__(self) -> None:
        if len(self.key_digest) != DIGEST_BYTES:
            raise CommitmentError(f"key_digest must be {DIGEST_BYTES} bytes")
        if self.prefix:
            validate_key(self.prefix)
        if self.kind == "local" and not self.prefix:
            raise CommitmentError("a local locator needs a prefix (its folder in the shared root)")
        if self.kind == "s3" and not self.bucket:
            raise CommitmentError("an s3 locator needs a bucket")
        if bool(self.read_access_key_id) != (self.read_secret_access_key is not None):
            raise CommitmentError("read_access_key_id and read_secret_access_key go together")


def key_digest(public_key: bytes) -> bytes:
    """The public-key digest written into a commitment."""
    return hashlib.sha256(public_key).digest()[:DIGEST_BYTES]


def locator_for(
    cfg: StorageConfig, role: Literal["miner", "validator"], prefix: str, public_key: bytes
) -> Locator:
    """The locator a node with storage ``cfg`` (working under ``prefix``) commits."""
    return Locator(
        kind=cfg.kind,
        role=role,
        key_digest=key_digest(public_key),
        prefix=prefix,
        bucket=cfg.bucket if cfg.kind == "s3" else "",
        endpoint_url=cfg.endpoint_url if cfg.kind == "s3" else "",
        region=cfg.region if cfg.kind == "s3" else "",
        read_access_key_id=cfg.read_access_key_id,
        read_secret_access_key=cfg.read_secret_access_key,
    )


def _put_string(out: bytearray, value: str, what: str) -> None:
    hexed = bool(_HEX.match(value))
    data = bytes.fromhex(value) if hexed else value.encode("utf-8")
    if len(data) > 0x7F:
        raise CommitmentError(f"{what} is {len(data)} bytes; a commitment field holds 127")
    out.append((0x80 if hexed else 0) | len(data))
    out += data


def encode_commitment(loc: Locator) -> str:
    """The commitment text of ``loc``; raises :class:`CommitmentError` when it exceeds 128 bytes."""
    flags = (_S3 if loc.kind == "s3" else 0) | (_VALIDATOR if loc.role == "validator" else 0)
    out = bytearray()
    endpoint = _ENDPOINT_NONE
    if loc.kind == "s3" and loc.endpoint_url:
        r2 = _R2.match(loc.endpoint_url)
        endpoint = _ENDPOINT_R2 if r2 else _ENDPOINT_URL
        if r2:
            out += bytes.fromhex(r2.group(1))
        else:
            _put_string(out, loc.endpoint_url, "endpoint_url")
    flags |= endpoint << _ENDPOINT_SHIFT
    if loc.kind == "s3":
        if loc.region:
            flags |= _REGION
            _put_string(out, loc.region, "region")
        _put_string(out, loc.bucket, "bucket")
    if loc.prefix:
        flags |= _PREFIX
        _put_string(out, loc.prefix, "prefix")
    if loc.read_secret_access_key is not None:
        flags |= _CREDS
        _put_string(out, loc.read_access_key_id, "read_access_key_id")
        _put_string(out, loc.read_secret_access_key.reveal(), "read_secret_access_key")
    body = bytes([FORMAT_VERSION, flags]) + loc.key_digest + bytes(out)
    text = base64.b85encode(body).decode("ascii")
    if len(text) > MAX_COMMITMENT_BYTES:
        raise CommitmentError(
            f"the commitment would be {len(text)} bytes; the chain takes {MAX_COMMITMENT_BYTES}. "
            f"Shorten the bucket name, prefix or endpoint ({len(body)} packed bytes; at most "
            f"{MAX_COMMITMENT_BYTES * 4 // 5})"
        )
    return text


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CommitmentError("commitment is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self) -> str:
        tag = self.take(1)[0]
        raw = self.take(tag & 0x7F)
        if tag & 0x80:
            return raw.hex()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommitmentError("commitment holds a string that is not UTF-8") from None


def decode_commitment(text: str) -> Locator:
    """Parse a commitment; raises :class:`CommitmentError` for anything malformed."""
    if not isinstance(text, str) or len(text.encode("utf-8")) > MAX_COMMITMENT_BYTES:
        raise CommitmentError("commitment is not a string of at most 128 bytes")
    try:
        body = base64.b85decode(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, binascii.Error):
        raise CommitmentError("commitment is not Base85") from None
    r = _Reader(body)
    version, flags = r.take(2)
    if version != FORMAT_VERSION:
        raise CommitmentError(f"commitment format {version} is not {FORMAT_VERSION}")
    digest = r.take(DIGEST_BYTES)
    s3 = bool(flags & _S3)
    endpoint_mode = (flags >> _ENDPOINT_SHIFT) & 0x3
    local_only_bad = not s3 and (endpoint_mode or flags & _REGION)
    if flags & 0x80 or endpoint_mode > _ENDPOINT_URL or local_only_bad:
        raise CommitmentError("commitment has unknown flags")
    endpoint = ""
    if endpoint_mode == _ENDPOINT_R2:
        endpoint = f"https://{r.take(16).hex()}.r2.cloudflarestorage.com"
    elif endpoint_mode == _ENDPOINT_URL:
        endpoint = r.string()
    region = r.string() if flags & _REGION else ""
    bucket = r.string() if s3 else ""
    prefix = r.string() if flags & _PREFIX else ""
    key_id, secret = "", None
    if flags & _CREDS:
        key_id = r.string()
        secret = Secret(r.string())
    if r.pos != len(body):
        raise CommitmentError("commitment has trailing bytes")
    try:
        return Locator(
            kind="s3" if s3 else "local",
            role="validator" if flags & _VALIDATOR else "miner",
            key_digest=digest,
            prefix=prefix,
            bucket=bucket,
            endpoint_url=endpoint,
            region=region,
            read_access_key_id=key_id,
            read_secret_access_key=secret,
        )
    except (ValueError, NodeConfigError) as exc:
        raise CommitmentError(f"commitment is inconsistent: {exc}") from None


def identity_document(hotkey: str, public_key: bytes) -> bytes:
    """The ``identity.json`` a node writes into its own storage."""
    doc = {
        "format": IDENTITY_FORMAT,
        "version": FORMAT_VERSION,
        "hotkey": hotkey,
        "scheme": ED25519,
        "public_key": public_key.hex(),
    }
    return json.dumps(doc, sort_keys=True).encode()


def verify_identity(data: bytes, hotkey: str, digest: bytes) -> bytes:
    """The public key of an ``identity.json``, checked against the hotkey and on-chain digest."""
    try:
        doc: Mapping[str, Any] = json.loads(data)
        ok = doc["format"] == IDENTITY_FORMAT and doc["version"] == FORMAT_VERSION
        public_key = bytes.fromhex(doc["public_key"])
    except (ValueError, KeyError, TypeError):
        raise CommitmentError("identity.json is malformed") from None
    if not ok or doc.get("scheme") != ED25519 or len(public_key) != 32:
        raise CommitmentError("identity.json has an unsupported format or scheme")
    if doc.get("hotkey") != hotkey:
        raise CommitmentError(f"identity.json names {doc.get('hotkey')!r}, not {hotkey!r}")
    if key_digest(public_key) != digest:
        raise CommitmentError("identity.json's public key does not match the committed digest")
    return public_key
