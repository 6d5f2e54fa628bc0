"""Decoder fuzzing in CI: a fast subset of benchmarks/reliability_fuzz.py's cases.

Every case must end in a payload or an ``EnvelopeError``: no other exception, no hang, no
forged or unusable payload accepted, memory bounded. ``benchmarks/reliability.py`` runs
100,000 cases of the same mutators.

The work of one case is bounded in CPU seconds, which a loaded machine does not inflate (a
case takes milliseconds; a decoding blow-up takes seconds either way). Wall-clock hangs are
the harness's: a case past its 5 s alarm ends as ``hang``.
"""

from __future__ import annotations

import json
import random
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netcomm import CheckpointError, CheckpointStore, EnvelopeError, LocalStorage
from sparseloco.codec import CompressedUpdate
from sparseloco.errors import CorruptUpdateError, SafetensorsFormatError
from sparseloco.serialization import dump_safetensors, load_safetensors


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), rng=st.randoms(use_true_random=False))
def test_hypothesis_cases_end_in_typed_errors_or_valid_payloads(fuzzlib, fuzz_target, data, rng):
    stats = fuzzlib.FuzzStats()
    mutator = data.draw(st.sampled_from(sorted(fuzzlib.MUTATORS)))
    cpu = time.process_time()
    outcome = fuzzlib.run_one(fuzz_target, stats, mutator, rng)
    assert outcome.startswith(("accepted", "rejected:")), (mutator, outcome)
    assert time.process_time() - cpu < 2.0


def _count_cpu_per_case(fuzzlib, monkeypatch) -> list[float]:
    """CPU seconds of every ``run_one`` call from now on (``fuzz`` calls it once per case)."""
    seconds: list[float] = []
    run_one = fuzzlib.run_one

    def timed(*args, **kwargs):
        cpu = time.process_time()
        try:
            return run_one(*args, **kwargs)
        finally:
            seconds.append(time.process_time() - cpu)

    monkeypatch.setattr(fuzzlib, "run_one", timed)
    return seconds


def test_seeded_run_covers_every_mutator_within_bounds(fuzzlib, fuzz_target, monkeypatch):
    cpu_per_case = _count_cpu_per_case(fuzzlib, monkeypatch)
    stats = fuzzlib.fuzz(1020, seed=12345, target=fuzz_target)
    assert (stats.crashes, stats.hangs, stats.forged, stats.unusable) == (0, 0, 0, 0), (
        stats.defects[:5]
    )
    assert set(stats.by_mutator) == set(fuzzlib.MUTATORS)
    assert min(stats.by_mutator.values()) == 1020 // len(fuzzlib.MUTATORS)
    # every structured defect was rejected with a typed error
    for name, counts in stats.structured.items():
        assert counts["cases"] > 0, name
        wrong = ("untyped_exceptions", "accepted_wrong", "noncanonical_accepted")
        assert [counts[k] for k in wrong] == [0, 0, 0], (name, stats.defects[:5])
    # the mix reaches deep checks, not just the signature
    for reason in ("signature", "replay", "fingerprint", "decompress", "tensors", "corrupt"):
        assert stats.rejected[reason] > 0, reason
    assert 0 < stats.accepted < stats.cases
    assert len(cpu_per_case) == stats.cases and max(cpu_per_case) < 2.0
    assert stats.rss_growth_mb < 300  # zstd bombs stay within LIMITS' 4 MiB cap


def test_a_crash_is_counted_not_hidden(fuzzlib, fuzz_target):
    """The harness itself can fail: a non-typed exception or a forgery is a defect."""
    stats = fuzzlib.FuzzStats()

    def broken(target, case, strict):
        raise KeyError("boom")

    outcome = fuzzlib.run_one(fuzz_target, stats, "bitflip", random.Random(0), opener=broken)
    assert outcome == "crash:KeyError: 'boom'" and stats.crashes == 1

    def accept_anything(target, case, strict):
        return fuzz_target.bases[0][0]

    outcome = fuzzlib.run_one(
        fuzz_target, stats, "bitflip", random.Random(0), opener=accept_anything
    )
    assert outcome == "forged" and stats.forged == 1


DEEP = b"[" * 100_000


def test_deeply_nested_envelope_header_is_a_format_error(fuzzlib, fuzz_target):
    """Regression: json.loads raised RecursionError before the signature was even checked."""
    blob = fuzzlib.sign_raw(fuzz_target, DEEP[:10_000], b"")  # under the 16 KiB header cap
    case = fuzzlib.Case(blob, True, None)
    with pytest.raises(EnvelopeError) as info:
        fuzzlib.open_case(fuzz_target, case, strict=True)
    assert info.value.reason == "format"


def test_deeply_nested_safetensors_header_is_a_tensors_error(fuzzlib, fuzz_target):
    payload, codec = fuzz_target.bases[0]
    hdr = b'{"a":' + DEEP + b"}"
    raw = struct.pack("<Q", len(hdr)) + hdr
    blob = fuzzlib._resign_raw(fuzz_target, payload, raw, random.Random(0))
    with pytest.raises(EnvelopeError) as info:  # a gatherer's model-sized cap stops it first
        fuzzlib.open_case(fuzz_target, fuzzlib.Case(blob, True, codec), strict=True)
    assert info.value.reason == "too_large"
    with pytest.raises(EnvelopeError) as info:  # a reader without the shapes parses it
        fuzzlib.open_case(fuzz_target, fuzzlib.Case(blob, True, codec), strict=False)
    assert info.value.reason == "tensors"


def test_deeply_nested_payload_metadata_is_a_typed_error(fuzzlib, fuzz_target):
    payload, codec = fuzz_target.bases[0]
    tensors, meta = payload.to_tensors()
    meta = {**meta, "codec": DEEP.decode()}
    with pytest.raises(CorruptUpdateError, match="bad payload metadata"):
        CompressedUpdate.from_tensors(tensors, meta)
    blob = fuzzlib._resign_raw(
        fuzz_target, payload, dump_safetensors(tensors, meta), random.Random(1)
    )
    with pytest.raises(EnvelopeError) as info:  # a gatherer's model-sized cap stops it first
        fuzzlib.open_case(fuzz_target, fuzzlib.Case(blob, True, codec), strict=True)
    assert info.value.reason == "too_large"
    with pytest.raises(EnvelopeError) as info:  # a reader without the shapes parses it
        fuzzlib.open_case(fuzz_target, fuzzlib.Case(blob, True, codec), strict=False)
    assert info.value.reason == "tensors"


def test_deeply_nested_checkpoint_pointer_is_a_checkpoint_error(tmp_path):
    store = CheckpointStore(LocalStorage(tmp_path))
    store.save(1, {"w": torch.zeros(2)})
    store.storage.put(store.latest_key, DEEP)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        store.load()


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**62, 2**62], [0, 2**40, 2**40, 2**40]])
def test_empty_tensor_with_overflowing_shape_is_a_tensors_error(fuzzlib, fuzz_target, shape):
    """Regression (found by the 100,000-case run): torch.empty overflowed on such shapes and
    raised TypeError/RuntimeError out of open_envelope, which would end a gather."""
    payload, codec = fuzz_target.bases[0]
    hdr = json.dumps({"a": {"dtype": "U8", "shape": shape, "data_offsets": [0, 0]}}).encode()
    raw = struct.pack("<Q", len(hdr)) + hdr
    with pytest.raises(SafetensorsFormatError, match="bad shape"):
        load_safetensors(raw)
    blob = fuzzlib._resign_raw(fuzz_target, payload, raw, random.Random(2), tensors=1)
    with pytest.raises(EnvelopeError) as info:
        fuzzlib.open_case(fuzz_target, fuzzlib.Case(blob, True, codec), strict=False)
    assert info.value.reason == "tensors"
