"""Conditioning the low-rank factors before quantization (CASP section 3.5, "beyond").

Both transforms keep the product A B exactly (up to float rounding); they only change how the
rank components are split between the two factors, and so how hard each factor is to quantize.

* Balancing: for each rank component i, with a_i = ||A[:, i]|| and b_i = ||B[i, :]||, scale
  A[:, i] by s_i = sqrt(b_i / a_i) and B[i, :] by 1 / s_i, so both norms become sqrt(a_i b_i).
  After the whitened SVD, A = U_r Σ_r^{1/2} already has column norms σ_i^{1/2}, but B = Σ^{1/2} V^T S^{-1}
  has S^{-1} mixed in, so its row norms follow the inverse input scale, not σ_i^{1/2}.
* Rotation: A H and H^T B with H = D_s Had_r / sqrt(r) an orthogonal randomized Hadamard matrix of the
  rank dimension (D_s random signs). It spreads a few large components over all of them, as QuIP#
  incoherence processing does. It is folded into the factors, so inference pays nothing.
  When r is not a power of two, padding would change the rank (and cost parameters), and a block-diagonal
  Hadamard (e.g. 72 = 64 + 8) leaves the small blocks unmixed (measured: worse than no rotation). So H is
  the product of two Hadamards of size p = 2^floor(log2 r) on the overlapping ranges [0, p) and [r - p, r):
  orthogonal, O(r log r), and every component is mixed with at least p - (r - p) others.

The official CASP code instead rescales B by 10 and A by 0.1 (:func:`official_rescale`).
"""

from __future__ import annotations

import torch

from casp.hadamard import fwht
from casp.lowrank.whiten import LowRankError


def _check_factors(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
        raise LowRankError(f"expected factors A [m, r] and B [r, n], got {tuple(A.shape)} and {tuple(B.shape)}")


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A diag(s), diag(s)^{-1} B) with s_i = sqrt(||B[i,:]|| / ||A[:,i]||): matched per-component norms.

    Components where either norm is zero are left as they are (their product is zero anyway).
    """
    _check_factors(A, B)
    a = A.double().norm(dim=0)  # [r]
    b = B.double().norm(dim=1)  # [r]
    ok = (a > 0) & (b > 0)
    s = torch.where(ok, (b / torch.where(ok, a, 1.0)).sqrt(), torch.ones_like(a))
    return (A.double() * s).to(A.dtype), (B.double() / s[:, None]).to(B.dtype)


def official_rescale(A: torch.Tensor, B: torch.Tensor, factor: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The public CASP code's GPTQ path: (A / factor, B * factor); product unchanged."""
    _check_factors(A, B)
    return A / factor, B * factor


def hadamard_ranges(r: int) -> list[tuple[int, int]]:
    """The [start, stop) ranges the rank rotation applies a normalized Hadamard to, in order."""
    if r < 1:
        raise LowRankError(f"rank must be >= 1, got {r}")
    p = 1 << (r.bit_length() - 1)  # largest power of two <= r
    return [(0, p)] if p == r else [(0, p), (r - p, r)]


def _hadamard_last(x: torch.Tensor) -> torch.Tensor:
    """x @ H_1 @ H_2 ... on the last dimension, H_k a normalized Hadamard on hadamard_ranges(r)[k]."""
    for start, stop in hadamard_ranges(x.shape[-1]):
        x = torch.cat([x[..., :start], fwht(x[..., start:stop]), x[..., stop:]], dim=-1)
    return x


def rotate_rank(A: torch.Tensor, B: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A H, H^T B, signs) with H = diag(signs) H_1 [H_2] orthogonal on the rank dimension.

    H_k are normalized Hadamards on :func:`hadamard_ranges` (one range when r is a power of two).
    A H H^T B = A B. The signs are drawn from a CPU generator seeded with ``seed`` (reproducible).
    """
    _check_factors(A, B)
    r = A.shape[1]
    gen = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (r,), generator=gen) * 2 - 1).to(torch.float64)
    A64, B64, d = A.double(), B.double(), signs.to(A.device)
    AH = _hadamard_last(A64 * d)  # A D H_1 H_2                                   [m, r]
    # H^T B = H_2 H_1 D B (each H_k symmetric), i.e. (B^T D H_1 H_2)^T: the same transform on B^T.
    HtB = _hadamard_last((d[:, None] * B64).T).T  # [r, n]
    return AH.to(A.dtype), HtB.to(B.dtype), signs.to(A.dtype)


def condition_factors(
    A: torch.Tensor, B: torch.Tensor, balance: bool = True, rotate: bool = True, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as casp quantizes them by default: balanced, then rotated (product unchanged).

    Default chosen by measurement (benchmarks/results/lowrank_rotation.txt): on synthetic q/k layers
    at the 25% parameter ratio, balanced + rotated had the lowest product output error after 2/3/4-bit
    RTN and GPTQ in 16 of 18 settings (geometric mean 0.77x the error of the raw whitened factors;
    rotation alone 0.82x, balancing alone 0.99x, the official x10 rescale 1.00x).
    """
    if balance:
        A, B = balance_factors(A, B)
    if rotate:
        A, B, _ = rotate_rank(A, B, seed)
    return A, B
