"""Mine tasks from a repository's history, checking every test outcome by running it.

For each commit C with first parent P on HEAD's first-parent line:

1. split the diff P..C into test files (under ``test_dirs``) and code files; a commit that
   changes no tests or no code is skipped;
2. export P, apply the test patch, run the whole test suite: the *before* outcomes;
3. apply the reference (code) patch as well, which gives C's tree: the *after* outcomes;
4. fail_to_pass = failing before and passing after; pass_to_pass = passing in both. A commit
   with no fail_to_pass test is skipped (its tests do not prove the change fixed anything).

The task's statement is the commit message, the closest thing a history has to an issue.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from examples.evaluation.config import BenchmarkConfig
from examples.evaluation.gitrepo import apply_patch, changed_files, diff, export, git, history
from examples.evaluation.testrun import run_tests


@dataclass(frozen=True)
class Task:
    """One mined task. ``reference_patch`` is hidden from agents."""

    task_id: str
    commit: str
    base: str
    statement: str
    test_patch: str
    reference_patch: str
    test_files: tuple[str, ...]
    fail_to_pass: tuple[str, ...]
    pass_to_pass: tuple[str, ...]


@dataclass(frozen=True)
class Skipped:
    """A commit that did not become a task, and why."""

    commit: str
    reason: str


def test_roots(workdir: Path, cfg: BenchmarkConfig) -> list[str]:
    """The test folders present in a workspace (the suite every run executes)."""
    return [p.rstrip("/") for p in cfg.test_dirs if (workdir / p).exists()]


def mine_commit(repo: Path, commit: str, base: str, cfg: BenchmarkConfig) -> Task | Skipped:
    """The task commit ``commit`` (on top of ``base``) makes, or why it makes none."""
    files = changed_files(repo, base, commit)
    tests = sorted(f for f in files if f.startswith(cfg.test_dirs))
    code = sorted(f for f in files if not f.startswith(cfg.test_dirs))
    if not tests or not code:
        return Skipped(commit, "changes no tests" if not tests else "changes no code")
    test_patch, reference_patch = diff(repo, base, commit, tests), diff(repo, base, commit, code)
    with tempfile.TemporaryDirectory(prefix="swe-mine-") as tmp:
        work = Path(tmp)
        export(repo, base, work)
        apply_patch(work, test_patch)
        before = run_tests(work, test_roots(work, cfg), cfg.test_timeout_s)
        apply_patch(work, reference_patch)
        after = run_tests(work, test_roots(work, cfg), cfg.test_timeout_s)
    f2p = tuple(sorted(t for t, ok in after.items() if ok and not before.get(t, False)))
    p2p = tuple(sorted(t for t, ok in after.items() if ok and before.get(t, False)))
    if not f2p:
        return Skipped(commit, "no test fails before and passes after")
    statement = git(repo, "log", "-1", "--format=%B", commit).strip()
    return Task(
        task_id=f"task-{commit[:10]}",
        commit=commit,
        base=base,
        statement=statement,
        test_patch=test_patch,
        reference_patch=reference_patch,
        test_files=tuple(tests),
        fail_to_pass=f2p,
        pass_to_pass=p2p,
    )


def mine(
    repo: Path,
    cfg: BenchmarkConfig,
    after: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[list[Task], list[Skipped]]:
    """Tasks from every commit after ``after`` (all commits when None), oldest first."""
    line = history(repo)
    shas = [c for c, _ in line]
    start = shas.index(after) + 1 if after is not None else 0
    tasks: list[Task] = []
    skipped: list[Skipped] = []
    for commit, parent in line[start:]:
        if parent is None:
            skipped.append(Skipped(commit, "root commit"))
            continue
        result = mine_commit(repo, commit, parent, cfg)
        (tasks if isinstance(result, Task) else skipped).append(result)
        log(
            f"{commit[:10]}: "
            + (
                f"task, {len(result.fail_to_pass)} fail_to_pass"
                if isinstance(result, Task)
                else f"skipped ({result.reason})"
            )
        )
    return tasks, skipped
