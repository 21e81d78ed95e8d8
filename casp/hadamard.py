"""Fast Walsh-Hadamard transform (FWHT) on the last dimension, used by QuIP#-style incoherence
processing and by the AKVQ-VL KV cache rotation.

``fwht(x)`` computes x @ H / sqrt(n) with H the Sylvester Hadamard matrix of size n (a power of
two), in O(n log n) without materializing H. The normalized transform is orthogonal and its own
inverse: fwht(fwht(x)) == x.
"""

from __future__ import annotations

import math

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Walsh-Hadamard transform of the last dimension (size must be a power of two)."""
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}")
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


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """Dense normalized Hadamard matrix (for tests and offline weight folding only)."""
    return fwht(torch.eye(n, dtype=dtype, device=device))
