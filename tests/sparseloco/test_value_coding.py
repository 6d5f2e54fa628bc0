"""Sign + magnitude value coding (issue 15): rule, wire metadata, config and backend checks."""

import pytest
import torch

from netcomm.envelope import same_codec
from sparseloco import CodecConfig, CompressedUpdate, ErrorFeedback, decode, encode
from sparseloco.config import preset
from sparseloco.errors import BackendUnavailableError, ConfigError
from sparseloco.kernels import resolve_backend
from sparseloco.kernels.reference import topk_exact
from sparseloco.quantize import quantize, signmag_quantize


def _kept(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 4096, generator=g)
    if kind == "student-t3":
        chi2 = torch.randn(256, 4096, 3, generator=g).pow(2).sum(-1)
        x = x / (chi2 / 3).sqrt()
    return x.gather(1, topk_exact(x, 64)).reshape(-1)


def _rel(v: torch.Tensor, codes: torch.Tensor, table: torch.Tensor) -> float:
    return float((table[codes] - v).norm() / v.norm())


def test_two_bit_rule_on_known_values():
    v = torch.tensor([-4.0, -1.0, -3.0, 1.0, 2.0, 5.0, -2.0, 3.0])
    codes, table = signmag_quantize(v, 2)
    # Best split of each sign's magnitudes: + {1, 2, 3 | 5} (SSE 2, where the median split
    # {1, 2 | 3, 5} has 2.5), − {1, 2 | 3, 4} (SSE 1).
    assert codes.tolist() == [3, 2, 3, 0, 0, 1, 2, 0]
    assert table.tolist() == [2.0, 5.0, -1.5, -3.5]


def test_equal_magnitudes_share_a_bin_and_empty_bins_get_edges():
    v = torch.tensor([2.0, 2.0, 2.0, -2.0])
    codes, table = signmag_quantize(v, 4)
    assert codes.tolist() == [7, 7, 7, 15]
    assert table[:7].tolist() == [0.0] + [2.0] * 6 and table[7] == 2.0 and table[15] == -2.0


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_an_empty_tensor_encodes_with_every_edge_at_zero(bits):
    cfg = CodecConfig(value_bits=bits, value_coding="signmag")
    update = encode({"w": torch.zeros(0, 5)}, ErrorFeedback(cfg))
    assert update.tensors["w"].table.abs().tolist() == [0.0] * cfg.levels
    assert decode(update)["w"].shape == (0, 5)


def test_one_bit_is_a_mean_per_sign():
    v = torch.tensor([1.0, 3.0, -2.0, 0.0])
    codes, table = signmag_quantize(v, 1)
    assert codes.tolist() == [0, 0, 1, 0]
    assert torch.equal(table, torch.tensor([4.0 / 3.0, -2.0]))


@pytest.mark.parametrize("kind", ["gaussian", "student-t3"])
def test_signmag_two_bit_beats_uniform_two_bit(kind):
    v = _kept(kind)
    uniform = _rel(v, *quantize(v, 2))
    sm1, sm2, sm4 = (_rel(v, *signmag_quantize(v, b)) for b in (1, 2, 4))
    assert sm4 < sm2 < sm1 <= uniform * 1.001
    assert sm2 < 0.7 * uniform  # 0.58x (Gaussian), 0.64x (Student-t) on these 16k values


def _best_split_sse(mags: list[float]) -> float:
    """Brute force: the least squared error of any 2-level split of sorted ``mags``."""

    def sse(xs):
        return sum((x - sum(xs) / len(xs)) ** 2 for x in xs) if xs else 0.0

    cuts = [i for i in range(1, len(mags)) if mags[i - 1] < mags[i]]
    return min([sse(mags)] + [sse(mags[:i]) + sse(mags[i:]) for i in cuts])


def test_two_bit_is_the_best_split_of_each_sign():
    g = torch.Generator().manual_seed(11)
    for trial in range(60):
        n = int(torch.randint(1, 30, (1,), generator=g))
        v = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(-0.5)
        v = v.round(decimals=trial % 3)  # ties and repeated magnitudes
        codes, table = signmag_quantize(v, 2)
        got = float((table[codes].double() - v.double()).pow(2).sum())
        want = sum(
            _best_split_sse(sorted(v[side].abs().double().tolist())) for side in (v >= 0, v < 0)
        )
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), v.tolist()


@pytest.mark.parametrize("kind", ["gaussian", "student-t3"])
def test_four_bit_lloyd_steps_only_lower_the_error(kind):
    v = _kept(kind)
    start = _rel(v, *signmag_quantize(v, 4, iterations=0))
    fitted = signmag_quantize(v, 4)
    assert _rel(v, *fitted) <= start
    again = signmag_quantize(v, 4)
    assert torch.equal(fitted[0], again[0]) and torch.equal(fitted[1], again[1])
    codes, table = fitted
    for q in codes.unique().tolist():  # each used entry is its bin's mean
        want = float(v[codes == q].double().mean())
        assert float(table[q]) == pytest.approx(want, rel=1e-6)


def test_few_distinct_magnitudes_are_coded_exactly():
    v = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 2.0, -3.0, -3.0, -0.5])
    codes, table = signmag_quantize(v, 2)
    assert torch.equal(table[codes], v)
    w = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0] * 3)
    codes, table = signmag_quantize(w, 4)
    assert torch.equal(table[codes], w)


def test_signmag_round_trip_and_error_feedback():
    cfg = preset("covenant-72b-signmag").codec
    assert cfg.value_coding == "signmag" and cfg.value_bits == 2
    g = torch.Generator().manual_seed(0)
    deltas = {"w": torch.randn(128, 192, generator=g), "b": torch.randn(100, generator=g)}
    ef = ErrorFeedback(cfg)
    update = encode(deltas, ef, cfg)
    tensors, meta = update.to_tensors()
    assert '"value_coding": "signmag"' in meta["codec"]
    back = CompressedUpdate.from_tensors(tensors, meta)
    assert back.codec == cfg
    dec = decode(back)
    for name, delta in deltas.items():
        torch.testing.assert_close(dec[name] + ef.dense(name, delta.shape), delta)


def test_uniform_wire_fields_are_unchanged():
    assert "value_coding" not in preset("covenant-72b").codec.wire_fields()


@pytest.mark.parametrize(
    "fields",
    [
        {"value_bits": True, "value_coding": "signmag"},
        {"value_bits": 2.0},
        {"value_bits": 8, "value_coding": "signmag"},
        {"value_bits": 1},
        {"value_coding": "lloyd"},
        {"value_coding": 1},
    ],
)
def test_config_rejects_bad_value_fields(fields):
    with pytest.raises(ConfigError):
        CodecConfig(**fields)


def test_backend_reports_the_reference_path():
    choice = resolve_backend("auto", torch.device("cpu"), 4096, "signmag")
    assert choice.name == "torch" and "value_coding='signmag'" in choice.reason
    with pytest.raises(BackendUnavailableError, match="signmag"):
        resolve_backend("triton", torch.device("cpu"), 4096, "signmag")


def test_envelope_codec_compare_checks_types():
    wire = CodecConfig(value_bits=1, value_coding="signmag").wire_fields()
    assert same_codec(dict(wire), wire)
    assert not same_codec(wire | {"value_bits": True}, wire)
    assert same_codec(wire | {"error_decay": 1}, wire | {"error_decay": 1.0})
    assert not same_codec([1], wire)
