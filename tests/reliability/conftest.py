"""Loads the reliability harness modules from benchmarks/ (importlib mode adds no sys.path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark_module(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` once, registered so dataclasses can find it."""
    key = f"_reliability_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="session")
def fuzzlib() -> ModuleType:
    return load_benchmark_module("reliability_fuzz")


@pytest.fixture(scope="session")
def fuzz_target(fuzzlib):
    return fuzzlib.Target.build()


@pytest.fixture(scope="session")
def faultlib() -> ModuleType:
    return load_benchmark_module("reliability_faults")
