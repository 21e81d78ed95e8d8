"""Truncation-aware whitened low-rank factorization (CASP section 3.2, as in SVD-LLM).

For a linear y = W x with W [m, n] and calibration inputs X [tokens, n], let G = X^T X and
S = chol(G + damp*I) (lower triangular, G' = S S^T). Then for any M

    ||(W - M) X^T||_F^2 = tr((W - M) G (W - M)^T)  ~=  ||(W - M) S||_F^2,

so the best rank-r M in the output sense is the truncated SVD taken in the whitened space:

    U Σ V^T = svd(W S),   A = U_r Σ_r^{1/2}  [m, r],   B = Σ_r^{1/2} V_r^T S^{-1}  [r, n],

and the output error is exactly the sum of the dropped σ_i^2 (measured with G' = G + damp*I).
S^{-1} is never formed: B solves B S = Σ_r^{1/2} V_r^T with a triangular solve.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from casp.errors import CaspError


class LowRankError(CaspError, ValueError):
    """Bad input to a low-rank step (shape, rank, NaNs, budget): the message names the fix."""


class Whitening(NamedTuple):
    """S = chol(G + damp_used * I), lower triangular; ``damp_used`` is the absolute diagonal added."""

    S: torch.Tensor
    damp_used: float


class LowRankFactors(NamedTuple):
    """W ~= A @ B with A [m, r], B [r, n].

    ``singular_values``: the full spectrum σ (descending) of W S (or of W for plain SVD), not only the
    kept r, so callers can pick other ranks. ``truncation_error``: sum of the dropped σ_i^2, which
    equals ||(W - AB) S||_F^2 = tr((W - AB) G' (W - AB)^T) with G' = G + damp_used * I.
    """

    A: torch.Tensor
    B: torch.Tensor
    singular_values: torch.Tensor
    damp_used: float
    truncation_error: float


def _check_finite(name: str, t: torch.Tensor, hint: str) -> None:
    if not torch.isfinite(t).all():
        raise LowRankError(f"{name} contains NaN or Inf values; {hint}")


def _check_gram(G: torch.Tensor) -> None:
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise LowRankError(f"Gram matrix must be square [in_features, in_features], got shape {tuple(G.shape)}")
    _check_finite("Gram matrix G", G, "check the calibration data (NaN activations?) and the model's dtype")


def _check_weight(W: torch.Tensor, G: torch.Tensor | None) -> None:
    if W.dim() != 2:
        raise LowRankError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(W.shape)}")
    _check_finite("weight W", W, "check the checkpoint before factorizing")
    if G is not None and G.shape != (W.shape[1], W.shape[1]):
        raise LowRankError(
            f"Gram matrix has shape {tuple(G.shape)} but the weight has {W.shape[1]} input features; "
            "it must be [in_features, in_features]"
        )


def _check_rank(rank: int, m: int, n: int) -> None:
    if not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise LowRankError(f"rank must be an integer in [1, {min(m, n)}] for a {m}x{n} weight, got {rank!r}")


def whitening_factor(
    G: torch.Tensor, damp: float = 1e-4, dtype: torch.dtype = torch.float64, max_tries: int = 8
) -> Whitening:
    """S = chol(G + δ I) with δ = damp * mean(diag G) (relative, so it does not depend on the token count).

    If the Cholesky factorization fails (G not positive definite, e.g. dead input features or too few
    calibration tokens), δ grows by |λ_min(G + δ I)| + ε and the factorization is retried; the δ finally
    used is returned as ``damp_used`` (absolute), so S S^T = G + damp_used * I exactly.
    """
    _check_gram(G)
    if damp < 0:
        raise LowRankError(f"damp must be >= 0 (a fraction of mean(diag(G))), got {damp}")
    n = G.shape[0]
    Gd = G.to(dtype)
    Gd = (Gd + Gd.T) / 2  # fp32 accumulation leaves tiny asymmetries
    mean_diag = float(Gd.diagonal().mean())
    scale = mean_diag if mean_diag > 0 else 1.0  # G == 0: all features dead, whiten with a multiple of I
    eye = torch.eye(n, dtype=dtype, device=G.device)
    delta = damp * scale
    eps = 1e-6 * scale
    for _ in range(max_tries):
        S, info = torch.linalg.cholesky_ex(Gd + delta * eye)
        if int(info) == 0:
            return Whitening(S, float(delta))
        lam_min = float(torch.linalg.eigvalsh(Gd + delta * eye)[0])
        delta += abs(lam_min) + eps
        eps *= 10  # a near-zero eigenvalue may still fail in floating point: back off harder next time
    raise LowRankError(
        f"could not factor the Gram matrix even with damping {delta:.3g}; it is likely badly scaled, "
        "recollect it in float32 or pass a larger damp"
    )


def whitened_lowrank(
    W: torch.Tensor,
    G: torch.Tensor,
    rank: int,
    damp: float = 1e-4,
    whitening: Whitening | None = None,
    dtype: torch.dtype = torch.float64,
) -> LowRankFactors:
    """Rank-r factors A [m, r], B [r, n] minimizing ||(W - AB) S||_F (the output error on G).

    ``whitening``: a precomputed :func:`whitening_factor` of G (q_proj and k_proj share their input, so
    one S serves both); ``damp`` is then ignored. Factors come back in W's dtype; the SVD runs in ``dtype``.
    """
    _check_weight(W, G)
    m, n = W.shape
    _check_rank(rank, m, n)
    if whitening is None:
        whitening = whitening_factor(G, damp=damp, dtype=dtype)
    S = whitening.S.to(dtype)
    U, sigma, Vh = torch.linalg.svd(W.to(dtype) @ S, full_matrices=False)  # W S = U Σ V^T
    root = sigma[:rank].sqrt()
    A = U[:, :rank] * root  # U_r Σ_r^{1/2}                                    [m, r]
    BS = root[:, None] * Vh[:rank]  # Σ_r^{1/2} V_r^T = B S                      [r, n]
    B = torch.linalg.solve_triangular(S, BS, upper=False, left=False)  # B = (Σ^{1/2} V^T) S^{-1}
    dropped = float(sigma[rank:].pow(2).sum())
    return LowRankFactors(A.to(W.dtype), B.to(W.dtype), sigma.to(torch.float32), whitening.damp_used, dropped)


def whitened_spectrum(
    W: torch.Tensor,
    G: torch.Tensor,
    damp: float = 1e-4,
    whitening: Whitening | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Squared singular values σ_i^2 of W S (descending): the input of ``adaptive_ranks``."""
    _check_weight(W, G)
    if whitening is None:
        whitening = whitening_factor(G, damp=damp, dtype=dtype)
    sigma = torch.linalg.svdvals(W.to(dtype) @ whitening.S.to(dtype))
    return sigma.pow(2).to(torch.float32)


def plain_lowrank(W: torch.Tensor, rank: int, dtype: torch.dtype = torch.float64) -> LowRankFactors:
    """Data-free baseline: truncated SVD of W itself, A = U_r Σ_r^{1/2}, B = Σ_r^{1/2} V_r^T.

    Minimizes the weight error ||W - AB||_F (= truncation_error^{1/2}), not the output error.
    """
    _check_weight(W, None)
    m, n = W.shape
    _check_rank(rank, m, n)
    U, sigma, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
    root = sigma[:rank].sqrt()
    A = U[:, :rank] * root
    B = root[:, None] * Vh[:rank]
    dropped = float(sigma[rank:].pow(2).sum())
    return LowRankFactors(A.to(W.dtype), B.to(W.dtype), sigma.to(torch.float32), 0.0, dropped)
