"""Who published an envelope: the Signer / Verifier protocols and their Ed25519 implementation.

A signer holds a private key and names its ``scheme``; a verifier checks a signature against a
public key for one scheme. Envelopes carry the scheme name, and the receiver looks the
publisher's public key up in the :class:`~netcomm.directory.PeerDirectory`, never in the
envelope itself. Another scheme (a Bittensor sr25519 hotkey) plugs in by providing a signer
and a verifier with a new ``scheme`` string.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ED25519 = "ed25519"


@runtime_checkable
class Signer(Protocol):
    """Signs envelopes on behalf of one publisher."""

    @property
    def scheme(self) -> str:
        """The signature scheme name written into envelopes (e.g. ``"ed25519"``)."""
        ...

    @property
    def public_key(self) -> bytes:
        """The raw public key others use to verify (published through the peer directory)."""
        ...

    def sign(self, message: bytes) -> bytes:
        """The signature of ``message``."""
        ...


@runtime_checkable
class Verifier(Protocol):
    """Checks signatures of one scheme."""

    @property
    def scheme(self) -> str:
        """The scheme name this verifier handles."""
        ...

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is a valid signature of ``message`` by ``public_key``."""
        ...


class Ed25519Signer:
    """An Ed25519 private key (RFC 8032) through ``cryptography``.

    Build one with :meth:`generate`, :meth:`from_seed` (32 secret bytes) or from an existing
    ``Ed25519PrivateKey``.
    """

    scheme = ED25519

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Ed25519Signer:
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_key(self) -> bytes:
        return self._public

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


class Ed25519Verifier:
    """Verifies Ed25519 signatures against 32-byte raw public keys."""

    scheme = ED25519

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        if len(public_key) != 32 or len(signature) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


def default_verifiers() -> dict[str, Verifier]:
    """The verifiers known without configuration: Ed25519."""
    return {ED25519: Ed25519Verifier()}
