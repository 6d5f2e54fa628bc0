"""Reading S3 response bodies into the caller's buffer, with the installed botocore and urllib3
against the loopback server."""

from __future__ import annotations

import io
import logging
import os

import pytest

from netcomm import TransientStorageError
from netcomm.s3_body import read_into, socket_response


def _response(storage, key: str):
    return storage._client.get_object(Bucket=storage.config.bucket, Key=storage._full(key))


def test_the_installed_sdk_is_read_from_the_socket_and_left_consistent(s3_factory, caplog):
    storage = s3_factory()
    data = os.urandom((3 << 20) + 5)
    storage.put("k", data)
    resp = _response(storage, "k")
    body = resp["Body"]
    found = socket_response(body)
    assert not isinstance(found, str), found  # the SDK's internals moved: see s3_body.py
    raw, _ = found
    out = memoryview(bytearray(len(data)))
    told = bytearray()
    with caplog.at_level(logging.WARNING, logger="netcomm.s3_body"):
        got = read_into(body, out, lambda at, chunk: told.extend(chunk), step=1 << 20)
    assert got == len(data) and out == data == told
    assert not caplog.records
    # urllib3 and botocore saw every byte: lengths agree and the connection went back
    assert raw.length_remaining == 0 and body._amount_read == len(data)
    assert raw.connection is None


def test_a_body_longer_than_the_buffer_is_transient_and_drops_its_connection(s3_factory):
    storage = s3_factory()
    storage.put("k", b"0123456789")
    body = _response(storage, "k")["Body"]
    with pytest.raises(TransientStorageError, match="longer than the 9 bytes"):
        read_into(body, memoryview(bytearray(9)), None, step=4)
    assert body._raw_stream.closed and body._raw_stream.connection is None


def test_only_a_plain_unread_botocore_body_is_read_from_the_socket(s3_factory):
    from botocore.response import StreamingBody

    class ChecksummingBody(StreamingBody):
        """Like botocore's StreamingChecksumBody: it must see every byte itself."""

    storage = s3_factory()
    storage.put("k", b"0123456789")
    body = _response(storage, "k")["Body"]
    sub = ChecksummingBody(body._raw_stream, body._content_length)
    assert "ChecksummingBody is not" in socket_response(sub)
    body.read(2)
    assert socket_response(body) == "part of the body was already read"


def test_range_reads_stay_exact_across_many_requests(s3_factory, caplog):
    storage = s3_factory(download_part_size=1 << 20, max_concurrency=4)
    data = os.urandom((6 << 20) + 3)
    storage.put("big", data)
    with caplog.at_level(logging.WARNING, logger="netcomm.s3_body"):
        for start, end in [(0, len(data)), (7, 5 << 20), (len(data) - 1, len(data))] * 3:
            assert storage.get_range("big", start, end) == data[start:end]
    assert not caplog.records


class _OtherBody(io.BytesIO):
    """A body that is not botocore's stack: read through its own readinto."""


def test_another_body_is_read_through_its_readinto_and_says_why(caplog):
    out = memoryview(bytearray(6))
    with caplog.at_level(logging.WARNING, logger="netcomm.s3_body"):
        assert read_into(_OtherBody(b"abcdef"), out, None, step=4) == 6
    assert out == b"abcdef"
    assert "one extra copy" in caplog.text and "_OtherBody" in caplog.text
    short = memoryview(bytearray(8))
    assert read_into(_OtherBody(b"abc"), short, None, step=4) == 3
