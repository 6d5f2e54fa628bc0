"""The agent plug-in interface and the two agents that validate the harness.

An agent gets a fresh checkout of the task's base commit (no ``.git``, no tests the task
adds, no reference patch) and the task's statement, and edits files in place. Any class with
a ``name`` and a ``solve(workdir, task)`` method is an agent; :func:`load_agent` loads one
from ``"package.module:ClassName"``.

:class:`NullAgent` changes nothing and must score 0; :class:`ReferenceAgent` applies the
hidden reference patch and must score 1. A harness that gives them anything else is broken.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from examples.evaluation.gitrepo import apply_patch


@dataclass(frozen=True)
class TaskView:
    """What an agent may see of a task."""

    task_id: str
    base: str
    statement: str


@runtime_checkable
class Agent(Protocol):
    """Solves tasks by editing the checkout in ``workdir``."""

    name: str

    def solve(self, workdir: Path, task: TaskView) -> None: ...


class NullAgent:
    """Does nothing: the floor every benchmark must score 0."""

    name = "null-agent"

    def solve(self, workdir: Path, task: TaskView) -> None:
        return None


class ReferenceAgent:
    """Applies each task's hidden reference patch: the ceiling every benchmark must score 1.

    Only the harness's owner can build one, since only it holds the patches.

    Args:
        patch_for: task id → that task's reference patch (e.g. ``TaskPool.reference_patch``).
    """

    name = "reference-agent"

    def __init__(self, patch_for: Callable[[str], str]) -> None:
        self._patch_for = patch_for

    def solve(self, workdir: Path, task: TaskView) -> None:
        apply_patch(workdir, self._patch_for(task.task_id))


def load_agent(spec: str) -> Agent:
    """Instantiate ``"package.module:ClassName"`` (no arguments) and check it is an agent."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"agent spec must look like 'package.module:ClassName', got {spec!r}")
    agent = getattr(importlib.import_module(module_name), class_name)()
    if not isinstance(agent, Agent):
        raise TypeError(f"{spec} has no `name` and `solve(workdir, task)`: not an agent")
    return agent
