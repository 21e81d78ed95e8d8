"""Bit packing of the uniform format: exact layout against a slow bitstream reference, round trips."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from casp.quant.base import QuantizationError
from casp.quant.packing import pack_codes, packed_words, unpack_codes

BITS = (2, 3, 4, 8)


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """formats.md, literally: one Python integer bitstream per row, code j at bits [j*b, j*b + b)."""
    N, K = codes.shape
    n_words = packed_words(K, bits)
    out = torch.zeros(N, n_words, dtype=torch.int64)
    for n in range(N):
        stream = 0
        for j in range(K):
            stream |= int(codes[n, j]) << (j * bits)
        for w in range(n_words):
            word = (stream >> (32 * w)) & 0xFFFFFFFF
            out[n, w] = word - (1 << 32) if word >= 1 << 31 else word  # the int32 reading of the uint32
    return out.to(torch.int32)


codes_cases = st.tuples(st.sampled_from(BITS), st.integers(1, 4), st.integers(1, 100), st.integers(0, 2**31 - 1))


def make_codes(bits, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (N, K), generator=g)


@settings(max_examples=60, deadline=None)
@given(codes_cases)
def test_pack_matches_bitstream_reference(case):
    bits, N, K, seed = case
    codes = make_codes(bits, N, K, seed)
    assert torch.equal(pack_codes(codes, bits), reference_pack(codes, bits))


@settings(max_examples=100, deadline=None)
@given(codes_cases)
def test_round_trip(case):
    bits, N, K, seed = case
    codes = make_codes(bits, N, K, seed)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (N, -(-K // 32) * 32 * bits // 32)
    assert torch.equal(unpack_codes(packed, bits, K).long(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_extreme_codes_round_trip(bits):
    # all-max codes set the sign bit of every word; all-zero codes and alternation catch shift bugs
    maxq = (1 << bits) - 1
    codes = torch.stack([torch.full((70,), maxq), torch.zeros(70, dtype=torch.long), torch.arange(70) % 2 * maxq])
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 70).long(), codes)
    assert (pack_codes(codes[:1, :64], bits) == -1).all()  # every bit set, padding-free


def test_known_words():
    # 4 bits: code j in nibble j, little-endian
    assert pack_codes(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4)[0, 0].item() == 0xF7654321 - (1 << 32)
    # 3 bits: code 10 occupies bits 30..32, i.e. the top 2 bits of word 0 and bit 0 of word 1
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 10] = 7
    assert pack_codes(codes, 3).tolist() == [[-(1 << 31) + (1 << 30), 1, 0]]
    # padding codes are zero: one code -> a row of one padded 32-code chunk
    assert pack_codes(torch.tensor([[3]]), 2).tolist() == [[3, 0]]


def test_errors():
    with pytest.raises(QuantizationError, match="unsupported bit width 5"):
        pack_codes(torch.zeros(2, 4, dtype=torch.long), 5)
    with pytest.raises(QuantizationError, match="out of range"):
        pack_codes(torch.tensor([[0, 4]]), 2)
    with pytest.raises(QuantizationError, match="out of range"):
        pack_codes(torch.tensor([[-1, 0]]), 2)
    with pytest.raises(QuantizationError, match="integer"):
        pack_codes(torch.zeros(2, 4), 2)
    with pytest.raises(QuantizationError, match="needs"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 2, 40)
    with pytest.raises(QuantizationError, match="int32"):
        unpack_codes(torch.zeros(2, 2, dtype=torch.int64), 2, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", BITS)
def test_cuda_matches_cpu(bits):
    codes = make_codes(bits, 5, 77, 0)
    packed = pack_codes(codes.cuda(), bits)
    assert torch.equal(packed.cpu(), pack_codes(codes, bits))
    assert torch.equal(unpack_codes(packed, bits, 77).cpu().long(), codes)
