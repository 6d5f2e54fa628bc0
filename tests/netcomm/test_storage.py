"""The storage contract, run against the local folder and the loopback S3 server."""

from __future__ import annotations

import os
import threading

import pytest

from netcomm import (
    FaultPlan,
    FaultProxy,
    InvalidKeyError,
    LocalStorage,
    ObjectNotFoundError,
    S3Storage,
    Storage,
    read_range,
    validate_key,
)


def test_implements_protocol(storage):
    assert isinstance(storage, Storage)


def test_put_get_head_roundtrip(storage):
    storage.put("a/b/c.bin", b"hello world")
    assert storage.get("a/b/c.bin") == b"hello world"
    info = storage.head("a/b/c.bin")
    assert (info.key, info.size) == ("a/b/c.bin", 11)
    assert info.etag


def test_overwrite_changes_content_and_etag(storage):
    storage.put("k", b"first")
    etag = storage.head("k").etag
    storage.put("k", b"second version")
    assert storage.get("k") == b"second version"
    assert storage.head("k").size == 14
    assert storage.head("k").etag != etag


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [(0, 5, b"01234"), (3, 7, b"3456"), (8, 100, b"89"), (10, 20, b""), (4, 4, b"")],
)
def test_get_range(storage, start, end, expected):
    storage.put("r", b"0123456789")
    assert storage.get_range("r", start, end) == expected


def test_invalid_range_raises(storage):
    storage.put("r", b"abc")
    with pytest.raises(ValueError, match="invalid byte range"):
        storage.get_range("r", 2, 1)


def test_missing_key_raises_not_found(storage):
    for op in (storage.get, storage.head, lambda k: storage.get_range(k, 0, 4)):
        with pytest.raises(ObjectNotFoundError) as info:
            op("nope/none")
        assert info.value.key == "nope/none"


def test_list_is_sorted_and_prefix_filtered(storage):
    for key in ["w/2/b", "w/10/a", "w/2/a", "x/1"]:
        storage.put(key, key.encode())
    assert [i.key for i in storage.list("w/")] == ["w/10/a", "w/2/a", "w/2/b"]
    assert [i.key for i in storage.list()] == ["w/10/a", "w/2/a", "w/2/b", "x/1"]
    assert [i.size for i in storage.list("x")] == [3]
    assert storage.list("zzz") == []


def test_delete_is_idempotent(storage):
    storage.put("d", b"x")
    storage.delete("d")
    storage.delete("d")
    with pytest.raises(ObjectNotFoundError):
        storage.get("d")
    assert storage.list() == []


def test_empty_object(storage):
    storage.put("empty", b"")
    assert storage.get("empty") == b""
    assert storage.head("empty").size == 0


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "a//b",
        "../x",
        "a/../b",
        "a/./b",
        ".hidden",
        "a/.tmp-x",
        "a\\b",
        "sp ace",
        "x" * 1025,
        "a/b/",
    ],
)
def test_bad_keys_rejected(storage, key):
    with pytest.raises(InvalidKeyError):
        storage.put(key, b"x")
    with pytest.raises(InvalidKeyError):
        validate_key(key)


def test_large_object_multipart_and_parallel_ranges(s3_factory):
    mib = 1 << 20
    storage = s3_factory(
        part_size=5 * mib,
        multipart_threshold=5 * mib,
        download_part_size=4 * mib,
        max_concurrency=4,
    )
    data = os.urandom(13 * mib + 123)
    storage.put("big", data)
    assert storage.head("big").size == len(data)
    assert storage.get("big") == data
    assert storage.get_range("big", mib, 12 * mib + 7) == data[mib : 12 * mib + 7]
    # Multipart ETags carry the part count after a dash.
    assert storage.head("big").etag.endswith("-3")


def test_s3_prefix_isolates_keys(s3_factory):
    a = s3_factory(prefix="tenant-a")
    b = s3_factory(prefix="tenant-b")
    a.put("k", b"from a")
    b.put("k", b"from b")
    assert a.get("k") == b"from a"
    assert [i.key for i in a.list()] == ["k"]
    assert [i.key for i in b.list()] == ["k"]


def test_local_replacement_gets_a_later_mtime_than_the_version_it_replaces(tmp_path):
    """On a coarse clock two same-size writes in one tick would share an etag, and the
    exchange's verified-payload cache (keyed on the etag) would keep the old payload."""
    from netcomm.storage import _after_previous_version

    old, new = tmp_path / "k", tmp_path / ".tmp-k"
    for lag_ns in (0, 5_000_000):  # the same tick; a clock behind the old version's
        old.write_bytes(b"A" * 64)
        new.write_bytes(b"B" * 64)
        tick = old.stat().st_mtime_ns
        os.utime(new, ns=(tick - lag_ns, tick - lag_ns))
        _after_previous_version(str(new), old)
        assert new.stat().st_mtime_ns == tick + 1
    os.utime(new, ns=(tick + 7, tick + 7))  # already later: left alone
    _after_previous_version(str(new), old)
    assert new.stat().st_mtime_ns == tick + 7
    old.unlink()
    _after_previous_version(str(new), old)  # nothing to replace: nothing to do
    storage = LocalStorage(tmp_path / "store")
    etags = set()
    for content in (b"A" * 64, b"B" * 64, b"C" * 64, b"A" * 64):
        storage.put("k", content)
        etags.add(storage.head("k").etag)
    assert len(etags) == 4


def test_local_write_is_atomic_for_concurrent_readers(tmp_path):
    storage = LocalStorage(tmp_path, fsync=False)
    versions = [bytes([i]) * (1 << 20) for i in range(1, 5)]
    storage.put("obj", versions[0])
    stop = threading.Event()
    reading = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append(storage.get("obj"))
                reading.set()
        except BaseException as exc:  # a read that fails mid-replace is what this test catches
            errors.append(exc)
            reading.set()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        # the reader runs before the writes start, however late its thread is scheduled
        assert reading.wait(30)
        before = len(seen)
        rounds = 0
        # at least 10 rounds of writes, and more until the reader has read while they ran
        while rounds < 10 or (len(seen) < before + 5 and not errors and rounds < 200):
            for v in versions:
                storage.put("obj", v)
            rounds += 1
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert len(seen) >= before + 5
    assert all(s in versions for s in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["obj"]  # no temporary files left


def test_local_symlink_escape_rejected(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    storage = LocalStorage(tmp_path / "root")
    os.symlink(outside, tmp_path / "root" / "link")
    with pytest.raises(InvalidKeyError, match="outside the storage root"):
        storage.get("link/secret")


def test_s3_permanent_error_is_not_retried(s3_factory, kit, moto_url):
    storage = S3Storage(kit.s3_config(moto_url, "no-such-bucket"))
    with pytest.raises(Exception) as info:
        storage.put("k", b"x")
    from netcomm import StorageError, TransientStorageError

    assert isinstance(info.value, StorageError)
    assert not isinstance(info.value, TransientStorageError)
    assert "NoSuchBucket" in str(info.value)


def _streamed(storage, key: str, start: int, end: int) -> tuple[bytes | bytearray, bytes, int]:
    """read_range with a ``progress`` that rebuilds the result from what it is told:
    (result, the bytes told, how many times the read started over)."""
    told, restarts = bytearray(), 0

    def progress(offset: int, chunk: memoryview) -> None:
        nonlocal restarts
        if offset == 0 and told:
            told.clear()
            restarts += 1
        assert offset == len(told)
        told.extend(chunk)

    return read_range(storage, key, start, end, progress), bytes(told), restarts


def test_ranged_reads_fill_a_writable_buffer_and_tell_its_bytes_as_they_arrive(storage):
    data = os.urandom(9 << 20)  # more than two chunks
    storage.put("big", data)
    got, told, restarts = _streamed(storage, "big", 5, len(data) - 3)
    assert isinstance(got, memoryview) and not got.readonly  # tensors share it, no copy
    assert got == told == data[5:-3]
    assert restarts == 0
    whole = storage.get_range("big", 0, 10)
    assert isinstance(whole, memoryview) and not whole.readonly


def test_parts_fetched_side_by_side_are_told_in_order(s3_factory):
    storage = s3_factory(download_part_size=1 << 20, max_concurrency=4)
    data = os.urandom((5 << 20) + 77)
    storage.put("k", data)
    got, told, _ = _streamed(storage, "k", 0, len(data) + 100)
    assert got == told == data


def test_a_retried_transfer_is_told_again_from_offset_zero(s3_factory):
    direct = s3_factory()
    data = os.urandom(9 << 20)  # cut in half: the first chunk was told before the cut
    direct.put("k", data)
    with FaultProxy(direct.config.endpoint_url, FaultPlan(truncate=0.5, seed=1)) as proxy:
        through = s3_factory(endpoint=proxy.url, max_attempts=12)
        got, told, restarts = _streamed(through, "k", 0, len(data))
    assert got == told == data
    assert restarts == proxy.injected["truncate"] > 0


class _Shouting(LocalStorage):
    """Changes what get_range returns, and defines no streamed read of its own."""

    def get_range(self, key, start, end):
        return bytes(super().get_range(key, start, end)).upper()


class _Forwarding:
    """Changes what get_range returns and forwards everything else to another storage."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_range(self, key, start, end):
        return b"#" + self.inner.get_range(key, start + 1, end)


def test_a_storage_that_changes_get_range_is_read_through_it_not_around_it(tmp_path):
    for storage in (_Shouting(tmp_path), _Forwarding(LocalStorage(tmp_path))):
        LocalStorage(tmp_path).put("k", b"abcdef")
        got, told, _ = _streamed(storage, "k", 0, 6)
        assert got == told == storage.get_range("k", 0, 6) != b"abcdef"
