"""Whitened low-rank factorization, rank selection, factor balancing/rotation, LowRankLinear."""

from __future__ import annotations

import itertools

import pytest
import torch

from casp.errors import CaspError
from casp.lowrank import (
    LowRankError,
    LowRankLinear,
    adaptive_ranks,
    balance_factors,
    condition_factors,
    fixed_rank,
    hadamard_ranges,
    normalized_errors,
    official_rescale,
    plain_lowrank,
    rotate_rank,
    whitened_lowrank,
    whitened_spectrum,
    whitening_factor,
)
from casp.lowrank.ranks import max_useful_rank


def anisotropic_inputs(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a wide range of feature scales (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, 2, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ (mix * scales[:, None])


def out_err(W, M, X) -> float:
    return float(((W - M) @ X.T).norm())


def test_whitened_beats_plain_and_equals_closed_form_optimum():
    torch.manual_seed(0)
    m, n, r = 24, 16, 5
    W = torch.randn(m, n, dtype=torch.float64)
    X = anisotropic_inputs(200, n)  # full column rank
    G = X.T @ X
    f = whitened_lowrank(W, G, r, damp=0.0)
    p = plain_lowrank(W, r)
    assert f.A.shape == (m, r) and f.B.shape == (r, n)
    err_w = out_err(W, f.A @ f.B, X)
    assert err_w < 0.9 * out_err(W, p.A @ p.B, X)
    # Closed-form optimum of min_{rank M <= r} ||(W - M) X^T||_F, computed independently:
    # M* = [W X^T]_r (X^T)^+ (best rank-r approximation of the outputs, mapped back).
    U, s, Vh = torch.linalg.svd(W @ X.T, full_matrices=False)
    Y_r = (U[:, :r] * s[:r]) @ Vh[:r]
    M_star = Y_r @ torch.linalg.pinv(X.T)
    assert torch.linalg.matrix_rank(M_star, rtol=1e-10) == r
    err_opt = out_err(W, M_star, X)
    assert err_w == pytest.approx(err_opt, rel=1e-8)
    # truncation_error is the squared output error, and equals the dropped output singular values.
    assert f.truncation_error == pytest.approx(err_w**2, rel=1e-8)
    assert f.truncation_error == pytest.approx(float(s[r:].pow(2).sum()), rel=1e-8)


def test_truncation_error_matches_trace_formula_with_damping():
    torch.manual_seed(1)
    W = torch.randn(12, 10, dtype=torch.float64)
    X = anisotropic_inputs(50, 10, seed=1)
    G = X.T @ X
    f = whitened_lowrank(W, G, 3, damp=0.05)
    assert f.damp_used == pytest.approx(0.05 * float(G.diagonal().mean()))
    Gp = G + f.damp_used * torch.eye(10, dtype=torch.float64)
    dW = W - f.A @ f.B
    assert f.truncation_error == pytest.approx(float(torch.trace(dW @ Gp @ dW.T)), rel=1e-8)
    assert torch.allclose(f.singular_values.double().pow(2), whitened_spectrum(W, G, damp=0.05).double(), rtol=1e-5)


def test_factors_satisfy_the_stated_formulas():
    W = torch.randn(8, 6, dtype=torch.float64)
    X = anisotropic_inputs(40, 6, seed=2)
    G = X.T @ X
    wh = whitening_factor(G, damp=0.0)
    f = whitened_lowrank(W, G, 6, whitening=wh)  # full rank: exact
    assert torch.allclose(f.A @ f.B, W, atol=1e-9)
    assert torch.allclose(wh.S @ wh.S.T, G + wh.damp_used * torch.eye(6, dtype=torch.float64))
    assert torch.equal(wh.S, torch.tril(wh.S))
    # A has column norms sigma^{1/2} (U orthonormal).
    assert torch.allclose(f.A.norm(dim=0), f.singular_values[:6].double().sqrt(), rtol=1e-5)


def test_damping_on_singular_gram_with_dead_feature():
    X = anisotropic_inputs(30, 8, seed=3)
    X[:, 2] = 0.0  # a dead input feature: G is singular
    G = X.T @ X
    S, damp_used = whitening_factor(G, damp=0.0)
    assert damp_used > 0
    assert torch.isfinite(S).all()
    assert torch.allclose(S @ S.T, G + damp_used * torch.eye(8, dtype=torch.float64), atol=1e-8)
    W = torch.randn(5, 8, dtype=torch.float64)
    f = whitened_lowrank(W, G, 2, damp=0.0)
    assert f.damp_used > 0 and torch.isfinite(f.A).all() and torch.isfinite(f.B).all()


def test_zero_gram_and_fp32_inputs():
    S, d = whitening_factor(torch.zeros(4, 4), damp=0.0)
    assert d > 0 and torch.isfinite(S).all()
    W = torch.randn(6, 4)
    f = whitened_lowrank(W, torch.eye(4), 2)
    assert f.A.dtype == torch.float32 and f.B.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    W = torch.randn(4, 3)
    G = torch.eye(3)
    bad = G.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(LowRankError, match="Gram matrix G contains NaN"):
        whitened_lowrank(W, bad, 1)
    Wn = W.clone()
    Wn[1, 1] = float("inf")
    with pytest.raises(LowRankError, match="weight W contains NaN"):
        whitened_lowrank(Wn, G, 1)
    with pytest.raises(LowRankError, match="rank must be"):
        whitened_lowrank(W, G, 4)
    with pytest.raises(LowRankError, match="input features"):
        whitened_lowrank(W, torch.eye(4), 1)
    assert issubclass(LowRankError, CaspError) and issubclass(LowRankError, ValueError)


def test_fixed_rank():
    assert fixed_rank(4096, 4096) == 512
    assert fixed_rank(4096, 4096, 0.25) * (4096 + 4096) == 4096 * 4096 // 4
    assert fixed_rank(576, 192) == 576 * 192 // 4 // 768
    assert fixed_rank(3, 3, 0.01) == 1
    with pytest.raises(LowRankError):
        fixed_rank(10, 10, 0.0)


def _brute_force_ranks(spectra, shapes, weights, budget):
    errs = [normalized_errors(s) for s in spectra]
    caps = [min(s.numel(), max_useful_rank(m, n)) for s, (m, n) in zip(spectra, shapes)]
    best, best_val = None, float("inf")
    for ranks in itertools.product(*[range(1, c + 1) for c in caps]):
        if sum(r * (m + n) for r, (m, n) in zip(ranks, shapes)) > budget:
            continue
        val = sum(w * float(e[r]) for w, e, r in zip(weights, errs, ranks))
        if val < best_val - 1e-12:
            best, best_val = list(ranks), val
    return best, best_val


def _objective(spectra, weights, ranks):
    return sum(w * float(normalized_errors(s)[r]) for s, w, r in zip(spectra, weights, ranks))


@pytest.mark.parametrize("seed", range(6))
def test_adaptive_ranks_equals_brute_force_and_respects_budget(seed):
    g = torch.Generator().manual_seed(seed)
    L, m, n = 3, 8, 8  # equal shapes: the greedy is exact
    spectra = [torch.rand(8, generator=g).pow(3) * torch.rand(1, generator=g) * 10 for _ in range(L)]
    shapes = [(m, n)] * L
    dens = torch.rand(L, generator=g).add(0.05).tolist()
    w = [d / (sum(dens) / L) for d in dens]
    budget = int(torch.randint(L * 16, L * 16 * 4, (1,), generator=g))
    ranks = adaptive_ranks(spectra, shapes, dens, budget)
    assert sum(r * (m + n) for r in ranks) <= budget
    _, best_val = _brute_force_ranks(spectra, shapes, w, budget)
    assert _objective(spectra, w, ranks) == pytest.approx(best_val, abs=1e-9)


def test_adaptive_ranks_unequal_shapes_feasible_and_near_optimal():
    g = torch.Generator().manual_seed(7)
    shapes = [(8, 8), (8, 4), (6, 6)]
    spectra = [torch.rand(min(s), generator=g).pow(2) for s in shapes]
    dens = [0.3, 0.5, 0.2]
    w = [d / (sum(dens) / 3) for d in dens]
    budget = 90
    ranks = adaptive_ranks(spectra, shapes, dens, budget)
    assert sum(r * (m + n) for r, (m, n) in zip(ranks, shapes)) <= budget
    _, best_val = _brute_force_ranks(spectra, shapes, w, budget)
    max_step = max(wi * float(normalized_errors(s)[0] - normalized_errors(s)[1]) for wi, s in zip(w, spectra))
    assert best_val - 1e-12 <= _objective(spectra, w, ranks) <= best_val + max_step


def test_adaptive_ranks_denser_layer_gets_higher_rank_and_default_budget():
    spec = torch.linspace(1.0, 0.01, 64).pow(2)
    shapes = [(64, 64), (64, 64)]
    ranks = adaptive_ranks([spec, spec.clone()], shapes, densities=[0.05, 0.4])
    assert ranks[1] > ranks[0]
    # Default budget = the fixed 0.25 setting's, and it is used (nearly) in full.
    budget = 2 * fixed_rank(64, 64) * 128
    assert sum(r * 128 for r in ranks) <= budget
    assert sum(r * 128 for r in ranks) >= budget - 128
    # Equal densities and spectra: equal ranks = the fixed setting.
    assert adaptive_ranks([spec, spec], shapes, [0.2, 0.2]) == [fixed_rank(64, 64)] * 2


def test_adaptive_ranks_errors():
    spec = torch.ones(4)
    with pytest.raises(LowRankError, match="budget"):
        adaptive_ranks([spec], [(4, 4)], [0.1], budget_params=4)
    with pytest.raises(LowRankError, match="one per layer"):
        adaptive_ranks([spec], [(4, 4), (4, 4)], [0.1], budget_params=100)


def lowrank_pair(m=12, r=8, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Unequal component scales, as B = Σ^{1/2} V^T S^{-1} has.
    A = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.logspace(1, -1, r, dtype=torch.float64)
    B = torch.randn(r, n, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, r, dtype=torch.float64)[:, None]
    return A, B


def test_balance_keeps_product_and_matches_norms():
    A, B = lowrank_pair()
    A2, B2 = balance_factors(A, B)
    assert torch.allclose(A2 @ B2, A @ B, rtol=1e-10, atol=1e-12)
    assert torch.allclose(A2.norm(dim=0), B2.norm(dim=1), rtol=1e-10)
    assert torch.allclose(A2.norm(dim=0), (A.norm(dim=0) * B.norm(dim=1)).sqrt(), rtol=1e-10)
    # A zero component stays as it is.
    A[:, 0] = 0
    A3, B3 = balance_factors(A, B)
    assert torch.equal(B3[0], B[0]) and torch.isfinite(A3).all()


@pytest.mark.parametrize("r", [8, 6, 1])
def test_rotation_keeps_product(r):
    A, B = lowrank_pair(r=r)
    AH, HtB, signs = rotate_rank(A, B, seed=3)
    assert AH.shape == A.shape and HtB.shape == B.shape and signs.shape == (r,)
    assert torch.allclose(AH @ HtB, A @ B, rtol=1e-10, atol=1e-10)
    AH2, _, signs2 = rotate_rank(A, B, seed=3)
    assert torch.equal(AH, AH2) and torch.equal(signs, signs2)
    if r == 8:  # mixes components: the column norms even out
        assert AH.norm(dim=0).std() < A.norm(dim=0).std()


def test_official_rescale_and_blocks():
    A, B = lowrank_pair()
    A2, B2 = official_rescale(A, B)
    assert torch.allclose(A2 @ B2, A @ B) and torch.allclose(B2, B * 10)
    assert hadamard_ranges(72) == [(0, 64), (8, 72)] and hadamard_ranges(512) == [(0, 512)]
    assert hadamard_ranges(1) == [(0, 1)]


def test_lowrank_linear_forward_and_repr():
    W = torch.randn(10, 7)
    bias = torch.randn(10)
    f = whitened_lowrank(W, torch.eye(7), 7)
    mod = LowRankLinear.from_factors(f.A, f.B, bias)
    x = torch.randn(3, 7)
    assert torch.allclose(mod(x), torch.nn.functional.linear(x, W, bias), atol=1e-4)
    assert mod.B.bias is None and mod.A.bias is not None
    assert (mod.in_features, mod.rank, mod.out_features) == (7, 7, 10)
    assert "rank=7" in repr(mod)
    half = LowRankLinear.from_factors(f.A[:, :3], f.B[:3], None, dtype=torch.float64)
    assert half.A.weight.dtype == torch.float64 and half.rank == 3
    with pytest.raises(LowRankError, match="do not chain"):
        LowRankLinear(torch.nn.Linear(4, 5), torch.nn.Linear(3, 3))


def test_lowrank_linear_with_quantized_factors():
    from casp.quant.linear import QuantLinear
    from casp.quant.rtn import RTNConfig, quantize_rtn

    W, bias = torch.randn(16, 32), torch.randn(16)
    f = whitened_lowrank(W, torch.eye(32), 8)
    dense = LowRankLinear.from_factors(f.A, f.B, bias)
    cfg = RTNConfig(bits=8, group_size=32)
    A_q = QuantLinear.from_weight(quantize_rtn(f.A, None, cfg), bias)
    B_q = QuantLinear.from_weight(quantize_rtn(f.B, None, cfg))
    mod = LowRankLinear(A_q, B_q)
    assert (mod.in_features, mod.rank, mod.out_features) == (32, 8, 16)
    x = torch.randn(4, 32)
    assert torch.allclose(mod(x), dense(x), rtol=0.05, atol=0.05)


def test_condition_factors_default_keeps_product():
    A, B = lowrank_pair(r=6)
    A2, B2 = condition_factors(A, B, seed=1)
    assert torch.allclose(A2 @ B2, A @ B, rtol=1e-10, atol=1e-10)
    A3, B3 = condition_factors(A, B, balance=False, rotate=False)
    assert torch.equal(A3, A) and torch.equal(B3, B)
