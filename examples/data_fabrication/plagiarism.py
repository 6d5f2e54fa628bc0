"""Two-pass anti-plagiarism: a cheap screen against every earlier submission, then a finer
check only on the suspicious band (REFERENCE §4).

Pass 1 compares MinHash signatures (estimated Jaccard) of three shingle sets per submission:

* code: shingles of the normalized AST (identifiers renamed by first use, literals replaced
  by their type, docstrings dropped), so renaming variables or reformatting changes nothing;
* data: word shingles of the generated pairs, so republishing someone's data under new code
  is caught;
* template: word shingles of the prompts with numbers and quoted text masked, the shape of
  the data whatever the seed.

Code or data similarity ≥ 0.97 to an earlier submission is a copy. Any of the three in the
suspicious band (≥ 0.30) sends the pair to pass 2; a shared template alone never convicts,
since two honest miners can well ask ``Compute: a * b + c``. Pass 2 looks closer: the exact
Jaccard of the code shingles (no estimation error), and behaviour: both generators run with
the same probe seed and their outputs are compared. Code restructured enough to slip past pass
1 still prints the same pairs as the code it came from.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from examples.common.similarity import MinHasher, Verdict, jaccard, shingles, verdict
from examples.data_fabrication.config import FabricationConfig
from examples.data_fabrication.tasks import Pair


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def code_tokens(source: str) -> list[str]:
    """Normalized AST tokens of Python source (whitespace-split source if it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source.split()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0]):
            node.body = body[1:]  # type: ignore[attr-defined]
    names: dict[str, str] = {}
    out: list[str] = []

    def name(identifier: str) -> str:
        return names.setdefault(identifier, f"id{len(names)}")

    def visit(node: ast.AST) -> None:
        out.append(type(node).__name__)
        if isinstance(node, ast.Name):
            out.append(name(node.id))
        elif isinstance(node, ast.arg):
            out.append(name(node.arg))
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            out.append(name(node.name))
        elif isinstance(node, ast.Attribute):
            out.append(node.attr)  # library API names (rng.randint) are not renamed by copiers
        elif isinstance(node, ast.Constant):
            out.append(type(node.value).__name__)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def data_shingles(pairs: Sequence[Pair], n: int) -> set[str]:
    """Word ``n``-shingles of each pair's prompt and response (never across pairs)."""
    out: set[str] = set()
    for pair in pairs:
        out |= shingles(f"{pair.prompt} => {pair.response}".lower().split(), n)
    return out


def template_shingles(pairs: Sequence[Pair], n: int) -> set[str]:
    """Word ``n``-shingles of each prompt with digit runs and quoted text masked."""
    out: set[str] = set()
    for pair in pairs:
        masked = re.sub(r"\d+", "#", re.sub(r'"[^"]*"', '"_"', pair.prompt)).lower()
        out |= shingles(masked.split(), n)
    return out


@dataclass(frozen=True)
class PlagiarismVerdict:
    """The outcome of both passes for one submission.

    Attributes:
        verdict: ``copy`` or ``original`` (``suspicious`` only ever leads to pass 2).
        pass1: the pass-1 similarity that decided, and ``pass1_kind`` which set it came from
            (``code``, ``data`` or ``template``).
        closest: the earlier submission it was closest to (None for the first).
        pass2: the highest pass-2 similarity, None when pass 2 did not run.
    """

    verdict: Verdict
    pass1: float
    pass1_kind: str
    closest: str | None
    pass2: float | None = None

    def describe(self) -> str:
        if self.closest is None:
            return "first submission"
        text = f"pass 1 {self.pass1_kind} {self.pass1:.2f} vs {self.closest}"
        if self.pass2 is not None:
            text += f"; pass 2 {self.pass2:.2f}"
        return text


@dataclass(frozen=True)
class _Entry:
    hotkey: str
    source: str
    code: set[str]
    signatures: dict[str, np.ndarray]


class PlagiarismChecker:
    """Checks submissions in arrival order, each against all earlier ones.

    Args:
        cfg: thresholds, shingle sizes and MinHash slots.
        probe: runs a generator's source with the shared probe seed and returns its output
            lines (None if the run fails); called only in pass 2.
    """

    def __init__(self, cfg: FabricationConfig, probe: Callable[[str], list[str] | None]) -> None:
        self.cfg = cfg
        self.probe = probe
        self.hasher = MinHasher(cfg.num_perm, seed=cfg.seed)
        self.earlier: list[_Entry] = []
        self._probed: dict[str, set[str] | None] = {}

    def _behaviour(self, entry: _Entry) -> set[str] | None:
        if entry.hotkey not in self._probed:
            lines = self.probe(entry.source)
            self._probed[entry.hotkey] = None if lines is None else set(lines)
        return self._probed[entry.hotkey]

    def _pass2(self, entry: _Entry, other: _Entry) -> float:
        similarity = jaccard(entry.code, other.code)
        mine, theirs = self._behaviour(entry), self._behaviour(other)
        if mine is not None and theirs is not None:
            similarity = max(similarity, jaccard(mine, theirs))
        return similarity

    def check(self, hotkey: str, source: str, pairs: Sequence[Pair]) -> PlagiarismVerdict:
        """Both passes for one submission, which then joins the earlier ones."""
        code = shingles(code_tokens(source), self.cfg.code_shingle)
        sets = {
            "code": code,
            "data": data_shingles(pairs, self.cfg.data_shingle),
            "template": template_shingles(pairs, self.cfg.data_shingle),
        }
        entry = _Entry(hotkey, source, code, {k: self.hasher.signature(v) for k, v in sets.items()})
        earlier, self.earlier = self.earlier, [*self.earlier, entry]
        if not earlier:
            return PlagiarismVerdict("original", 0.0, "code", None)
        # per earlier submission: (similarity, kind) for conviction (code, data) and escalation
        convict: list[tuple[float, str, _Entry]] = []
        escalate: list[tuple[float, str, _Entry]] = []
        for other in earlier:
            sims = {
                kind: MinHasher.estimate(sig, other.signatures[kind])
                for kind, sig in entry.signatures.items()
            }
            kind = max(("code", "data"), key=sims.__getitem__)
            convict.append((sims[kind], kind, other))
            kind = max(sims, key=sims.__getitem__)
            escalate.append((sims[kind], kind, other))
        # max() keeps the first of equal values: ties go to the earliest submission
        best, kind, closest = max(convict, key=lambda t: t[0])
        if verdict(best, self.cfg.thresholds) == "copy":
            return PlagiarismVerdict("copy", best, kind, closest.hotkey)
        best, kind, closest = max(escalate, key=lambda t: t[0])
        suspects = [o for s, _, o in escalate if verdict(s, self.cfg.thresholds) != "original"]
        if not suspects:
            return PlagiarismVerdict("original", best, kind, closest.hotkey)
        pass2 = max(self._pass2(entry, other) for other in suspects)
        final: Verdict = "copy" if verdict(pass2, self.cfg.thresholds) == "copy" else "original"
        return PlagiarismVerdict(final, best, kind, closest.hotkey, pass2)
