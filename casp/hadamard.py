"""Fast Walsh-Hadamard transform (FWHT) and its extension to sizes that are not powers of two.

Used by QuIP#-style incoherence processing and by the AKVQ-VL KV cache rotation.

``fwht(x)`` computes x @ H / sqrt(n) with H the Sylvester Hadamard matrix of size n (a power of
two), in O(n log n) without materializing H. The normalized transform is orthogonal, symmetric and
its own inverse: fwht(fwht(x)) == x.

Other sizes n = m * p (p the largest power of two for which a factor exists, m small) use the
orthogonal Kronecker transform T_n = F_m (x) H_p, applied as "reshape to [m, p], FWHT on p, dense
m x m matmul on m" in O(n (log p + m)) (:func:`kron_transform`). The small factor F_m is, in order
of preference:

* an exact normalized Hadamard matrix of order m when one can be built: Paley I (m = q + 1, q a
  prime = 3 mod 4: 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, ...) or Paley II (m = 2(q + 1), q a prime
  = 1 mod 4: 28, 36, 60, 76, ...), with m <= ``MAX_DENSE``; e.g. 5120 = 20 * 256, 14336 = 28 * 512,
  13824 = 108 * 128, 576 = 36 * 16, 1536 = 12 * 128;
* otherwise the orthonormal DCT-II matrix of the odd part m of n (e.g. 11008 = 43 * 256: no Hadamard
  of order 43 * 2^j <= 256 is constructible here). Its entries are bounded by sqrt(2/m), so T_n is
  still incoherent (max entry sqrt(2/n), a factor sqrt(2) above a Hadamard) and exactly orthogonal;
  no padding is needed.

Which factor a size gets is a pure function of n (:func:`kron_factor`), so nothing but n needs to
be stored to rebuild the transform.
"""

from __future__ import annotations

import functools
import math

import torch

MAX_DENSE = 256  # largest dense factor m: its matmul costs O(n m) per vector


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Walsh-Hadamard transform of the last dimension (size must be a power of two)."""
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}; use kron_transform for other sizes")
    shape = x.shape
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        # Butterfly on pairs (a, b) that are h apart: (a + b, a - b).
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(shape)
    return y / math.sqrt(n) if normalize else y


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod the prime q (chi(0) = 0)."""
    squares = torch.zeros(q, dtype=torch.float64)
    squares[[(k * k) % q for k in range(1, q)]] = 1.0
    chi = 2.0 * squares - 1.0
    chi[0] = 0.0
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley_hadamard(m: int) -> torch.Tensor | None:
    """An unnormalized (+-1) Hadamard matrix of order m built by Paley's constructions, or None.

    Paley I (q = m - 1 prime, q = 3 mod 4): S = [[0, 1^T], [-1, Q]] is skew, H = I + S.
    Paley II (q = m/2 - 1 prime, q = 1 mod 4): C = [[0, 1^T], [1, Q]] is a symmetric conference
    matrix, H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]].
    Orders 1 and 2 are returned directly. H H^T = m I in every case (checked by the tests).
    """
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = m - 1
    if m % 4 == 0 and _is_prime(q) and q % 4 == 3:
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:] = 1.0
        S[1:, 0] = -1.0
        S[1:, 1:] = _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + S
    q = m // 2 - 1
    if m % 4 == 0 and _is_prime(q) and q % 4 == 1:
        C = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        C[0, 1:] = 1.0
        C[1:, 0] = 1.0
        C[1:, 1:] = _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, a) + torch.kron(torch.eye(m // 2, dtype=torch.float64), b)
    return None


def dct_matrix(m: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix [m, m] (fp64): C[k, i] = c_k cos(pi (i + 1/2) k / m)."""
    i = torch.arange(m, dtype=torch.float64)
    C = torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / m) * math.sqrt(2.0 / m)
    C[0] /= math.sqrt(2.0)
    return C


def kron_factor(n: int) -> tuple[str, int, int]:
    """How size n is transformed: (kind, m, p) with n = m * p, p a power of two.

    kind is "sylvester" (m = 1), "paley" (exact Hadamard factor of order m) or "dct" (m = odd part of
    n, no Hadamard factor of order <= MAX_DENSE found).
    """
    if n < 1:
        raise ValueError(f"transform size must be >= 1, got {n}")
    p = n & -n  # largest power of two dividing n
    m = n // p
    if m == 1:
        return "sylvester", 1, n
    mm, pp = m, p
    while mm <= MAX_DENSE:
        if paley_hadamard(mm) is not None:
            return "paley", mm, pp
        if pp == 1:
            break
        mm, pp = mm * 2, pp // 2
    return "dct", m, p


def kron_small_matrix(n: int) -> torch.Tensor:
    """The normalized small orthogonal factor F_m (fp64) of the transform of size n."""
    kind, m, _ = kron_factor(n)
    if kind == "dct":
        return dct_matrix(m)
    return paley_hadamard(m) / math.sqrt(m)


@functools.lru_cache(maxsize=64)
def _small_matrix_on(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """kron_small_matrix(n) in dtype on device, built once: a rebuild per call costs a host->device copy, which
    CUDA-graph capture also refuses (the factors are at most MAX_DENSE^2 values, so the memo stays small)."""
    return kron_small_matrix(n).to(dtype=dtype, device=device)


def kron_transform(x: torch.Tensor, transpose: bool = False, factor: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the orthogonal transform T_n = F_m (x) H_p to every row vector of x (last dim n).

    Returns x @ T^T (i.e. T x for each vector x), or x @ T with ``transpose`` (the inverse).
    With m = 1 this is exactly ``fwht(x)``. ``factor`` may pass a precomputed
    ``kron_small_matrix(n)`` (any dtype/device) to avoid rebuilding it.
    """
    n = x.shape[-1]
    kind, m, p = kron_factor(n)
    if m == 1:
        return fwht(x)
    F = _small_matrix_on(n, x.dtype, x.device) if factor is None else factor.to(dtype=x.dtype, device=x.device)
    if transpose:
        F = F.T
    # index i = a * p + b: (T x)[a, b] = sum_{a', b'} F[a, a'] H[b, b'] x[a', b']
    y = fwht(x.reshape(*x.shape[:-1], m, p))  # [..., m, p]
    y = torch.matmul(F, y)
    return y.reshape(x.shape)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """Dense normalized Hadamard matrix (for tests and offline weight folding only).

    Powers of two give the Sylvester matrix (symmetric); other sizes with a Paley factor give
    H_m (x) H_p (orthogonal, not necessarily symmetric). Sizes without an exact Hadamard raise.
    """
    kind, m, p = kron_factor(n)
    if kind == "dct":
        raise ValueError(
            f"no Hadamard matrix of size {n} can be built here (odd part {m}); "
            "use kron_transform, which falls back to a DCT factor"
        )
    return kron_transform(torch.eye(n, dtype=torch.float64)).T.contiguous().to(dtype=dtype, device=device)
