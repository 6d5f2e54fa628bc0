"""Score an agent on one task: base checkout → agent → vetted changes → test patch → tests.

The agent works in a scratch copy of the base commit. Only its changes to the code under
test are carried into a second, clean copy where the tests run: changes to test files, to
test infrastructure (``conftest.py``, a ``pytest.py`` that would shadow pytest, pytest/tox
configuration, ``sitecustomize``, ``.pth`` files), links, and Python files that reach into
the test machinery (import or name ``pytest``/``_pytest``/``pluggy``, or touch
``sys.modules``) are dropped and listed. The task's test patch is then applied and the task
is resolved when every fail_to_pass and every pass_to_pass test passes.

This closes the ways an agent was seen to fake a pass (a ``conftest.py`` forcing outcomes,
a ``pytest.py`` next to the code). It is still not a sandbox: the agent runs in the
validator's process and the vetted code runs with the tests.
"""

from __future__ import annotations

import ast
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from examples.evaluation.agents import Agent, TaskView
from examples.evaluation.config import BenchmarkConfig
from examples.evaluation.gitrepo import apply_patch
from examples.evaluation.gitrepo import export as export_tree
from examples.evaluation.mining import Task, test_roots
from examples.evaluation.testrun import run_tests

INFRASTRUCTURE_FILES = frozenset(
    {
        "conftest.py",
        "pytest.py",
        "py.py",
        "sitecustomize.py",
        "usercustomize.py",
        "pytest.ini",
        "tox.ini",
        "setup.cfg",
        "pyproject.toml",
    }
)
INFRASTRUCTURE_DIRS = frozenset({"pytest", "_pytest", "pluggy"})
TEST_MACHINERY = frozenset({"pytest", "_pytest", "pluggy"})


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
    dropped: tuple[str, ...] = ()

    @property
    def resolved(self) -> bool:
        return (self.fail_to_pass, self.pass_to_pass) == (self.f2p_total, self.p2p_total)


def _reaches_test_machinery(source: bytes) -> bool:
    """Whether Python source imports or names pytest's machinery or touches ``sys.modules``."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False  # a file that does not parse fails its tests by itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]  # importlib.import_module("_pytest...") and the like
        elif isinstance(node, ast.Attribute) and node.attr == "modules":
            names = ["sys.modules"] if getattr(node.value, "id", None) == "sys" else []
        else:
            continue
        for name in names:
            if name == "sys.modules" or name.split(".")[0] in TEST_MACHINERY:
                return True
    return False


def _why_dropped(path: str, target: Path | None, cfg: BenchmarkConfig) -> str | None:
    """Why the agent's change to ``path`` (now at ``target``; None if deleted) is refused."""
    parts = path.split("/")
    if path.startswith(cfg.test_dirs):
        return "test file"
    if parts[-1] in INFRASTRUCTURE_FILES or parts[-1].endswith(".pth"):
        return "test infrastructure"
    if INFRASTRUCTURE_DIRS.intersection(parts[:-1]):
        return "test infrastructure"
    if target is None:
        return None
    if target.is_symlink():
        return "link"
    if path.endswith(".py") and _reaches_test_machinery(target.read_bytes()):
        return "reaches into the test machinery"
    return None


def _same(old: Path | None, new: Path | None) -> bool:
    if old is None or new is None or old.is_symlink() or new.is_symlink():
        return False
    return old.read_bytes() == new.read_bytes()


def _files(root: Path) -> dict[str, Path]:
    return {
        p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_symlink() or p.is_file()
    }


def carry_changes(base: Path, edited: Path, cfg: BenchmarkConfig) -> list[str]:
    """Copy the agent's changes from ``edited`` onto ``base`` (a clean copy of the same commit),
    except the ones :func:`_why_dropped` refuses; returns those as ``"path (reason)"``."""
    before, after = _files(base), _files(edited)
    dropped = []
    for path in sorted(set(before) | set(after)):
        new, old = after.get(path), before.get(path)
        if _same(old, new):
            continue
        why = _why_dropped(path, new, cfg)
        if why is not None:
            dropped.append(f"{path} ({why})")
        elif new is None:
            (base / path).unlink()
        else:
            (base / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(new, base / path)
    return dropped


def evaluate(agent: Agent, task: Task, repo: Path, cfg: BenchmarkConfig) -> TaskResult:
    """Run ``agent`` on ``task`` in a scratch workspace and check the task's tests on its
    vetted changes (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="swe-eval-") as tmp:
        scratch, judged = Path(tmp) / "agent", Path(tmp) / "judged"
        export_tree(repo, task.base, scratch)
        export_tree(repo, task.base, judged)
        error = ""
        try:
            agent.solve(scratch, TaskView(task.task_id, task.base, task.statement))
        except Exception:  # an agent's crash is its failure, not the harness's
            error = traceback.format_exc(limit=1).strip().splitlines()[-1]
        dropped = carry_changes(judged, scratch, cfg)
        apply_patch(judged, task.test_patch)
        outcomes = run_tests(judged, test_roots(judged, cfg), cfg.test_timeout_s)
    return TaskResult(
        agent.name,
        task.task_id,
        sum(outcomes.get(t, False) for t in task.fail_to_pass),
        sum(outcomes.get(t, False) for t in task.pass_to_pass),
        len(task.fail_to_pass),
        len(task.pass_to_pass),
        error,
        tuple(dropped),
    )
