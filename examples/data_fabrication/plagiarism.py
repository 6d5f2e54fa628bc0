"""Two-pass anti-plagiarism: a cheap screen against every earlier submission, then a finer
check only on the suspicious band (REFERENCE §4).

Pass 1 compares MinHash signatures (estimated Jaccard) of three shingle sets per submission:

* code: shingles of the normalized AST (identifiers renamed by first use, literals replaced
  by their type, docstrings dropped), so renaming variables or reformatting changes nothing;
* data: word shingles of the generated pairs, so republishing someone's data under new code
  is caught;
* template: word shingles of the prompts with numbers and quoted text masked, the shape of
  the data whatever the seed.

Earlier epochs' accepted data joins the comparison (:meth:`PlagiarismChecker.add_accepted`),
on data and template only since it comes without code, so data republished from an earlier
epoch is caught too. Code or data similarity ≥ 0.97 to an earlier entry is a copy. Any of the
three in the suspicious band (≥ 0.30) sends the pair to pass 2; a shared template alone never
convicts, since two honest miners can well ask ``Compute: a * b + c``. Pass 2 looks closer:
the exact Jaccard of the code shingles (no estimation error), and behaviour: both generators
run with the same probe seed and their outputs are compared. Code restructured enough to slip
past pass 1 still prints the same pairs as the code it came from. Against earlier accepted
data, pass 2 is the exact Jaccard of the data shingles.
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
        pass2: the highest pass-2 similarity, None when pass 2 did not run, and
            ``pass2_closest`` the entry it was measured against.
    """

    verdict: Verdict
    pass1: float
    pass1_kind: str
    closest: str | None
    pass2: float | None = None
    pass2_closest: str | None = None

    def describe(self) -> str:
        if self.closest is None:
            return "first submission"
        text = f"pass 1 {self.pass1_kind} {self.pass1:.2f} vs {self.closest}"
        if self.pass2 is not None:
            text += f"; pass 2 {self.pass2:.2f}"
            if self.pass2_closest != self.closest:
                text += f" vs {self.pass2_closest}"
        return text


@dataclass(frozen=True)
class _Entry:
    hotkey: str
    source: str | None  # None: earlier accepted data, which has no code
    code: set[str]
    data: set[str]
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

    def add_accepted(self, label: str, pairs: Sequence[Pair]) -> None:
        """Add an earlier epoch's accepted data (``label``: whose and when) to compare against.

        Call before :meth:`check`; it is compared on data and template, not code.
        """
        data = data_shingles(pairs, self.cfg.data_shingle)
        template = template_shingles(pairs, self.cfg.data_shingle)
        signatures = {
            "data": self.hasher.signature(data),
            "template": self.hasher.signature(template),
        }
        self.earlier.append(_Entry(label, None, set(), data, signatures))

    def _behaviour(self, entry: _Entry) -> set[str] | None:
        assert entry.source is not None
        if entry.hotkey not in self._probed:
            lines = self.probe(entry.source)
            self._probed[entry.hotkey] = None if lines is None else set(lines)
        return self._probed[entry.hotkey]

    def _pass2(self, entry: _Entry, other: _Entry) -> float:
        if other.source is None:
            return jaccard(entry.data, other.data)
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
        signatures = {k: self.hasher.signature(v) for k, v in sets.items()}
        entry = _Entry(hotkey, source, code, sets["data"], signatures)
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
                if kind in other.signatures  # earlier accepted data has no code
            }
            kind = max((k for k in ("code", "data") if k in sims), key=sims.__getitem__)
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
        # ties go to the earliest suspect, as in pass 1
        pass2, other = max(((self._pass2(entry, o), o) for o in suspects), key=lambda t: t[0])
        final: Verdict = "copy" if verdict(pass2, self.cfg.thresholds) == "copy" else "original"
        return PlagiarismVerdict(final, best, kind, closest.hotkey, pass2, other.hotkey)
