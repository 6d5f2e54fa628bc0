"""Reading an S3 response body straight from the socket into the caller's buffer.

botocore's ``StreamingBody.readinto`` goes through urllib3's ``HTTPResponse.readinto``, which
reads each chunk into a temporary ``bytes`` and then copies it into the buffer: a second pass
over every downloaded byte. The ``http.client`` response under both reads from the socket
into the buffer itself. :func:`read_into` reads through it when the body is the stack this was
written for (exactly botocore's ``StreamingBody``, not a subclass such as the checksumming one,
over urllib3's ``HTTPResponse`` over ``http.client.HTTPResponse``, nothing read yet, not
chunked; botocore asks urllib3 not to decode content encodings), then tells urllib3 and botocore
how many bytes were consumed, so that their own length checks (urllib3's ``IncompleteRead``,
botocore's content-length check) and the connection's return to the pool run as if they had
read the bytes themselves. Any other body is read through the public ``readinto``, with a
warning, once per reason, that says why; the bytes are the same either way.
"""

from __future__ import annotations

import functools
import http.client
import logging
from typing import Any

from netcomm.errors import TransientStorageError
from netcomm.storage import Progress, fill_buffer

_log = logging.getLogger(__name__)


def socket_response(body: Any) -> tuple[Any, http.client.HTTPResponse] | str:
    """``(urllib3 response, http.client response)`` under a botocore body, or why not."""
    from botocore.response import StreamingBody  # boto3 is an optional extra

    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if type(body) is not StreamingBody or not isinstance(fp, http.client.HTTPResponse):
        name = type(body).__name__
        return f"{name} is not botocore's StreamingBody over urllib3 over http.client"
    counters = (getattr(raw, "_fp_bytes_read", None), getattr(body, "_amount_read", None))
    if any(type(c) is not int for c in counters) or not hasattr(raw, "length_remaining"):
        return "urllib3's or botocore's read counters are not where this reader expects them"
    if any(counters):
        return "part of the body was already read"
    if fp.chunked:
        return "the response is chunked"
    return raw, fp


def read_into(body: Any, out: memoryview, progress: Progress | None, step: int) -> int:
    """Read a response body into ``out``, ``step`` bytes at most per call, telling
    ``progress`` of each chunk; returns the bytes read (fewer if the body ends first), or
    raises :class:`TransientStorageError` if the body holds more than ``out`` takes."""
    found = socket_response(body)
    if isinstance(found, str):
        _warn_copying(found)
        got = fill_buffer(body.readinto, out, progress, step)
    else:
        raw, fp = found
        try:
            got = fill_buffer(fp.readinto, out, progress, step)
        except BaseException:
            _drop(body)
            raise
        raw._fp_bytes_read += got
        if raw.length_remaining is not None:
            raw.length_remaining -= got
        body._amount_read += got
    # Past the end this reads nothing (and lets urllib3 and botocore check the length and
    # release the connection); a short body raises here, or is returned short.
    if body.read(1):
        _drop(body)  # bytes are left unread: the connection cannot serve another request
        raise TransientStorageError(f"response body is longer than the {len(out)} bytes expected")
    return got


def _drop(body: Any) -> None:
    """Close the connection under ``body`` and give its pool slot back, as urllib3 does
    after a failed read."""
    body.close()
    raw = getattr(body, "_raw_stream", None)
    if raw is not None and hasattr(raw, "release_conn"):
        raw.release_conn()


@functools.cache
def _warn_copying(reason: str) -> None:
    _log.warning(
        "netcomm.s3: reading response bodies through urllib3, one extra copy of every byte: %s",
        reason,
    )
