"""The benchmark's typed configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchmarkConfig:
    """How tasks are mined, chosen and run.

    Args:
        seed: the public seed task choice is drawn from (with the epoch and the repository
            head, so validators that see the same history pick the same tasks).
        tasks_per_epoch: tasks each agent is scored on per epoch.
        window: only the newest ``window`` mined tasks can be drawn; older ones retire, so
            the benchmark renews itself as commits arrive.
        test_timeout_s: wall-clock limit of one test-suite run.
        test_dirs: path prefixes that mark test files; every other changed file is code.
    """

    seed: str = "swe-epoch"
    tasks_per_epoch: int = 2
    window: int = 3
    test_timeout_s: float = 60.0
    test_dirs: tuple[str, ...] = ("tests/",)

    def __post_init__(self) -> None:
        if self.tasks_per_epoch < 1 or self.window < self.tasks_per_epoch:
            raise ValueError(
                f"need 1 <= tasks_per_epoch <= window, got {self.tasks_per_epoch} and {self.window}"
            )
        if not self.test_timeout_s > 0:
            raise ValueError(f"test_timeout_s must be > 0, got {self.test_timeout_s}")
        if not self.test_dirs:
            raise ValueError("test_dirs must name at least one prefix")
