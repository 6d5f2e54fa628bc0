"""The storage interface every backend implements, key rules, and the local-folder backend.

A key is a ``/``-separated path of segments made of letters, digits, ``.``, ``_`` and ``-``;
no segment may be empty or start with ``.`` (this rules out ``..`` traversal and hides the
backends' temporary files from listings). Keys are at most 1024 characters.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from netcomm.errors import InvalidKeyError, ObjectNotFoundError

_SEGMENT = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]*")
MAX_KEY_LENGTH = 1024
_CHUNK = 4 << 20  # bytes a local ranged read reads (and reports) at a time

#: What a read returns: the built-in backends' ranged reads give a writable ``memoryview``.
Bytes = bytes | bytearray | memoryview


def fresh_buffer(size: int) -> memoryview:
    """A writable ``size``-byte buffer whose bytes are undefined until written.

    ``bytearray(size)`` zeroes its memory before a download overwrites it, a whole extra pass
    (with the page faults of fresh memory) over every downloaded byte. ``torch.empty`` rather
    than ``numpy.empty``: numpy advises transparent huge pages for large arrays, which in
    trial runs cost the client more CPU where the bytes trickle in through a shaped link.
    Every reader here returns only the bytes it wrote, so nothing unwritten is ever seen.
    In a process that turned on ``torch.use_deterministic_algorithms`` (with
    ``fill_uninitialized_memory``, its default), ``torch.empty`` fills the memory, and this
    costs what a ``bytearray`` does.
    """
    return memoryview(torch.empty(size, dtype=torch.uint8).numpy())


@dataclass(frozen=True)
class ObjectInfo:
    """What ``head`` and ``list`` report about an object.

    Attributes:
        key: the object's key.
        size: its length in bytes.
        mtime: last-modified time, seconds since the epoch, as the backend reports it.
        etag: an opaque version tag (changes when the object is replaced).
    """

    key: str
    size: int
    mtime: float
    etag: str


@runtime_checkable
class Storage(Protocol):
    """A flat key → bytes store. Writes are atomic: a reader sees the old or the new object."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``, replacing any previous object."""
        ...

    def get(self, key: str) -> bytes:
        """The whole object; raises :class:`ObjectNotFoundError` if absent."""
        ...

    def get_range(self, key: str, start: int, end: int) -> Bytes:
        """Bytes ``[start, end)`` of the object (fewer if it is shorter).

        The built-in backends return a writable ``memoryview`` the caller owns (see
        :func:`fresh_buffer`), so a reader can build writable tensors on it without copying it.
        """
        ...

    def head(self, key: str) -> ObjectInfo:
        """Size and version of the object; raises :class:`ObjectNotFoundError` if absent."""
        ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        ...


#: ``progress(offset, chunk)``: bytes ``[offset, offset + len(chunk))`` of a ranged read's
#: result are ``chunk``'s, final unless the read starts over. Chunks come in order, each where
#: the last one ended, except that a read which starts over (a retried transfer) says so
#: with offset 0, which withdraws everything told before.
Progress = Callable[[int, memoryview], None]


class StreamingStorage(Storage, Protocol):
    """A :class:`Storage` whose ranged reads tell a caller of the bytes as they arrive (the
    built-in backends), so that a reader can, say, hash a download while it is on the wire.

    :func:`read_range` streams from a storage only if its class defines
    ``get_range_streamed`` next to ``get_range``: a subclass that overrides ``get_range``
    alone, or a wrapper that forwards unknown attributes to another storage, would otherwise
    have its own reads bypassed.
    """

    def get_range_streamed(self, key: str, start: int, end: int, progress: Progress) -> Bytes:
        """:meth:`Storage.get_range`, telling ``progress`` of the result's bytes as they
        arrive, all of them, before it returns."""
        ...


def read_range(storage: Storage, key: str, start: int, end: int, progress: Progress) -> Bytes:
    """``storage.get_range(key, start, end)``, telling ``progress`` of the bytes: as they
    arrive from a :class:`StreamingStorage`, else in one chunk once the read has returned."""
    if _streams(storage):
        return storage.get_range_streamed(key, start, end, progress)  # type: ignore[attr-defined]
    data = storage.get_range(key, start, end)
    progress(0, memoryview(data))
    return data


def _streams(storage: Storage) -> bool:
    """Whether ``storage``'s class defines ``get_range_streamed`` where it defines
    ``get_range`` (see :class:`StreamingStorage`)."""
    mro = type(storage).__mro__
    streamed = next((c for c in mro if "get_range_streamed" in c.__dict__), None)
    return streamed is not None and streamed is next(
        (c for c in mro if "get_range" in c.__dict__), None
    )


def validate_key(key: str) -> str:
    """Return ``key`` if it follows the key rules above, else raise :class:`InvalidKeyError`."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"key must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"key is {len(key)} characters long, the limit is {MAX_KEY_LENGTH}")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidKeyError(
                f"key {key!r} has an invalid segment {segment!r}: use letters, digits, '.', '_' "
                "and '-', with no empty segment and none starting with '.'"
            )
    return key


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, ignoring empty parts and stray slashes at the ends."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _check_range(start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"invalid byte range [{start}, {end}): need 0 <= start <= end")


def fill_buffer(
    readinto: Callable[[memoryview], int], out: memoryview, progress: Progress | None, step: int
) -> int:
    """Fill ``out`` through ``readinto``, ``step`` bytes at most per call, until it is full or
    a call reads nothing (the end); tells ``progress`` of each chunk and returns the bytes
    read."""
    got = 0
    while got < len(out):
        n = readinto(out[got : got + step])
        if not n:
            break
        if progress is not None:
            progress(got, out[got : got + n])
        got += n
    return got


def _after_previous_version(tmp: str, path: Path) -> None:
    """Give ``tmp`` an mtime after that of the object it is about to replace.

    On a coarse clock (older kernels, some filesystems) two same-size writes within one tick
    would share (size, mtime) and so an etag, and a reader caching by etag would keep the old
    object; an inode number does not help, since a freed one is reused at once.
    """
    try:
        previous = path.stat().st_mtime_ns
    except FileNotFoundError:
        return
    st = os.stat(tmp)
    if st.st_mtime_ns <= previous:
        os.utime(tmp, ns=(st.st_atime_ns, previous + 1))


class LocalStorage:
    """Objects as files under a root folder (the embedded default backend).

    Writes go to a temporary file in the destination folder, are flushed to disk and then
    renamed over the key, so a concurrent reader sees either the old or the new object and a
    crash leaves at most a hidden temporary file. ``mtime`` is the file's modification time and
    ``etag`` combines size and nanosecond mtime; each write gets an mtime later than the version
    it replaces (even where the clock ticks coarsely), so a key's etags never repeat.

    Args:
        root: the folder; created if missing.
        fsync: flush each write to disk before renaming (durability across power loss).
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        # The key rules already forbid traversal; this also catches symlinks planted in the root.
        if not path.is_relative_to(self.root):
            raise InvalidKeyError(f"key {key!r} resolves outside the storage root")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            _after_previous_version(tmp, path)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None

    def get_range(self, key: str, start: int, end: int) -> memoryview:
        return self._read_range(key, start, end, None)

    def get_range_streamed(self, key: str, start: int, end: int, progress: Progress) -> memoryview:
        return self._read_range(key, start, end, progress)

    def _read_range(self, key: str, start: int, end: int, progress: Progress | None) -> memoryview:
        _check_range(start, end)
        try:
            with self._path(key).open("rb") as f:
                out = fresh_buffer(max(0, min(end, os.fstat(f.fileno()).st_size) - start))
                f.seek(start)
                got = fill_buffer(f.readinto, out, progress, _CHUNK)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None
        return out if got == len(out) else out[:got]  # the file shrank meanwhile

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None
        if not path.is_file():
            raise ObjectNotFoundError(key)
        return self._info(key, st)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:  # deleted while listing
                        continue
                    out.append(self._info(key, st))
        return sorted(out, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    @staticmethod
    def _info(key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(key, st.st_size, st.st_mtime, f"{st.st_size:x}-{st.st_mtime_ns:x}")
