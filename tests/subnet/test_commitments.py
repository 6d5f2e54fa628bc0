"""The commitment format: round trips, the 128-byte limit, malformed input, identities."""

from __future__ import annotations

import base64

import pytest

from gauntlet import MAX_COMMITMENT_BYTES
from subnet import CommitmentError, Locator, Secret, decode_commitment, encode_commitment
from subnet.commitments import identity_document, key_digest, verify_identity

PUBLIC_KEY = bytes(range(32))
ACCOUNT = "0123456789abcdef0123456789abcdef"


def r2_locator(bucket: str = ACCOUNT, **changes) -> Locator:
    fields = dict(
        kind="s3",
        role="miner",
        key_digest=key_digest(PUBLIC_KEY),
        bucket=bucket,
        endpoint_url=f"https://{ACCOUNT}.r2.cloudflarestorage.com",
        region="auto",
        read_access_key_id="f" * 32,
        read_secret_access_key=Secret("e" * 64),
    )
    fields.update(changes)
    return Locator(**fields)


def test_templar_sized_r2_commitment_fits():
    """R2 account, 32-character bucket, 32+64-character read keys and a key digest."""
    loc = r2_locator(region="")
    text = encode_commitment(loc)
    assert len(text) == 127 and text.isascii() and " " not in text
    assert decode_commitment(text) == loc
    assert decode_commitment(text).region == ""


@pytest.mark.parametrize(
    "loc",
    [
        r2_locator(bucket="sl-miner-1", prefix="run-7", region="", role="validator"),
        Locator(
            "s3", "miner", key_digest(PUBLIC_KEY), bucket="b", endpoint_url="http://127.0.0.1:9000"
        ),
        Locator(
            "s3",
            "miner",
            key_digest(PUBLIC_KEY),
            bucket="my-bucket",
            region="eu-west-1",
            read_access_key_id="AKIAIOSFODNN7EXAMPLE",
            read_secret_access_key=Secret("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        ),
        Locator("local", "validator", key_digest(PUBLIC_KEY), prefix="validator"),
    ],
)
def test_round_trip(loc):
    text = encode_commitment(loc)
    assert len(text.encode()) <= MAX_COMMITMENT_BYTES
    assert decode_commitment(text) == loc


def test_too_long_says_what_to_shorten():
    with pytest.raises(CommitmentError, match=r"would be 1[3-9][0-9] bytes.*Shorten the bucket"):
        encode_commitment(r2_locator(bucket="a-rather-long-bucket-name-for-r2"))


def test_locators_check_their_fields():
    with pytest.raises(CommitmentError, match="needs a prefix"):
        Locator("local", "miner", key_digest(PUBLIC_KEY))
    with pytest.raises(CommitmentError, match="go together"):
        r2_locator(read_secret_access_key=None)
    with pytest.raises(ValueError, match="invalid segment"):
        Locator("local", "miner", key_digest(PUBLIC_KEY), prefix="../elsewhere")


def _raw(body: bytes) -> str:
    return base64.b85encode(body).decode()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not base85 \u00e9", "not Base85|not a string"),
        ("x" * 129, "at most 128"),
        (_raw(b"\x02\x00" + bytes(16)), "format 2"),
        (_raw(b"\x01\x00" + bytes(10)), "truncated"),
        (_raw(b"\x01\x80" + bytes(16)), "unknown flags"),
        (_raw(b"\x01\x04" + bytes(16)), "unknown flags"),  # R2 endpoint on a local locator
        (_raw(b"\x01\x20" + bytes(16) + b"\x01a" + b"zz"), "trailing"),
        (_raw(b"\x01\x20" + bytes(16) + b"\x02.."), "inconsistent"),
        (_raw(b"\x01\x01" + bytes(16) + b"\x02\xff\xfe"), "not UTF-8"),
        (_raw(b"\x01\x00" + bytes(16)), "needs a prefix"),
    ],
)
def test_malformed_commitments_are_rejected(text, reason):
    with pytest.raises(CommitmentError, match=reason):
        decode_commitment(text)


def test_identity_binds_key_to_hotkey_and_digest():
    doc = identity_document("hk", PUBLIC_KEY)
    assert verify_identity(doc, "hk", key_digest(PUBLIC_KEY)) == PUBLIC_KEY
    with pytest.raises(CommitmentError, match="names 'hk', not 'other'"):
        verify_identity(doc, "other", key_digest(PUBLIC_KEY))
    with pytest.raises(CommitmentError, match="does not match the committed digest"):
        verify_identity(doc, "hk", key_digest(bytes(32)))
    with pytest.raises(CommitmentError, match="malformed"):
        verify_identity(b"{not json", "hk", key_digest(PUBLIC_KEY))
