"""AQLM-style additive quantizer: config rules, solver pieces against brute force, quality, format."""

import itertools

import pytest
import torch

from casp.quant.aqlm import (
    AQLMConfig,
    AQLMWeight,
    _beam_group,
    _refit_codebooks,
    _refit_scales,
    _unscaled,
    _update_codes,
    quantize_aqlm,
)
from casp.quant.base import QuantizationError, output_error
from tests.test_quant_quip import correlated_layer, rtn_error


def loss(W, G, C, codes, s):
    D = W - s[:, None] * _unscaled(C, codes).reshape(W.shape)
    return float(((D @ G) * D).sum())


def random_problem(N=6, J=3, M=2, k=4, g=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, J * g, generator=gen, dtype=torch.float64)
    X = torch.randn(64, J * g, generator=gen, dtype=torch.float64) @ (
        1 + torch.randn(J * g, J * g, generator=gen, dtype=torch.float64) / 3
    )
    C = torch.randn(M, k, g, generator=gen, dtype=torch.float64)
    codes = torch.randint(0, k, (N, J, M), generator=gen)
    s = 0.5 + torch.rand(N, generator=gen, dtype=torch.float64)
    return W, X.T @ X, C, codes, s


def test_config_presets_and_validation():
    assert AQLMConfig().label() == "aqlm-2x8" and AQLMConfig().bits == 2
    assert AQLMConfig.preset("1x16").bits == 2 and AQLMConfig.preset("2x12").bits == 3
    assert AQLMConfig(bits=3).label() == "aqlm-2x12"
    assert AQLMConfig(num_codebooks=2, codebook_bits=4).bits == 1
    with pytest.raises(ValueError, match="does not match"):
        AQLMConfig(bits=3, num_codebooks=2, codebook_bits=8)
    with pytest.raises(ValueError, match="multiple of the group"):
        AQLMConfig(num_codebooks=1, codebook_bits=12)
    with pytest.raises(ValueError, match="unknown AQLM preset"):
        AQLMConfig.preset("3x3")
    cands = AQLMConfig(beam_size=4).candidates()
    assert [c.label() for c in cands] == ["aqlm-2x8", "aqlm-2x12", "aqlm-4x8"]
    assert [c.bits for c in cands] == [2, 3, 4] and all(c.beam_size == 4 for c in cands)
    assert AQLMConfig.preset("2x8").to_dict()["num_codebooks"] == 2
    assert AQLMConfig.preset("2x8", seed=5).replace(bits=3).label() == "aqlm-2x12"
    assert AQLMConfig.preset("2x8").replace(num_codebooks=1, bits=None).label() == "aqlm-1x8"


def test_beam_search_with_full_width_is_the_exact_group_optimum():
    # One group (J = 1): a beam as wide as 2^B keeps every choice of codebook 0, then tries every
    # codebook-1 code for each: the result must be the brute-force optimum over all k^M tuples.
    W, G, C, codes, s = random_problem(N=5, J=1, M=2, k=4)
    V = _unscaled(C, codes)[:, 0]
    t = (W - s[:, None] * V) @ G + s[:, None] * (V @ G)
    s2 = s * s
    qc = torch.einsum("mcd,de,mce->mc", C, G, C)
    best, _ = _beam_group(C, qc, G, codes[:, 0], V, t, s, s2, beam=4)
    for n in range(5):
        brute = min(
            itertools.product(range(4), repeat=2),
            key=lambda b: loss(W[n : n + 1], G, C, torch.tensor([[b]]), s[n : n + 1]),
        )
        got = loss(W[n : n + 1], G, C, best[n].view(1, 1, 2), s[n : n + 1])
        assert got == pytest.approx(loss(W[n : n + 1], G, C, torch.tensor([[brute]]), s[n : n + 1]), rel=1e-9)


@pytest.mark.parametrize("beam", [1, 3])
def test_code_sweep_never_increases_the_loss(beam):
    W, G, C, codes, s = random_problem(N=8, J=4, M=2, k=8, seed=2)
    before = loss(W, G, C, codes, s)
    new = _update_codes(W, G, C, codes, s, beam)
    after = loss(W, G, C, new, s)
    assert after <= before + 1e-9
    assert _update_codes(W, G, C, new, s, beam).shape == codes.shape


def test_scale_refit_is_the_least_squares_optimum():
    W, G, C, codes, s = random_problem(seed=3)
    V = _unscaled(C, codes).reshape(W.shape)
    s_opt = _refit_scales(W, G, V)
    base = loss(W, G, C, codes, s_opt)
    for eps in (1e-3, -1e-3):
        assert loss(W, G, C, codes, s_opt * (1 + eps)) > base


def test_codebook_refit_reaches_the_dense_least_squares_solution():
    W, G, C, codes, s = random_problem(N=6, J=3, M=2, k=4, seed=4)
    N, J, M = codes.shape
    k, g = C.shape[1:]
    # Dense design: W_hat (row-major flat) = A @ vec(C).
    A = torch.zeros(N * J * g, M * k * g, dtype=torch.float64)
    for n, j, m, d in itertools.product(range(N), range(J), range(M), range(g)):
        A[(n * J + j) * g + d, (m * k + int(codes[n, j, m])) * g + d] += s[n]
    R = torch.linalg.cholesky(torch.block_diag(*[G] * N)).T  # G_big = R^T R
    theta = torch.linalg.lstsq(R @ A, R @ W.reshape(-1), driver="gelsd").solution
    exact = loss(W, G, theta.reshape(M, k, g), codes, s)
    fitted = _refit_codebooks(W, G, C, codes, s, iters=200)
    assert loss(W, G, fitted, codes, s) == pytest.approx(exact, rel=1e-4)


def test_dequantize_matches_the_definition_and_state_round_trip():
    W = torch.randn(6, 32)
    qw = quantize_aqlm(W, None, AQLMConfig(num_codebooks=2, codebook_bits=4, max_iters=2))
    codes = qw.codes.long()
    ref = torch.zeros(6, 32)
    for n, j in itertools.product(range(6), range(4)):
        v = sum(qw.codebooks[m, codes[n, j, m]].float() for m in range(2))
        ref[n, j * 8 : (j + 1) * 8] = qw.scales[n].float() * v
    assert torch.allclose(qw.dequantize(), ref, atol=1e-6)
    assert qw.codes.dtype == torch.uint8 and qw.codebooks.dtype == torch.float16
    back = AQLMWeight.from_state({k: v.clone() for k, v in qw.state().items()}, qw.meta())
    assert torch.equal(back.dequantize(), qw.dequantize())
    x = torch.randn(3, 32)
    assert torch.allclose(back.matmul(x), x @ qw.dequantize().T, atol=1e-5)
    # storage: codes 1 bit/weight + codebooks 2*16*8 fp16 + 6 fp16 scales
    assert qw.storage_bits() == 6 * 4 * 2 * 8 + 2 * 16 * 8 * 16 + 6 * 16


def test_wide_codebooks_store_int16_and_1x16_runs_on_a_tiny_matrix():
    W = torch.randn(8, 32)
    qw = quantize_aqlm(W, None, AQLMConfig.preset("1x16", max_iters=1, cg_iters=2, kmeans_iters=1))
    assert qw.codes.dtype == torch.int16 and qw.codebooks.shape == (1, 65536, 8)
    back = AQLMWeight.from_state(qw.state(), qw.meta())
    assert torch.equal(back.dequantize(), qw.dequantize())
    # 32 groups, 65536 codewords: every group gets its own codeword (up to fp16 rounding)
    assert output_error(W, qw.dequantize(), None) < 1e-5
    qw = quantize_aqlm(W, None, AQLMConfig.preset("2x12", max_iters=1, cg_iters=2))
    assert qw.codes.dtype == torch.int16 and int(qw.codes.long().max()) < 4096


def test_from_state_rejects_bad_tensors():
    qw = quantize_aqlm(torch.randn(4, 16), None, AQLMConfig(num_codebooks=1, codebook_bits=8, max_iters=0))
    state, meta = qw.state(), qw.meta()
    with pytest.raises(QuantizationError, match="codebooks"):
        AQLMWeight.from_state({**state, "codebooks": state["codebooks"][:, :10]}, meta)
    with pytest.raises(QuantizationError, match="codes"):
        AQLMWeight.from_state({**state, "codes": state["codes"].to(torch.int16)}, meta)
    with pytest.raises(QuantizationError, match="missing"):
        AQLMWeight.from_state({"codes": state["codes"]}, meta)
    with pytest.raises(QuantizationError, match="multiple of 8"):
        quantize_aqlm(torch.randn(4, 12), None, AQLMConfig())


def test_aqlm_beats_rtn_at_2_bits_on_correlated_activations():
    W, G = correlated_layer()
    rtn = rtn_error(W, G, bits=2)  # 2.25 bits/weight (fp16 scale + zero per 128)
    # 2x4: 1-bit codes, 2.625 bits/weight at 64x128 with codebooks and scales counted.
    q1 = quantize_aqlm(W, G, AQLMConfig(num_codebooks=2, codebook_bits=4))
    assert q1.bits_per_weight() == pytest.approx(2.625)
    e1 = output_error(W, q1.dequantize(), G)
    assert e1 < 0.5 * rtn
    # 2x8: 2-bit codes (its 65536-bit codebooks cost 8 more bits/weight at this tiny size).
    q2 = quantize_aqlm(W, G, AQLMConfig.preset("2x8", max_iters=3))
    assert output_error(W, q2.dequantize(), G) < e1
    # the alternation improves on the k-means initialization
    q0 = quantize_aqlm(W, G, AQLMConfig(num_codebooks=2, codebook_bits=4, max_iters=0, cg_iters=0))
    assert e1 < 0.7 * output_error(W, q0.dequantize(), G)
