"""A small repository whose history the demo (and the tests) mine.

:func:`build_demo_repo` writes six commits: a root, three bug fixes that each add a test
(tasks), a README change (no tests: skipped) and a refactor whose new test already passed
before (no fail_to_pass: skipped). :func:`add_new_commits` adds two more fixes, the "new
merged changes" that renew the benchmark. Author, committer and dates are fixed, so the
commit ids, and hence the seeded task choice, are the same on every machine.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_ENV = {
    "GIT_AUTHOR_NAME": "Demo Dev",
    "GIT_AUTHOR_EMAIL": "dev@example.invalid",
    "GIT_COMMITTER_NAME": "Demo Dev",
    "GIT_COMMITTER_EMAIL": "dev@example.invalid",
}

CALC = """def add(a, b):
    return a + b


def mul(a, b):
    result = 0
    for _ in range(b):
        result += a
    return result


def clamp(x, lo, hi):
    return max(lo, x) if x < hi else x


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
"""

TEXT = """def slugify(title):
    return "-".join(title.lower().split())


def parse_bool(value):
    return value == "true"
"""

TEST_CALC = """from calc import add, clamp, median, mul


def test_add():
    assert add(2, 3) == 5


def test_mul_positive():
    assert mul(3, 4) == 12


def test_clamp_below():
    assert clamp(-5, 0, 10) == 0


def test_median_odd():
    assert median([3, 1, 2]) == 2
"""

TEST_TEXT = """from text import parse_bool, slugify


def test_slugify_words():
    assert slugify("Hello World") == "hello-world"


def test_parse_bool_true():
    assert parse_bool("true") is True
"""

# (message, {path: (old text, new text)}) applied in order; old text "" appends
_FIXES: list[tuple[str, dict[str, tuple[str, str]]]] = [
    (
        "Fix mul for negative factors\n\nmul(3, -2) returned 0 instead of -6.",
        {
            "calc.py": (
                "    result = 0\n    for _ in range(b):\n        result += a\n    return result\n",
                "    sign = -1 if b < 0 else 1\n    result = 0\n    for _ in range(abs(b)):\n"
                "        result += a\n    return sign * result\n",
            ),
            "tests/test_calc.py": (
                "",
                "\n\ndef test_mul_negative():\n    assert mul(3, -2) == -6\n",
            ),
        },
    ),
    (
        "Docs: usage in the README",
        {"README.md": ("", "Helpers: `calc` (arithmetic) and `text` (strings).\n")},
    ),
    (
        "Fix slugify: drop punctuation\n\nslugify('Hello, World!') gave 'hello,-world!'.",
        {
            "text.py": (
                'def slugify(title):\n    return "-".join(title.lower().split())\n',
                "def slugify(title):\n"
                '    kept = "".join(c if c.isalnum() or c.isspace() else " " for c in title)\n'
                '    return "-".join(kept.lower().split())\n',
            ),
            "tests/test_text.py": (
                "",
                '\n\ndef test_slugify_punctuation():\n    assert slugify("Hello, World!") == '
                '"hello-world"\n',
            ),
        },
    ),
    (
        "Refactor add through sum; cover more operands",
        {
            "calc.py": (
                "def add(a, b):\n    return a + b\n",
                "def add(a, b):\n    return sum((a, b))\n",
            ),
            "tests/test_calc.py": (
                "",
                "\n\ndef test_add_negative():\n    assert add(-2, -3) == -5\n",
            ),
        },
    ),
    (
        "Fix clamp above the upper bound\n\nclamp(15, 0, 10) returned 15.",
        {
            "calc.py": (
                "    return max(lo, x) if x < hi else x\n",
                "    return max(lo, min(x, hi))\n",
            ),
            "tests/test_calc.py": (
                "",
                "\n\ndef test_clamp_above():\n    assert clamp(15, 0, 10) == 10\n",
            ),
        },
    ),
]

_NEW_FIXES: list[tuple[str, dict[str, tuple[str, str]]]] = [
    (
        "Fix median of an even number of values",
        {
            "calc.py": (
                "    return ordered[len(ordered) // 2]\n",
                "    mid = len(ordered) // 2\n"
                "    if len(ordered) % 2:\n        return ordered[mid]\n"
                "    return (ordered[mid - 1] + ordered[mid]) / 2\n",
            ),
            "tests/test_calc.py": (
                "",
                "\n\ndef test_median_even():\n    assert median([4, 1, 3, 2]) == 2.5\n",
            ),
        },
    ),
    (
        "parse_bool: accept yes, 1 and any case",
        {
            "text.py": (
                '    return value == "true"\n',
                '    return value.strip().lower() in ("true", "yes", "1")\n',
            ),
            "tests/test_text.py": (
                "",
                "\n\ndef test_parse_bool_variants():\n"
                '    assert all(parse_bool(v) for v in ("Yes", "1", "TRUE"))\n',
            ),
        },
    ),
]


def _commit(repo: Path, message: str, step: int) -> None:
    date = f"2024-01-01T00:{step:02d}:00Z"
    env = {**os.environ, **_ENV, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
    for args in (["add", "-A"], ["-c", "commit.gpgsign=false", "commit", "-q", "-m", message]):
        subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True)


def _apply(repo: Path, fixes: list[tuple[str, dict[str, tuple[str, str]]]]) -> None:
    count = len(
        subprocess.run(
            ["git", "-C", str(repo), "rev-list", "--all"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout.split()
    )
    for step, (message, edits) in enumerate(fixes, start=count):
        for path, (old, new) in edits.items():
            target = repo / path
            text = target.read_text() if target.exists() else ""
            if old and old not in text:
                raise ValueError(f"{path} does not contain the text this fix replaces")
            target.write_text(text.replace(old, new, 1) if old else text + new)
        _commit(repo, message, step)


def build_demo_repo(path: Path) -> Path:
    """Create the demo repository at ``path`` (must not exist or be empty); returns it."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, capture_output=True)
    (path / "tests").mkdir()
    for name, text in {
        "calc.py": CALC,
        "text.py": TEXT,
        "tests/test_calc.py": TEST_CALC,
        "tests/test_text.py": TEST_TEXT,
    }.items():
        (path / name).write_text(text)
    _commit(path, "Initial: calc and text helpers with tests", 0)
    _apply(path, _FIXES)
    return path


def add_new_commits(path: Path) -> None:
    """Add the two later fixes (the benchmark's renewal)."""
    _apply(path, _NEW_FIXES)
