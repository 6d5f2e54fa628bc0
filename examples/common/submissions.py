"""Signed submissions: a small signed JSON record in object storage, keyed by arrival block.

A miner publishes its public key once as its chain commitment (``ed25519:<hex>``, 72 bytes,
under the chain's 128-byte limit), then writes submissions to the challenge's bucket. Each
record is canonical JSON ``{"block", "body", "challenge", "hotkey", "scheme"}`` plus a
signature over ``SIGNING_CONTEXT + canonical JSON``; the context keeps a submission's signature
from being replayed as any other signed message (netcomm envelopes use their own context).

The validator lists the bucket, opens every record against the key the chain holds for the
hotkey the record names, and orders accepted submissions by (block, hotkey): the block is what
decides who was first when two submissions are near-duplicates, so it is part of the signed
record and also of the storage key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gauntlet import Chain, InMemorySubnet
from netcomm import Ed25519Signer, Signer, Storage, Verifier, default_verifiers, join_key

SIGNING_CONTEXT = b"examples/submission/v1\x00"
KEY_PREFIX = "ed25519:"


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes both sides sign and verify."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Submission:
    """A verified submission."""

    challenge: str
    hotkey: str
    block: int
    body: dict[str, Any]
    key: str


@dataclass(frozen=True)
class Rejected:
    """A record the validator could not accept, and why."""

    key: str
    hotkey: str
    reason: str


def demo_signer(hotkey: str) -> Ed25519Signer:
    """A key derived from the hotkey's name, so the demos are reproducible.

    Real miners use ``Ed25519Signer.generate()`` and keep the key secret; anyone can derive
    these.
    """
    return Ed25519Signer.from_seed(canonical_json(["demo-key", hotkey]).ljust(32, b"\0")[:32])


def register_miner(subnet: InMemorySubnet, hotkey: str, signer: Signer) -> int:
    """Register ``hotkey`` and publish its public key as its commitment; returns its uid."""
    uid = subnet.register(hotkey)
    subnet.connect(hotkey).commit(KEY_PREFIX + signer.public_key.hex())
    return uid


def seal_submission(
    challenge: str, hotkey: str, block: int, body: Mapping[str, Any], signer: Signer
) -> bytes:
    """The signed record of ``body`` (JSON values only)."""
    record = {
        "block": int(block),
        "body": dict(body),
        "challenge": challenge,
        "hotkey": hotkey,
        "scheme": signer.scheme,
    }
    signature = signer.sign(SIGNING_CONTEXT + canonical_json(record))
    return canonical_json({"record": record, "signature": signature.hex()})


def open_submission(
    blob: bytes, public_keys: Mapping[str, bytes], verifiers: Mapping[str, Verifier]
) -> dict[str, Any]:
    """The record inside ``blob`` if its signature verifies; raises ``ValueError`` if not."""
    try:
        outer = json.loads(blob)
        record, signature = outer["record"], bytes.fromhex(outer["signature"])
        hotkey, scheme = record["hotkey"], record["scheme"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed record: {exc}") from exc
    if hotkey not in public_keys:
        raise ValueError(f"no public key committed for hotkey {hotkey!r}")
    verifier = verifiers.get(scheme)
    if verifier is None:
        raise ValueError(f"unknown signature scheme {scheme!r}")
    if not verifier.verify(
        public_keys[hotkey], SIGNING_CONTEXT + canonical_json(record), signature
    ):
        raise ValueError("bad signature")
    return record


class SubmissionBox:
    """One challenge's submissions in a :class:`netcomm.Storage` bucket.

    Args:
        storage: the bucket (``netcomm.LocalStorage`` in the demos).
        challenge: the challenge name; also the key prefix.
    """

    def __init__(self, storage: Storage, challenge: str) -> None:
        self.storage = storage
        self.challenge = challenge

    def submit(self, hotkey: str, block: int, body: Mapping[str, Any], signer: Signer) -> str:
        """Sign and store ``body`` as ``hotkey`` at ``block``; returns the object key."""
        key = join_key(self.challenge, f"{int(block):010d}-{hotkey}.json")
        self.storage.put(key, seal_submission(self.challenge, hotkey, block, body, signer))
        return key

    def collect(self, chain: Chain) -> tuple[list[Submission], list[Rejected]]:
        """Every verified submission in (block, hotkey) order, and the rejected records."""
        public_keys = {
            hk: bytes.fromhex(c.removeprefix(KEY_PREFIX))
            for hk, c in chain.get_all_commitments().items()
            if c.startswith(KEY_PREFIX)
        }
        verifiers = default_verifiers()
        accepted: list[Submission] = []
        rejected: list[Rejected] = []
        for info in self.storage.list(self.challenge + "/"):
            block_text, _, named = info.key.rsplit("/", 1)[-1].removesuffix(".json").partition("-")
            try:
                record = open_submission(self.storage.get(info.key), public_keys, verifiers)
            except ValueError as exc:
                rejected.append(Rejected(info.key, named, str(exc)))
                continue
            if (record["challenge"], record["hotkey"], str(record["block"]).zfill(10)) != (
                self.challenge,
                named,
                block_text,
            ):
                # a valid record copied under another miner's key or into another challenge
                rejected.append(Rejected(info.key, named, "record does not match its key"))
                continue
            accepted.append(
                Submission(
                    self.challenge, record["hotkey"], record["block"], record["body"], info.key
                )
            )
        accepted.sort(key=lambda s: (s.block, s.hotkey))
        return accepted, rejected
