"""The few git operations the benchmark needs, through the ``git`` command.

Commits are exported with ``git archive`` (a clean tree, no ``.git``) and patches applied
with ``git apply``, which works outside a repository too, so an agent's workspace carries no
history it could read the reference patch from.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path


def git(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    """Run ``git -C repo args`` and return stdout; raises ``RuntimeError`` with git's stderr."""
    proc = subprocess.run(
        ["git", "-C", str(repo), *args], input=stdin, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode()


def history(repo: Path) -> list[tuple[str, str | None]]:
    """(commit, first parent or None) along the first-parent line of HEAD, oldest first."""
    out = []
    for line in git(repo, "rev-list", "--first-parent", "--parents", "--reverse", "HEAD").split(
        "\n"
    ):
        if line:
            shas = line.split()
            out.append((shas[0], shas[1] if len(shas) > 1 else None))
    return out


def changed_files(repo: Path, base: str, commit: str) -> list[str]:
    return [f for f in git(repo, "diff", "--name-only", base, commit).splitlines() if f]


def diff(repo: Path, base: str, commit: str, paths: list[str]) -> str:
    """The binary-safe diff of ``paths`` between two commits (empty for no paths)."""
    return git(repo, "diff", "--binary", base, commit, "--", *paths) if paths else ""


def export(repo: Path, commit: str, dest: Path) -> None:
    """Write the tree of ``commit`` into ``dest``."""
    data = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", commit],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")


def apply_patch(workdir: Path, patch: str) -> None:
    """Apply a ``git diff`` patch to a plain folder; ``RuntimeError`` if it does not apply."""
    if patch:
        git(workdir, "apply", "--whitespace=nowarn", "-", stdin=patch.encode())
