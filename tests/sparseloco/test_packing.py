import pytest
import torch

from sparseloco.errors import CorruptUpdateError
from sparseloco.packing import (
    best_rice_parameter,
    pack_codes,
    pack_indices,
    rice_decode,
    rice_encode,
    unpack_codes,
    unpack_indices,
)


def test_12bit_layout_is_two_indices_per_three_bytes():
    packed = pack_indices(torch.tensor([0xABC, 0x123, 0xFFF]), 12)
    # (0xABC, 0x123) -> BC, 3A, 12 ; (0xFFF, pad 0) -> FF, 0F, 00
    assert packed.tolist() == [0xBC, 0x3A, 0x12, 0xFF, 0x0F, 0x00]


def test_2bit_codes_first_code_in_low_bits():
    packed = pack_codes(torch.tensor([1, 2, 3, 0, 3]), 2)
    assert packed.tolist() == [0b00111001, 0b00000011]


@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_index_round_trip(bits, n):
    g = torch.Generator().manual_seed(n + bits)
    idx = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_indices(packed, bits, n), idx)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 3, 5, 999])
def test_code_round_trip(bits, n):
    g = torch.Generator().manual_seed(n * 10 + bits)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_wrong_lengths_raise():
    with pytest.raises(CorruptUpdateError, match="expected 3"):
        unpack_indices(torch.zeros(4, dtype=torch.uint8), 12, 2)
    with pytest.raises(CorruptUpdateError, match="expected 2"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 2, 5)
    with pytest.raises(CorruptUpdateError, match="uint8"):
        unpack_codes(torch.zeros(2, dtype=torch.int32), 2, 5)


@pytest.mark.parametrize("p", [0, 1, 5, 11])
def test_rice_round_trip(p):
    g = torch.Generator().manual_seed(p)
    gaps = torch.randint(0, 200, (513,), generator=g)
    unary, rem = rice_encode(gaps, p)
    assert torch.equal(rice_decode(unary, rem, p, gaps.numel()), gaps)
    expected_bits = int(((gaps >> p) + 1 + p).sum())
    assert abs((unary.numel() + rem.numel()) * 8 - expected_bits) < 16


def test_best_rice_parameter_is_optimal():
    g = torch.Generator().manual_seed(3)
    gaps = torch.randint(0, 128, (4096,), generator=g)
    best = best_rice_parameter(gaps, 12)
    sizes = [int(((gaps >> p) + 1 + p).sum()) for p in range(13)]
    assert sizes[best] == min(sizes)


def test_rice_rejects_truncated_and_padded_streams():
    gaps = torch.tensor([3, 0, 9, 1])
    unary, rem = rice_encode(gaps, 1)
    with pytest.raises(CorruptUpdateError, match="ends after"):
        rice_decode(torch.full_like(unary, 0xFF), rem, 1, 4)
    with pytest.raises(CorruptUpdateError, match="trailing"):
        rice_decode(torch.cat([unary, torch.zeros(3, dtype=torch.uint8)]), rem, 1, 4)
    with pytest.raises(CorruptUpdateError, match="remainder"):
        rice_decode(unary, rem[:0], 1, 4)
