"""Evaluation example: mining a throwaway git history, seeded task choice, agents, renewal."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from examples.evaluation.agents import NullAgent, ReferenceAgent, TaskView, load_agent
from examples.evaluation.benchmark import TaskPool
from examples.evaluation.config import BenchmarkConfig
from examples.evaluation.demo_repo import add_new_commits, build_demo_repo
from examples.evaluation.harness import evaluate
from examples.evaluation.mining import mine_commit
from examples.evaluation.run import harness_agents, register_agents, run_epoch

from gauntlet import InMemorySubnet

CFG = BenchmarkConfig(seed="test-seed", tasks_per_epoch=2, window=3, test_timeout_s=60.0)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    pool = TaskPool(build_demo_repo(tmp_path_factory.mktemp("swe") / "repo"), CFG)
    pool.refresh()
    return pool


def _copy(pool: TaskPool, repo: Path, cfg: BenchmarkConfig = CFG) -> TaskPool:
    """A pool that already holds ``pool``'s tasks (mined once per module: each costs test runs)."""
    twin = TaskPool(repo, cfg)
    twin.tasks, twin.skipped, twin.head = list(pool.tasks), list(pool.skipped), pool.head
    return twin


def test_mining_keeps_fixes_with_tests_and_says_why_it_skips_the_rest(pool):
    assert [t.statement.splitlines()[0] for t in pool.tasks] == [
        "Fix mul for negative factors",
        "Fix slugify: drop punctuation",
        "Fix clamp above the upper bound",
    ]
    assert [s.reason for s in pool.skipped] == [
        "root commit",
        "changes no tests",
        "no test fails before and passes after",  # the refactor's new test passed before too
    ]
    mul, slug, clamp = pool.tasks
    assert mul.fail_to_pass == ("tests.test_calc::test_mul_negative",)
    assert slug.fail_to_pass == ("tests.test_text::test_slugify_punctuation",)
    assert clamp.fail_to_pass == ("tests.test_calc::test_clamp_above",)
    # every test of the suite that passed before and after, including the refactor's
    assert "tests.test_calc::test_add_negative" in clamp.pass_to_pass
    assert len(clamp.pass_to_pass) == 9 and clamp.fail_to_pass[0] not in clamp.pass_to_pass
    assert "a/calc.py" in mul.reference_patch and "a/calc.py" not in mul.test_patch
    assert mul.test_files == ("tests/test_calc.py",)


class SlugifyAgent:
    """A submitted agent that knows one fix: it resolves the slugify task and nothing else."""

    name = "slugify-fixer"

    def solve(self, workdir: Path, task: TaskView) -> None:
        text = workdir / "text.py"
        buggy = 'return "-".join(title.lower().split())'
        fixed = 'return "-".join("".join(c if c.isalnum() else " " for c in title).lower().split())'
        text.write_text(text.read_text().replace(buggy, fixed))


def test_null_agent_scores_zero_reference_one_and_only_submitted_agents_get_weight(pool):
    subnet = InMemorySubnet()
    agents = harness_agents(pool, [SlugifyAgent()])
    register_agents(subnet, agents)
    report = run_epoch(pool, agents, 0, subnet)
    assert [t.statement.splitlines()[0] for t in report.tasks] == [
        "Fix mul for negative factors",
        "Fix slugify: drop punctuation",
    ]
    assert report.scores == {"null-agent": 0.0, "reference-agent": 1.0, "slugify-fixer": 0.5}
    assert report.harness_failures == []
    null = report.results["null-agent"]
    assert [r.fail_to_pass for r in null] == [0, 0] and all(
        r.pass_to_pass == r.p2p_total > 0 for r in null
    )
    assert [r.resolved for r in report.results["slugify-fixer"]] == [False, True]
    # the harness agents are the validator's instruments: not registered, never weighted
    assert report.settlement.result.success
    assert report.settlement.weights == {"slugify-fixer": 1.0}
    assert set(subnet.metagraph().hotkey_to_uid()) == {"validator", "slugify-fixer"}


def test_a_broken_harness_sets_no_weights(pool):
    subnet = InMemorySubnet()
    agents = [NullAgent(), ReferenceAgent(lambda task_id: ""), SlugifyAgent()]
    register_agents(subnet, agents)
    report = run_epoch(pool, agents, 0, subnet)
    assert report.harness_failures == ["reference-agent scored 0, must score 1"]
    assert report.scores["slugify-fixer"] == 0.5
    assert (report.settlement.weights, report.settlement.chain_weights) == ({}, None)
    assert not report.settlement.result.success
    assert report.settlement.result.message == (
        "harness check failed: reference-agent scored 0, must score 1"
    )


def test_agent_names_must_be_unique(pool):
    class Impostor(SlugifyAgent):
        name = "reference-agent"

    with pytest.raises(ValueError, match=r"taken more than once: \['reference-agent'\]"):
        harness_agents(pool, [Impostor()])


def test_task_choice_is_deterministic_from_the_seed(pool):
    twin = _copy(pool, pool.repo)
    picks = [[t.task_id for t in pool.select(e)] for e in range(6)]
    assert picks == [[t.task_id for t in twin.select(e)] for e in range(6)]
    assert all(len(p) == 2 and len(set(p)) == 2 for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # epochs draw different subsets
    other = _copy(pool, pool.repo, BenchmarkConfig(seed="another", tasks_per_epoch=2, window=3))
    assert [[t.task_id for t in other.select(e)] for e in range(6)] != picks


class TestEditingAgent:
    """Edits the tests it will be judged by, then crashes: neither must help it."""

    name = "cheater"

    def solve(self, workdir: Path, task: TaskView) -> None:
        for test in (workdir / "tests").glob("test_*.py"):
            test.write_text("def test_everything():\n    assert True\n")
        raise RuntimeError("gave up")


def test_agents_cannot_pass_by_rewriting_tests_and_crashes_are_failures(pool):
    result = evaluate(TestEditingAgent(), pool.tasks[0], pool.repo, CFG)
    assert (result.fail_to_pass, result.resolved) == (0, False)
    assert result.error == "RuntimeError: gave up"


FORCE_PASS = """import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    outcome.get_result().outcome = "passed"
"""


class GamingAgent:
    """Fakes a pass through test infrastructure; optionally also ships the real fix."""

    name = "gamer"

    def __init__(self, fix=None):
        self.fix = fix

    def solve(self, workdir: Path, task: TaskView) -> None:
        if self.fix is not None:
            self.fix.solve(workdir, task)
        (workdir / "conftest.py").write_text(FORCE_PASS)
        (workdir / "tests" / "conftest.py").write_text(FORCE_PASS)
        (workdir / "pytest.ini").write_text("[pytest]\naddopts = -p no:junitxml\n")
        (workdir / "hook.pth").write_text("import os\n")
        (workdir / "helper.py").write_text("import importlib\nimportlib.import_module('_pytest')\n")
        (workdir / "link.py").symlink_to("/etc/hostname")


def test_faked_passes_are_dropped_and_a_real_fix_still_counts(pool):
    task = pool.tasks[0]
    faked = evaluate(GamingAgent(), task, pool.repo, CFG)
    assert (faked.fail_to_pass, faked.resolved) == (0, False)
    assert faked.pass_to_pass == faked.p2p_total > 0  # the base code still passes its own tests
    assert list(faked.dropped) == [
        "conftest.py (test infrastructure)",
        "helper.py (reaches into the test machinery)",
        "hook.pth (test infrastructure)",
        "link.py (link)",
        "pytest.ini (test infrastructure)",
        "tests/conftest.py (test file)",
    ]
    honest = evaluate(GamingAgent(ReferenceAgent(pool.reference_patch)), task, pool.repo, CFG)
    assert honest.resolved and len(honest.dropped) == 6


def test_new_commits_renew_the_pool(pool, tmp_path):
    repo = tmp_path / "clone"  # a clone has the same commit ids; the shared fixture stays as is
    subprocess.run(["git", "clone", "-q", str(pool.repo), str(repo)], check=True)
    pool = _copy(pool, repo)
    before = [t.task_id for t in pool.tasks]
    assert pool.refresh() == []  # nothing new: nothing mined
    add_new_commits(repo)
    new = pool.refresh()
    assert [t.statement.splitlines()[0] for t in new] == [
        "Fix median of an even number of values",
        "parse_bool: accept yes, 1 and any case",
    ]
    assert [t.task_id for t in pool.active()] == [before[-1], *(t.task_id for t in new)]
    active = {t.task_id for t in pool.active()}
    assert all(t.task_id in active for e in range(4) for t in pool.select(e))
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert pool.head == head
    assert evaluate(ReferenceAgent(pool.reference_patch), new[0], repo, CFG).resolved


def test_broken_fix_is_not_a_task(tmp_path):
    """A commit whose added test still fails after the change proves nothing: skipped."""
    repo = tmp_path / "repo"
    env_args = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "tests").mkdir()
    (repo / "m.py").write_text("def f():\n    return 1\n")
    test = "from m import f\n\n\ndef test_f():\n    assert f()\n"
    (repo / "tests" / "test_m.py").write_text(test)
    for args in (["add", "-A"], [*env_args, "commit", "-q", "-m", "base"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    (repo / "m.py").write_text("def f():\n    return 2\n")
    (repo / "tests" / "test_m.py").write_text(test + "\n\ndef test_three():\n    assert f() == 3\n")
    for args in (["add", "-A"], [*env_args, "commit", "-q", "-m", "attempt"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    shas = subprocess.run(
        ["git", "-C", str(repo), "rev-list", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.split()
    result = mine_commit(repo, shas[0], shas[1], CFG)
    assert result.reason == "no test fails before and passes after"


def test_agents_load_from_a_spec():
    assert load_agent("examples.evaluation.agents:NullAgent").name == "null-agent"
    with pytest.raises(ValueError, match=r"package\.module:ClassName"):
        load_agent("examples.evaluation.agents")
    with pytest.raises(TypeError, match="not an agent"):
        load_agent("examples.evaluation.config:BenchmarkConfig")
