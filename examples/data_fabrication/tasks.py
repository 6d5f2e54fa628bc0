"""The record format and the task families whose answers the validator recomputes.

One JSONL line per pair: ``{"task": str, "prompt": str, "response": str}`` and nothing else.
Every task family has a fixed prompt form, so the validator can parse the question back out of
the prompt and compute the answer itself:

==============  =========================================  ===================================
task            prompt                                     response
==============  =========================================  ===================================
arithmetic      ``Compute: 37 * 4 - 12``                   the integer (``136``)
reverse         ``Reverse the text: "stone"``              the text reversed (``enots``)
sort_words      ``Sort alphabetically: pear apple fig``    ``apple fig pear``
count_char      ``How many times does "a" occur in         the count (``2``)
                "banana"?``  (one line)
==============  =========================================  ===================================

Arithmetic is evaluated on the parsed AST with only integers, ``+ - *`` and unary minus, and
bounded operand sizes, so a prompt can never make the validator do unbounded work.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_PROMPT_CHARS = 2000
MAX_RESPONSE_CHARS = 2000
_MAX_OPERAND = 10**12


@dataclass(frozen=True)
class Pair:
    """One valid record."""

    task: str
    prompt: str
    response: str


def _arith(node: ast.AST) -> int:
    if (
        isinstance(node, ast.Constant)
        and type(node.value) is int
        and abs(node.value) <= _MAX_OPERAND
    ):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_arith(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult):
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Mult) and max(abs(left), abs(right)) > _MAX_OPERAND:
            raise ValueError("operand too large")
        ops = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__}
        return ops[type(node.op)](left, right)
    raise ValueError(f"not allowed in arithmetic: {ast.dump(node)[:40]}")


def _arithmetic(prompt: str) -> str | None:
    m = re.fullmatch(r"Compute: ([0-9+\-* ()]{1,200})", prompt)
    if m is None:
        return None
    try:
        return str(_arith(ast.parse(m.group(1), mode="eval").body))
    except (SyntaxError, ValueError, RecursionError):
        return None


def _reverse(prompt: str) -> str | None:
    m = re.fullmatch(r'Reverse the text: "([^"\n]+)"', prompt)
    return None if m is None else m.group(1)[::-1]


def _sort_words(prompt: str) -> str | None:
    m = re.fullmatch(r"Sort alphabetically: ([a-z]+(?: [a-z]+)+)", prompt)
    return None if m is None else " ".join(sorted(m.group(1).split(" ")))


def _count_char(prompt: str) -> str | None:
    m = re.fullmatch(r'How many times does "(.)" occur in "([^"\n]+)"\?', prompt)
    return None if m is None else str(m.group(2).count(m.group(1)))


#: task name → the answer the prompt asks for (None when the prompt is not of that form)
SOLVERS: dict[str, Callable[[str], str | None]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sort_words": _sort_words,
    "count_char": _count_char,
}


def parse_line(line: str) -> Pair | None:
    """The pair in one JSONL line, or None if the line breaks the format."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # a line of 100,000 "[" must not end the epoch
        return None
    if not isinstance(record, dict) or set(record) != {"task", "prompt", "response"}:
        return None
    task, prompt, response = record["task"], record["prompt"], record["response"]
    if not all(isinstance(v, str) for v in (task, prompt, response)) or task not in SOLVERS:
        return None
    if not 0 < len(prompt) <= MAX_PROMPT_CHARS or not 0 < len(response) <= MAX_RESPONSE_CHARS:
        return None
    return Pair(task, prompt, response)


def is_correct(pair: Pair) -> bool:
    """Whether the response is the answer the validator computes from the prompt."""
    expected = SOLVERS[pair.task](pair.prompt)
    return expected is not None and pair.response.strip() == expected
