"""The task pool: mined incrementally, renewed as commits arrive, drawn from a public seed.

:meth:`TaskPool.refresh` mines only the commits added since the last refresh. The tasks an
epoch can draw from are the newest ``window`` ones, so every new task retires the oldest: a
model trained on last month's fixes meets this month's. :meth:`TaskPool.select` draws
``tasks_per_epoch`` of them with :func:`gauntlet.draw_ids` keyed by the seed, the epoch and
the head commit, so validators that see the same history choose the same tasks, and nobody
can know the choice before the epoch's head exists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from examples.evaluation.config import BenchmarkConfig
from examples.evaluation.gitrepo import history
from examples.evaluation.mining import Skipped, Task, mine
from gauntlet import draw_ids


class TaskPool:
    """Every task mined from ``repo`` so far, oldest first.

    Args:
        repo: the repository (any path ``git -C`` accepts).
        cfg: the benchmark's configuration.
    """

    def __init__(self, repo: Path, cfg: BenchmarkConfig) -> None:
        self.repo = repo
        self.cfg = cfg
        self.tasks: list[Task] = []
        self.skipped: list[Skipped] = []
        self.head: str | None = None

    def refresh(self, log: Callable[[str], None] = lambda _: None) -> list[Task]:
        """Mine the commits since the last refresh; returns the new tasks."""
        head = history(self.repo)[-1][0]
        if head == self.head:
            return []
        new, skipped = mine(self.repo, self.cfg, after=self.head, log=log)
        self.tasks += new
        self.skipped += skipped
        self.head = head
        return new

    def reference_patch(self, task_id: str) -> str:
        """The hidden reference patch of a mined task (for :class:`ReferenceAgent`)."""
        for task in self.tasks:
            if task.task_id == task_id:
                return task.reference_patch
        raise KeyError(f"no mined task {task_id!r}")

    def active(self) -> list[Task]:
        """The tasks an epoch can draw from: the newest ``window``."""
        return self.tasks[-self.cfg.window :]

    def select(self, epoch: int) -> list[Task]:
        """This epoch's tasks, in pool order."""
        pool = self.active()
        if self.head is None or not pool:
            raise ValueError("the pool is empty: refresh() a repository with task commits first")
        count = min(self.cfg.tasks_per_epoch, len(pool))
        picks = draw_ids("swe-tasks", (self.cfg.seed, int(epoch), self.head), len(pool), count)
        return [pool[i] for i in sorted(picks)]
