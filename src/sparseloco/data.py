"""Byte-level token data: a corpus present on every machine, text files, or token shards.

* :func:`stdlib_corpus`: the Python standard library's ``.py`` sources (always installed),
  read in sorted path order up to a byte budget, so every machine builds the same corpus
  from the same Python version.
* :func:`load_tokens`: a file or folder of text files (UTF-8 bytes) or token shards
  (``.bin`` files of little-endian uint16, or ``.npy`` arrays, nanoGPT style).

A :class:`TokenDataset` cuts the stream into a train and a held-out split and serves
fixed-length samples by id, so a sample id alone (e.g. from a data assignment) says exactly
which tokens a peer trains on.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from sparseloco.errors import ConfigError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".tex"}


#: folders of the standard library left out of the corpus.
_SKIPPED = ("site-packages", "test")


def _sorted_sources(folder: str) -> Iterator[Path]:
    """``sorted(Path(folder).rglob("*.py"))`` without ``_SKIPPED`` folders, walked lazily.

    A depth-first walk over names sorted at each level yields paths in the order of their
    parts, which is how paths sort, so a caller that needs the first few megabytes does
    not list (and sort) the whole tree. Like ``rglob`` it does not enter linked folders.
    """
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.endswith(".py"):
            yield Path(entry.path)
        if entry.name not in _SKIPPED and entry.is_dir(follow_symlinks=False):
            yield from _sorted_sources(entry.path)


def stdlib_corpus(max_bytes: int = 8_000_000) -> np.ndarray:
    """Bytes of the standard library's Python sources (sorted paths), at most ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in _sorted_sources(str(root)):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if not chunks:
        raise ConfigError(f"no Python sources found under {root}")
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def load_tokens(path: str | Path, max_tokens: int | None = None) -> np.ndarray:
    """Tokens from a text file, a token shard, or a folder of either (sorted order)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"data path {path} does not exist; pass a text file, shard or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"no files under {path}")
    parts: list[np.ndarray] = []
    count = 0
    for f in files:
        if f.suffix == ".bin":
            arr = np.fromfile(f, dtype="<u2")
        elif f.suffix == ".npy":
            arr = np.load(f, allow_pickle=False)
            if arr.ndim != 1 or arr.dtype.kind not in "ui":
                raise ConfigError(f"{f}: token shards must be 1-D integer arrays")
        elif f.suffix in TEXT_SUFFIXES or path.is_file():
            data = f.read_bytes()
            _check_text(f, data)
            arr = np.frombuffer(data, dtype=np.uint8)
        else:
            continue
        parts.append(arr.astype(np.int64, copy=False))
        count += arr.size
        if max_tokens is not None and count >= max_tokens:
            break
    if not parts:
        raise ConfigError(f"no text files or token shards under {path}")
    tokens = np.concatenate(parts)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def _check_text(path: Path, data: bytes, sample: int = 65536) -> None:
    """Refuse a file that is not text: training on a binary's bytes would run but mean nothing.

    Only a sample is checked (the head), so a large corpus costs nothing extra; a UTF-8
    character cut at the sample's end is not an error.
    """
    head = data[:sample]
    if b"\0" in head:
        raise ConfigError(
            f"{path} is neither text nor a token shard (it holds NUL bytes); pass UTF-8 text, "
            "a .bin shard of uint16 tokens or a .npy array"
        )
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3 or len(head) == len(data):
            raise ConfigError(
                f"{path} is neither text nor a token shard (invalid UTF-8 at byte "
                f"{exc.start}); pass UTF-8 text, a .bin shard of uint16 tokens or a .npy array"
            ) from None


class TokenDataset:
    """Fixed-length samples from a token stream, split into train and held-out parts.

    Sample ``i`` of the train split is tokens ``[i*block, i*block + block + 1)`` (input plus
    shifted target); the held-out split is the last ``heldout_fraction`` of the stream.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, heldout_fraction: float = 0.05) -> None:
        if not 0 < heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
        self.block_size = block_size
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.vocab_size = int(self.tokens.max()) + 1 if self.tokens.numel() else 0
        split = int(len(tokens) * (1 - heldout_fraction))
        self.train = self.tokens[:split]
        self.heldout = self.tokens[split:]
        self.num_train = (len(self.train) - 1) // block_size
        self.num_heldout = (len(self.heldout) - 1) // block_size
        if self.num_train < 1 or self.num_heldout < 1:
            raise ConfigError(
                f"{len(tokens)} tokens are too few for block_size={block_size} with a "
                f"{heldout_fraction:.0%} held-out split"
            )

    def digest(self) -> str:
        """SHA-256 of the token stream: peers and validators check they share a corpus."""
        return hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest()

    def _batch(self, stream: torch.Tensor, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.block_size
        rows = torch.stack([stream[i * b : i * b + b + 1] for i in ids])
        return rows[:, :-1], rows[:, 1:]

    def train_batch(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of train samples ``ids``; raises on an id out of range."""
        bad = [i for i in ids if not 0 <= i < self.num_train]
        if bad:
            raise ConfigError(f"train sample ids out of range [0, {self.num_train}): {bad[:5]}")
        return self._batch(self.train, ids)

    def heldout_batch(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        bad = [i for i in ids if not 0 <= i < self.num_heldout]
        if bad:
            raise ConfigError(f"held-out ids out of range [0, {self.num_heldout}): {bad[:5]}")
        return self._batch(self.heldout, ids)
