"""Data fabrication example: sandbox verdicts, answer checks, both plagiarism passes, scores."""

from __future__ import annotations

import json
import math

import pytest
from examples.common.similarity import MinHasher, Thresholds, jaccard, shingles, verdict
from examples.common.submissions import Submission
from examples.data_fabrication.config import FabricationConfig, SandboxLimits
from examples.data_fabrication.miners import GENERATORS
from examples.data_fabrication.plagiarism import code_tokens
from examples.data_fabrication.run import (
    ACCEPTED,
    EPOCHS,
    epoch_segment,
    load_accepted,
    results_table,
    run_epoch,
)
from examples.data_fabrication.sandbox import run_generator
from examples.data_fabrication.tasks import Pair, is_correct, parse_line
from examples.data_fabrication.validator import evaluate_epoch

from netcomm import LocalStorage

# Honest generators use ~0.05 CPU s. The wall-clock limit is far off so a loaded machine never
# ends one; the CPU-time limit (independent of load) ends the endless loop after 1 CPU s.
CFG = FabricationConfig(seed="test-epoch", count=60, limits=SandboxLimits(timeout_s=30.0, cpu_s=1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fabrication")


@pytest.fixture(scope="module")
def epoch(workdir):
    return run_epoch(CFG, workdir)


@pytest.fixture(scope="module")
def by(epoch):
    return {r.hotkey: r for r in epoch.results}


def test_sandbox_limits_end_bad_generators(by):
    # an endless loop hits the CPU-time limit (the wall clock is tested on a sleeper below)
    assert by["grace"].status in ("timeout", "cpu") and by["grace"].score == 0.0
    assert (by["heidi"].status, by["heidi"].score) == ("memory", 0.0)
    assert all(by[h].status == "ok" for h in ("alice", "bob", "carol", "dave", "erin", "ivan"))


def test_format_and_quality_scores(by):
    assert (by["alice"].valid, by["alice"].correct, by["alice"].score) == (60, 60, 1.0)
    assert by["bob"].score == 1.0
    assert by["ivan"].format_score == 0.25 and by["ivan"].quality == 1.0  # 1 line in 4 is valid
    assert 0.5 < by["frank"].quality < 0.85 and by["frank"].format_score == 1.0


def test_plagiarism_verdicts_of_both_passes(by):
    assert by["alice"].plagiarism.closest is None
    carol = by["carol"].plagiarism  # renamed copy: caught by pass 1 on code alone
    assert (carol.verdict, carol.pass1_kind, carol.closest, carol.pass2) == (
        "copy",
        "code",
        "alice",
        None,
    )
    assert carol.pass1 >= 0.97
    dave = by["dave"].plagiarism  # restructured copy: only the template is close; pass 2 runs it
    assert (dave.verdict, dave.closest, dave.pass2, dave.pass2_closest) == (
        "copy",
        "alice",
        1.0,
        "alice",
    )
    assert by["dave"].plagiarism.pass1 >= 0.30 and dave.pass1_kind == "template"
    erin = by["erin"].plagiarism  # same templates, independent code: suspicious, then cleared
    assert erin.verdict == "original" and erin.pass2 is not None and erin.pass2 < 0.30
    assert by["carol"].score == by["dave"].score == 0.0 and by["erin"].score > 0.5


def test_weights_follow_scores_and_reach_the_chain(epoch, by):
    s = epoch.settlement
    assert s.result.success and math.isclose(sum(s.weights.values()), 1.0)
    assert s.weights["alice"] == s.weights["bob"] == max(s.weights.values())
    assert all(s.weights[h] == 0 for h in ("carol", "dave", "grace", "heidi"))
    assert [r.hotkey for r in epoch.results][:2] == ["alice", "bob"]
    table = results_table(epoch)
    assert "copy" in table and ("timeout" in table or "cpu" in table)


def test_a_later_epoch_checks_against_earlier_accepted_data(epoch, workdir):
    storage = LocalStorage(workdir / "bucket", fsync=False)
    assert load_accepted(storage, CFG.seed) == {}  # an epoch never compares with itself
    earlier = load_accepted(storage, "test-epoch-2")
    assert sorted(earlier) == ["alice@test-epoch", "bob@test-epoch", "erin@test-epoch",
                               "frank@test-epoch", "ivan@test-epoch"]  # fmt: skip
    alice = earlier["alice@test-epoch"]
    assert len(alice) == 60 and all(is_correct(p) for p in alice)
    assert len(earlier["ivan@test-epoch"]) == 15  # only the valid, correct pairs are kept
    # mallory republishes alice's accepted pairs from the earlier epoch; alice runs again
    lines = [json.dumps(p.__dict__) for p in alice]
    republish = f"for line in {lines!r}:\n    print(line)\n"
    honest = (GENERATORS / "alice.py").read_text()
    later = FabricationConfig(seed="test-epoch-2", count=60, limits=CFG.limits)
    subs = [
        Submission("data-fabrication", "mallory", 1, {"source": republish}, "k1"),
        Submission("data-fabrication", "alice", 2, {"source": honest}, "k2"),
    ]
    mallory, again = evaluate_epoch(subs, later, accepted=earlier)
    assert (mallory.valid, mallory.correct) == (60, 60)
    plag = mallory.plagiarism
    assert (plag.verdict, plag.pass1_kind, plag.closest) == ("copy", "data", "alice@test-epoch")
    assert plag.pass1 >= 0.97 and mallory.score == 0.0
    # alice's own generator with the new seed prints new data: same template, original
    assert (again.plagiarism.verdict, again.plagiarism.pass1_kind) == ("original", "template")
    assert again.plagiarism.pass2 is not None and again.plagiarism.pass2 < 0.30
    assert again.score == 1.0


def test_accepted_data_comes_only_from_epochs_that_ran_before(tmp_path):
    storage = LocalStorage(tmp_path, fsync=False)
    line = json.dumps({"task": "t", "prompt": "p", "response": "r"}) + "\n"
    for epoch in ("first", "second", "third"):
        storage.put(f"{ACCEPTED}/{epoch}/alice.jsonl", line.encode())
    storage.put(EPOCHS, json.dumps(["first", "second", "third"]).encode())
    assert load_accepted(storage, "first") == {}
    assert sorted(load_accepted(storage, "second")) == ["alice@first"]
    assert sorted(load_accepted(storage, "third")) == ["alice@first", "alice@second"]
    assert sorted(load_accepted(storage, "new")) == ["alice@first", "alice@second", "alice@third"]
    storage.put(EPOCHS, b'{"not": "a list"}')
    with pytest.raises(ValueError, match="JSON list of epoch names"):
        load_accepted(storage, "new")


def test_epoch_key_segment():
    assert epoch_segment("fabrication-epoch-1") == "fabrication-epoch-1"
    odd = epoch_segment("my epoch/1")
    assert odd.startswith("seed-") and len(odd) == 21 and odd == epoch_segment("my epoch/1")


def test_generators_are_deterministic_from_their_seed():
    source = (GENERATORS / "alice.py").read_text()
    first = run_generator(source, 7, 5, CFG.limits)
    assert first.status == "ok" and len(first.lines) == 5
    assert run_generator(source, 7, 5, CFG.limits).lines == first.lines
    assert run_generator(source, 8, 5, CFG.limits).lines != first.lines


def test_set_order_is_the_same_on_every_run():
    """Validators must reproduce a generator's data, so hash randomization is off."""
    source = "print(' '.join({'pear', 'apple', 'fig', 'kiwi', 'plum', 'lime'}))"
    runs = [run_generator(source, 0, 1, CFG.limits) for _ in range(4)]
    assert all(r.status == "ok" for r in runs)
    assert len({tuple(r.lines) for r in runs}) == 1


def test_sandbox_imports_only_the_standard_library():
    outcome = run_generator("import numpy", 0, 1, CFG.limits)
    assert (outcome.status, outcome.detail) == (
        "crashed",
        "ModuleNotFoundError: No module named 'numpy'",
    )


def test_wall_clock_limit_ends_a_generator_that_waits():
    """Sleeping costs no CPU time: only the wall-clock limit (a killed process group) ends it."""
    outcome = run_generator("import time\ntime.sleep(60)", 0, 1, SandboxLimits(timeout_s=0.5))
    assert (outcome.status, outcome.detail) == ("timeout", "> 0.5 s")
    assert outcome.seconds < 30  # killed, not waited for


def test_sandbox_reports_crashes_and_output_floods():
    crash = run_generator("raise SystemExit('no pairs today')", 0, 1, CFG.limits)
    assert (crash.status, crash.detail) == ("crashed", "no pairs today")
    flood = run_generator(
        "while True:\n    print('x' * 1000)", 0, 1, SandboxLimits(output_bytes=4096)
    )
    assert flood.status == "output-limit"


@pytest.mark.parametrize(
    ("task", "prompt", "right", "wrong"),
    [
        ("arithmetic", "Compute: 12 * 3 - 40", "-4", "4"),
        ("reverse", 'Reverse the text: "stone"', "enots", "stone"),
        ("sort_words", "Sort alphabetically: pear apple fig", "apple fig pear", "pear apple fig"),
        ("count_char", 'How many times does "a" occur in "banana"?', "3", "2"),
    ],
)
def test_answers_are_recomputed(task, prompt, right, wrong):
    assert is_correct(Pair(task, prompt, right)) and not is_correct(Pair(task, prompt, wrong))


def test_record_format_and_unsafe_arithmetic():
    assert parse_line('{"task": "reverse", "prompt": "p", "response": "r"}') is not None
    for bad in (
        '{"task": "reverse", "prompt": "p", "response": "r", "extra": 1}',
        '{"task": "poetry", "prompt": "p", "response": "r"}',
        '{"task": "reverse", "prompt": "p", "response": 5}',
        "Compute: 1 + 1\t2",
        "[" * 100_000,  # json.loads raises RecursionError here, not ValueError
    ):
        assert parse_line(bad) is None
    assert not is_correct(Pair("arithmetic", "Compute: 9 ** 99999", "0"))
    assert not is_correct(Pair("arithmetic", "Compute: 9999999999999 * 9999999999999", "0"))


def test_similarity_primitives():
    renamed = "def f(a):\n    '''doc'''\n    return a + 1\n"
    assert code_tokens(renamed) == code_tokens("def g(x):\n    return x + 2\n")
    a = shingles(["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"], 2)
    b = shingles(["the", "quick", "brown", "fox", "sleeps", "under", "the", "lazy", "dog"], 2)
    exact = jaccard(a, b)
    hasher = MinHasher(256, seed="t")
    assert abs(MinHasher.estimate(hasher.signature(a), hasher.signature(b)) - exact) < 0.15
    assert MinHasher.estimate(hasher.signature(a), hasher.signature(set(a))) == 1.0
    bands = Thresholds()
    assert [verdict(x, bands) for x in (0.97, 0.5, 0.29)] == ["copy", "suspicious", "original"]
    with pytest.raises(ValueError):
        Thresholds(copy=0.2, suspicious=0.3)
