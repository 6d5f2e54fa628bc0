"""The package layers run one way: core ← netcomm, gauntlet ← subnet (roles, chain, CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
OURS = {"sparseloco", "netcomm", "gauntlet", "subnet"}
ALLOWED = {
    "sparseloco": set(),
    "netcomm": {"sparseloco"},
    "gauntlet": {"sparseloco"},
    "subnet": {"sparseloco", "netcomm", "gauntlet"},
}


def _imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_layers_below(package: str) -> None:
    files = sorted((SRC / package).rglob("*.py"))
    assert files, f"no sources for {package}"
    bad = {
        str(f.relative_to(SRC)): sorted(_imported_packages(f) - ALLOWED[package] - {package})
        for f in files
    }
    assert {f: pkgs for f, pkgs in bad.items() if pkgs} == {}


def test_every_package_is_checked() -> None:
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    assert packages == OURS
