"""What a node keeps between restarts: its signing key and its checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from netcomm import CheckpointStore, Ed25519Signer

KEY_FILE = "ed25519.key"


def load_or_create_signer(state_dir: str | Path) -> Ed25519Signer:
    """The node's Ed25519 key from ``state_dir/ed25519.key`` (32 bytes, hex), made on first use.

    The file is created with mode 0600; a restarted node keeps its key, so the public key
    digest in its commitment stays valid.
    """
    path = Path(state_dir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        seed = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(seed.hex() + "\n")
    try:
        seed = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise ValueError(f"{path} does not hold a hex Ed25519 seed") from None
    return Ed25519Signer.from_seed(seed)


def prune_checkpoints(store: CheckpointStore, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints; returns the deleted steps.

    The step ``latest`` points at is never deleted, even when it is older.
    """
    steps = store.steps()
    latest = store.latest_step()
    doomed = [s for s in steps[:-keep] if s != latest]
    for step in doomed:
        # The manifest goes first: a half-deleted step then no longer counts as complete.
        base = f"{store.prefix}/{step:012d}/"
        infos = store.storage.list(base)
        for info in sorted(infos, key=lambda i: not i.key.endswith("manifest.json")):
            store.storage.delete(info.key)
    return doomed
