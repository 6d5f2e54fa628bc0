"""An S3-compatible storage backend (AWS S3, Cloudflare R2, MinIO, ...) through boto3.

boto3 is imported when an :class:`S3Storage` is built, so ``import netcomm`` works without it
(install the ``s3`` extra). Large objects are uploaded as parallel multipart uploads and
downloaded as parallel ranged GETs; every request has connect/read timeouts and is retried on
transient failures (connection errors, timeouts, 5xx, 429/SlowDown, truncated bodies) with
capped exponential backoff and jitter. botocore's own retries are switched off so that
:class:`S3Config` is the single place that decides how long an operation may take.
"""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from netcomm.errors import (
    NetcommConfigError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from netcomm.s3_body import read_into
from netcomm.storage import ObjectInfo, Progress, fresh_buffer, join_key, validate_key

T = TypeVar("T")
_SESSION: Any = None
_SESSION_LOCK = threading.Lock()
_MIB = 1 << 20
_READ_STEP = 4 * _MIB  # bytes read from a response (and told to ``progress``) per call
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
}


@dataclass(frozen=True)
class S3Config:
    """Where the bucket is and how to talk to it.

    Args:
        bucket: bucket name.
        endpoint_url: e.g. ``https://<account>.r2.cloudflarestorage.com`` for R2,
            ``http://127.0.0.1:9000`` for MinIO; ``None`` for AWS.
        region: region name (R2 accepts ``"auto"``).
        access_key_id / secret_access_key / session_token: credentials; when left ``None``
            boto3's default chain (environment, config files, instance role) is used.
        prefix: key prefix inside the bucket under which this storage works.
        addressing_style: ``"path"`` (MinIO, most self-hosted servers), ``"virtual"`` or
            ``"auto"``.
        multipart_threshold: objects larger than this are uploaded in parts.
        part_size: size of an upload part (S3 requires at least 5 MiB except the last).
        download_part_size: objects larger than this are downloaded as parallel ranged GETs
            of this size (one request per part; below it a single GET is faster).
        max_concurrency: parallel part uploads/downloads per storage object.
        connect_timeout_s / read_timeout_s: per-request socket timeouts.
        max_attempts: tries per request (1 = no retry).
        backoff_s / backoff_max_s: the n-th retry waits ``min(backoff_max_s, backoff_s·2ⁿ)``
            scaled by a random factor in [0.5, 1].
    """

    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    prefix: str = ""
    addressing_style: Literal["auto", "path", "virtual"] = "path"
    multipart_threshold: int = 32 * _MIB
    part_size: int = 16 * _MIB
    download_part_size: int = 32 * _MIB
    max_concurrency: int = 8
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_attempts: int = 4
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.bucket:
            raise NetcommConfigError("S3Config.bucket must name a bucket")
        if self.prefix:
            validate_key(self.prefix)
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise NetcommConfigError(
                f"S3Config.addressing_style must be 'auto', 'path' or 'virtual', "
                f"got {self.addressing_style!r}"
            )
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise NetcommConfigError(
                "S3Config needs both access_key_id and secret_access_key, or neither (to use "
                "boto3's default credential chain)"
            )
        if self.part_size < 5 * _MIB:
            raise NetcommConfigError(
                f"S3Config.part_size must be at least 5 MiB (S3's minimum part), got "
                f"{self.part_size}"
            )
        if self.download_part_size < _MIB:
            raise NetcommConfigError("S3Config.download_part_size must be at least 1 MiB")
        if self.multipart_threshold < self.part_size:
            raise NetcommConfigError(
                "S3Config.multipart_threshold must be at least part_size; raise the threshold"
            )
        for name in ("max_concurrency", "max_attempts"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise NetcommConfigError(f"S3Config.{name} must be an integer >= 1")
        for name in ("connect_timeout_s", "read_timeout_s", "backoff_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise NetcommConfigError(f"S3Config.{name} must be > 0 seconds")


class S3Storage:
    """A :class:`~netcomm.storage.Storage` on an S3-compatible bucket.

    Args:
        config: the bucket, endpoint, credentials and transfer settings.
        client: an existing boto3 S3 client to use instead of building one (its own timeout
            and retry settings then apply).

    Thread-safe; call :meth:`close` (or use it as a context manager) to stop its worker
    threads.
    """

    def __init__(self, config: S3Config, *, client: Any = None) -> None:
        import botocore.exceptions

        self.config = config
        self._exc = botocore.exceptions
        self._client = client if client is not None else self._make_client(config)
        self._pool = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="netcomm-s3")
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    @staticmethod
    def _make_client(config: S3Config) -> Any:
        import boto3
        from botocore.config import Config

        boto_config = Config(
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},
            # Gather threads times parallel parts share this pool.
            max_pool_connections=4 * config.max_concurrency,
            s3={"addressing_style": config.addressing_style},
            # botocore >= 1.36 adds CRC trailers by default, which R2 and older MinIO reject;
            # integrity is checked by the envelope's signed BLAKE3 digest instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        global _SESSION
        # One session per process: building it loads botocore's service models (~0.5 s), and
        # a validator builds a client per peer bucket. Sessions are not thread-safe, hence the
        # lock.
        with _SESSION_LOCK:
            if _SESSION is None:
                _SESSION = boto3.session.Session()
            return _SESSION.client(
                "s3",
                endpoint_url=config.endpoint_url,
                region_name=config.region,
                aws_access_key_id=config.access_key_id,
                aws_secret_access_key=config.secret_access_key,
                aws_session_token=config.session_token,
                config=boto_config,
            )

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.config.bucket!r}, endpoint={self.config.endpoint_url!r})"

    def __enter__(self) -> S3Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def create_bucket(self) -> None:
        """Create the bucket (tests and self-hosted servers); an existing bucket is fine."""
        try:
            self._retry(
                "create_bucket", "", lambda: self._client.create_bucket(Bucket=self.config.bucket)
            )
        except StorageError as exc:
            if "BucketAlreadyOwnedByYou" not in str(exc):
                raise

    # -- Storage interface -------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        full = self._full(key)
        if len(data) <= self.config.multipart_threshold:
            self._retry(
                "put",
                key,
                lambda: self._client.put_object(Bucket=self.config.bucket, Key=full, Body=data),
            )
            return
        self._put_multipart(key, full, memoryview(data))

    def get(self, key: str) -> bytes:
        first, total = self._get_part(key, 0, self.config.download_part_size)
        if total <= len(first):
            return bytes(first)
        return bytes(first) + self.get_range(key, len(first), total)

    def get_range(self, key: str, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` (fewer if the object is shorter), read straight into one
        writable buffer (ranges longer than ``download_part_size`` as parallel ranged GETs,
        each into its own slice), so a reader can build tensors on it without a copy."""
        return self._read_range(key, start, end, None)

    def get_range_streamed(self, key: str, start: int, end: int, progress: Progress) -> memoryview:
        """:meth:`get_range`, telling ``progress`` of the bytes as they arrive
        (:class:`~netcomm.storage.StreamingStorage`): the first part chunk by chunk, the parts
        fetched beside it once all are in."""
        return self._read_range(key, start, end, progress)

    def _read_range(self, key: str, start: int, end: int, progress: Progress | None) -> memoryview:
        if start < 0 or end < start:
            raise ValueError(f"invalid byte range [{start}, {end}): need 0 <= start <= end")
        out = fresh_buffer(end - start)
        if end == start:
            return out
        step = self.config.download_part_size
        bounds = [(lo - start, min(lo + step, end) - start) for lo in range(start, end, step)]

        def read(part: tuple[int, int]) -> tuple[int, int]:
            lo, hi = part
            # only the first part can stream: the others arrive beside it, out of order
            told = progress if lo == 0 else None
            data, total = self._get_part(key, start + lo, start + hi, out[lo:hi], told)
            return len(data), total

        parts = [read(bounds[0])] if len(bounds) == 1 else list(self._pool.map(read, bounds))
        got = 0
        for i, ((lo, hi), (n, _)) in enumerate(zip(bounds, parts, strict=True)):
            if i and progress is not None and n:
                progress(lo, out[lo : lo + n])
            got += n
            if n < hi - lo:  # the object ends inside this part
                break
        if got != min(end, parts[0][1]) - start:
            raise TransientStorageError(f"{key}: object changed size during a ranged download")
        return out if got == len(out) else out[:got]

    def head(self, key: str) -> ObjectInfo:
        resp = self._retry(
            "head",
            key,
            lambda: self._client.head_object(Bucket=self.config.bucket, Key=self._full(key)),
        )
        return ObjectInfo(
            key,
            int(resp["ContentLength"]),
            resp["LastModified"].timestamp(),
            str(resp.get("ETag", "")).strip('"'),
        )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full_prefix = join_key(self.config.prefix, prefix) if self.config.prefix else prefix
        if self.config.prefix and not prefix:
            full_prefix += "/"
        out = []
        token: str | None = None
        while True:
            kwargs = {"Bucket": self.config.bucket, "Prefix": full_prefix}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._retry("list", prefix, lambda kw=kwargs: self._client.list_objects_v2(**kw))
            for obj in resp.get("Contents", []):
                key = obj["Key"]
                if self.config.prefix:
                    key = key[len(self.config.prefix) + 1 :]
                out.append(
                    ObjectInfo(
                        key,
                        int(obj["Size"]),
                        obj["LastModified"].timestamp(),
                        str(obj.get("ETag", "")).strip('"'),
                    )
                )
            if not resp.get("IsTruncated"):
                break
            token = resp["NextContinuationToken"]
        return sorted(out, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        self._retry(
            "delete",
            key,
            lambda: self._client.delete_object(Bucket=self.config.bucket, Key=self._full(key)),
        )

    # -- internals ---------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return join_key(self.config.prefix, validate_key(key))

    def _get_part(
        self,
        key: str,
        start: int,
        end: int,
        out: memoryview | None = None,
        progress: Progress | None = None,
    ) -> tuple[bytes | memoryview, int]:
        """Bytes [start, end) (fewer where the object ends) and the object's total size,
        retried as one unit; read into ``out`` (``end - start`` long) when given, telling
        ``progress`` of each chunk (offsets from ``start``; a retry starts over at 0)."""

        def fetch() -> tuple[bytes | memoryview, int]:
            try:
                resp = self._client.get_object(
                    Bucket=self.config.bucket, Key=self._full(key), Range=f"bytes={start}-{end - 1}"
                )
            except self._exc.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b"", start  # start is at or past the end of the object
                raise
            match = _CONTENT_RANGE.fullmatch(str(resp.get("ContentRange", "")))
            data: bytes | memoryview
            if match:
                first, last, total = (int(g) for g in match.groups())
                expected = last - first + 1
                if first != start or expected > end - start:
                    raise TransientStorageError(
                        f"{key}: the server sent bytes {first}-{last}, not {start}-{end - 1}"
                    )
                body = resp["Body"]
                if out is None:
                    data = body.read()
                else:
                    data = out[: read_into(body, out[:expected], progress, _READ_STEP)]
            else:  # a server that ignores Range sends the whole object
                total = int(resp["ContentLength"])
                data = resp["Body"].read()
                data = data[start:end] if len(data) == total else data
                expected = min(end, total) - start
                if out is not None and len(data) == expected:
                    out[:expected] = data
                    data = out[:expected]
                    if progress is not None:
                        progress(0, data)
            if len(data) != expected:
                raise TransientStorageError(
                    f"{key}: truncated body ({len(data)} of {expected} bytes)"
                )
            return data, total

        return self._retry("get", key, fetch)

    def _put_multipart(self, key: str, full: str, data: memoryview) -> None:
        bucket = self.config.bucket
        upload = self._retry(
            "put", key, lambda: self._client.create_multipart_upload(Bucket=bucket, Key=full)
        )
        upload_id = upload["UploadId"]
        step = self.config.part_size
        offsets = list(range(0, len(data), step))

        def send(number_offset: tuple[int, int]) -> dict[str, Any]:
            number, offset = number_offset
            chunk = bytes(data[offset : offset + step])
            resp = self._retry(
                "put",
                key,
                lambda: self._client.upload_part(
                    Bucket=bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=chunk
                ),
            )
            return {"PartNumber": number, "ETag": resp["ETag"]}

        try:
            parts = list(self._pool.map(send, enumerate(offsets, start=1)))
            self._retry(
                "put",
                key,
                lambda: self._client.complete_multipart_upload(
                    Bucket=bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
            )
        except BaseException:
            # Best effort: the original error is the one worth reporting.
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=bucket, Key=full, UploadId=upload_id)
            raise

    def _retry(self, op: str, key: str, fn: Callable[[], T]) -> T:
        cfg = self.config
        for attempt in range(cfg.max_attempts):
            try:
                return fn()
            except Exception as exc:  # every failure is classified below
                error = self._classify(op, key, exc)
                if not isinstance(error, TransientStorageError) or attempt + 1 == cfg.max_attempts:
                    raise error from exc
            with self._rng_lock:
                jitter = self._rng.uniform(0.5, 1.0)
            time.sleep(min(cfg.backoff_max_s, cfg.backoff_s * 2**attempt) * jitter)
        raise AssertionError("unreachable")

    def _classify(self, op: str, key: str, exc: Exception) -> StorageError:
        if isinstance(exc, StorageError):
            return exc
        exc_mod = self._exc
        if isinstance(exc, exc_mod.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code != "NoSuchBucket" and (code in ("NoSuchKey", "NotFound") or status == 404):
                return ObjectNotFoundError(key)
            message = f"{op} {key!r}: {code} (HTTP {status}) {err.get('Message', '')}".rstrip()
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return TransientStorageError(message)
            return StorageError(message)
        transient = (
            exc_mod.ConnectionError,
            exc_mod.HTTPClientError,
            exc_mod.IncompleteReadError,
            exc_mod.ResponseStreamingError,
            OSError,
        )
        if isinstance(exc, transient) or type(exc).__module__.startswith("urllib3"):
            return TransientStorageError(f"{op} {key!r}: {type(exc).__name__}: {exc}")
        return StorageError(f"{op} {key!r}: {type(exc).__name__}: {exc}")
