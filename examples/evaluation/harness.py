"""Score an agent on one task: base checkout → agent → test patch → the task's tests.

The test files the task touches are put back to the base version before the test patch is
applied, so an agent cannot pass by editing the tests it will be judged by. The task is
resolved when every fail_to_pass and every pass_to_pass test passes.
"""

from __future__ import annotations

import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from examples.evaluation.agents import Agent, TaskView
from examples.evaluation.config import BenchmarkConfig
from examples.evaluation.gitrepo import apply_patch, git
from examples.evaluation.gitrepo import export as export_tree
from examples.evaluation.mining import Task, test_roots
from examples.evaluation.testrun import run_tests


@dataclass(frozen=True)
class TaskResult:
    """One agent on one task."""

    agent: str
    task_id: str
    fail_to_pass: int
    pass_to_pass: int
    f2p_total: int
    p2p_total: int
    error: str = ""

    @property
    def resolved(self) -> bool:
        return (self.fail_to_pass, self.pass_to_pass) == (self.f2p_total, self.p2p_total)


def _restore_tests(repo: Path, task: Task, workdir: Path) -> None:
    """Put the task's test files back to their base version (removing ones the base lacks)."""
    present = set(
        git(repo, "ls-tree", "-r", "--name-only", task.base, "--", *task.test_files).splitlines()
    )
    for path in task.test_files:
        target = workdir / path
        if path in present:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(git(repo, "show", f"{task.base}:{path}").encode())
        elif target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def evaluate(agent: Agent, task: Task, repo: Path, cfg: BenchmarkConfig) -> TaskResult:
    """Run ``agent`` on ``task`` in a fresh workspace and check the task's tests."""
    with tempfile.TemporaryDirectory(prefix="swe-eval-") as tmp:
        work = Path(tmp)
        export_tree(repo, task.base, work)
        error = ""
        try:
            agent.solve(work, TaskView(task.task_id, task.base, task.statement))
        except Exception:  # an agent's crash is its failure, not the harness's
            error = traceback.format_exc(limit=1).strip().splitlines()[-1]
        _restore_tests(repo, task, work)
        apply_patch(work, task.test_patch)
        outcomes = run_tests(work, test_roots(work, cfg), cfg.test_timeout_s)
    return TaskResult(
        agent.name,
        task.task_id,
        sum(outcomes.get(t, False) for t in task.fail_to_pass),
        sum(outcomes.get(t, False) for t in task.pass_to_pass),
        len(task.fail_to_pass),
        len(task.pass_to_pass),
        error,
    )
