"""The challenge's typed configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from examples.common.similarity import Thresholds


@dataclass(frozen=True)
class SandboxLimits:
    """What one generator run may use.

    Args:
        timeout_s: wall-clock limit; the whole process group is killed after it.
        cpu_s: CPU-time limit (RLIMIT_CPU).
        memory_mb: address-space limit (RLIMIT_AS); Python itself needs about 30 MB.
        output_bytes: the most a run may print (RLIMIT_FSIZE on its stdout file).
    """

    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 256
    output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or self.cpu_s < 1 or self.memory_mb < 64 or self.output_bytes < 1:
            raise ValueError(
                "need timeout_s > 0, cpu_s >= 1, memory_mb >= 64 and output_bytes >= 1, got "
                f"{self.timeout_s}, {self.cpu_s}, {self.memory_mb}, {self.output_bytes}"
            )


@dataclass(frozen=True)
class FabricationConfig:
    """One epoch of the challenge.

    Args:
        seed: the epoch's public seed; each generator runs with a seed derived from it and
            the miner's hotkey, and pass 2 runs suspects with a shared probe seed.
        count: pairs each generator must print.
        limits: the sandbox's limits.
        thresholds: similarity bands (≥ copy: copy; ≥ suspicious: pass 2).
        code_shingle: tokens per shingle of normalized code.
        data_shingle: words per shingle of generated text.
        num_perm: MinHash slots of pass 1.
    """

    seed: str = "fabrication-epoch-1"
    count: int = 200
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    thresholds: Thresholds = field(default_factory=Thresholds)
    code_shingle: int = 6
    data_shingle: int = 3
    num_perm: int = 128

    def __post_init__(self) -> None:
        for name in ("count", "code_shingle", "data_shingle", "num_perm"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
