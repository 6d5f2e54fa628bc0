"""Epochs of the benchmark: mine → draw tasks → run every agent → score → weights → renew.

``python -m examples.evaluation [--repo PATH] [--epochs N] [--agent pkg.module:Class ...]``
from the repository root. Without ``--repo`` it builds the demo repository under ``--out``
and adds two new fix commits before each later epoch, so the renewal is visible. The null
and reference agents always run: their scores (0 and 1) check the harness itself. They are
the validator's own instruments, not miners: weights go to the submitted agents only, and a
harness that fails its check sets no weights (the command then exits with status 1).
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from examples.common.settle import Settlement, settle
from examples.common.table import format_table
from examples.evaluation.agents import Agent, NullAgent, ReferenceAgent, load_agent
from examples.evaluation.benchmark import TaskPool
from examples.evaluation.config import BenchmarkConfig
from examples.evaluation.demo_repo import add_new_commits, build_demo_repo
from examples.evaluation.harness import TaskResult, evaluate
from examples.evaluation.mining import Task
from gauntlet import InMemorySubnet, SetWeightsResult

VALIDATOR = "validator"
#: what the harness agents must score; anything else means the harness is broken
HARNESS_EXPECTED = {NullAgent.name: 0.0, ReferenceAgent.name: 1.0}


@dataclass(frozen=True)
class EpochReport:
    """One epoch: the drawn tasks, every agent's results and the settlement."""

    epoch: int
    tasks: list[Task]
    results: dict[str, list[TaskResult]]
    settlement: Settlement

    @property
    def scores(self) -> dict[str, float]:
        """Fraction of the epoch's tasks each agent resolved."""
        return _scores(self.results)

    @property
    def harness_failures(self) -> list[str]:
        """Each harness agent that did not score what it must (empty: the harness is sound)."""
        return _harness_failures(self.scores)


def _scores(results: Mapping[str, list[TaskResult]]) -> dict[str, float]:
    return {a: sum(r.resolved for r in rs) / len(rs) for a, rs in results.items()}


def _harness_failures(scores: Mapping[str, float]) -> list[str]:
    return [
        f"{name} scored {scores[name]:g}, must score {want:g}"
        for name, want in HARNESS_EXPECTED.items()
        if name in scores and scores[name] != want
    ]


def is_harness_agent(agent: Agent) -> bool:
    """The null and reference agents: they check the harness and never receive weight."""
    return isinstance(agent, NullAgent | ReferenceAgent)


def run_epoch(
    pool: TaskPool,
    agents: list[Agent],
    epoch: int,
    subnet: InMemorySubnet,
    prior_ratings: Mapping[str, tuple[float, float]] | None = None,
) -> EpochReport:
    """Draw the epoch's tasks, run each agent on each, and set weights by resolved fraction.

    Weights go to the submitted agents only, and only if the harness agents scored 0 and 1.
    """
    tasks = pool.select(epoch)
    results = {a.name: [evaluate(a, t, pool.repo, pool.cfg) for t in tasks] for a in agents}
    scores = _scores(results)
    failures = _harness_failures(scores)
    if failures:
        ratings = dict(prior_ratings or {})
        refused = SetWeightsResult(False, "harness check failed: " + "; ".join(failures))
        return EpochReport(epoch, tasks, results, Settlement(ratings, {}, {}, None, refused))
    paid = {a.name: scores[a.name] for a in agents if not is_harness_agent(a)}
    return EpochReport(epoch, tasks, results, settle(subnet, VALIDATOR, paid, prior_ratings))


def harness_agents(pool: TaskPool, extra: list[Agent]) -> list[Agent]:
    """The null and reference agents (harness checks) followed by the submitted ones.

    Results and weights are keyed by agent name, so names must be unique.
    """
    agents = [NullAgent(), ReferenceAgent(pool.reference_patch), *extra]
    names = [a.name for a in agents]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"agent names must be unique; taken more than once: {clashes}")
    return agents


def register_agents(subnet: InMemorySubnet, agents: list[Agent]) -> None:
    """Register the validator and every submitted agent (the harness agents are no miners)."""
    subnet.register(VALIDATOR, stake=1000.0)
    for agent in agents:
        if not is_harness_agent(agent):
            subnet.register(agent.name)


def epoch_table(report: EpochReport) -> str:
    """Per task and agent: fail_to_pass and pass_to_pass passed, resolved or not, and what
    went wrong (the agent's crash, changes the harness dropped)."""
    rows = []
    for agent, results in report.results.items():
        for task, r in zip(report.tasks, results, strict=True):
            rows.append(
                [
                    agent,
                    r.task_id,
                    task.statement.splitlines()[0][:44],
                    f"{r.fail_to_pass}/{r.f2p_total}",
                    f"{r.pass_to_pass}/{r.p2p_total}",
                    "yes" if r.resolved else "no",
                    "; ".join(filter(None, [r.error, *r.dropped])),
                ]
            )
    headers = ["agent", "task", "statement", "f2p", "p2p", "resolved", "error / dropped"]
    return format_table(headers, rows)


def _indented(line: str) -> None:
    print("  " + line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.evaluation", description=__doc__)
    parser.add_argument("--repo", help="a git repository to mine (default: the demo repository)")
    parser.add_argument("--out", default="runs/evaluation", help="where the demo repo is built")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", default=BenchmarkConfig.seed, help="the public seed")
    parser.add_argument("--agent", action="append", default=[], help="pkg.module:Class to score")
    args = parser.parse_args(argv)
    cfg = BenchmarkConfig(seed=args.seed)
    demo = args.repo is None
    repo = Path(args.repo) if args.repo else Path(args.out) / "repo"
    if demo:
        shutil.rmtree(repo, ignore_errors=True)
        build_demo_repo(repo)
    pool = TaskPool(repo, cfg)
    print(f"mining {repo}")
    pool.refresh(_indented)
    agents = harness_agents(pool, [load_agent(spec) for spec in args.agent])
    subnet = InMemorySubnet(netuid=100)
    register_agents(subnet, agents)
    ratings: dict[str, tuple[float, float]] = {}
    harness_sound = True
    for epoch in range(args.epochs):
        if epoch and demo:
            add_new_commits(repo)
            print("new commits arrived; mining them")
            pool.refresh(_indented)
        active = ", ".join(t.task_id for t in pool.active())
        report = run_epoch(pool, agents, epoch, subnet, ratings)
        ratings = report.settlement.ratings
        print(f"\nepoch {epoch}: active tasks [{active}], drawn {len(report.tasks)}")
        print(epoch_table(report))
        scores = {a: round(s, 3) for a, s in report.scores.items()}
        print(f"scores {scores}")
        if report.harness_failures:
            harness_sound = False
            print(f"harness check FAILED: {'; '.join(report.harness_failures)}; no weights set")
            continue
        print(f"harness check: ok ({NullAgent.name} 0, {ReferenceAgent.name} 1)")
        if all(is_harness_agent(a) for a in agents):
            print("weights: none set, no submitted agents (add one with --agent pkg.module:Class)")
            continue
        weights = {a: round(w, 3) for a, w in report.settlement.weights.items()}
        print(f"weights {weights}; chain: {report.settlement.result.message}")
    return 0 if harness_sound else 1
