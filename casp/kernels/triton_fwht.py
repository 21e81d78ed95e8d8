"""Triton Walsh-Hadamard transform of activation rows, one launch (QuIP#'s incoherence transforms at decode).

casp.hadamard.fwht runs log2(n) butterfly passes of a few torch ops each: about 36 launches for n = 4096,
which at batch 1 cost more than the matmul they surround. Here one program transforms one row in
registers: with n = a * b (a, b powers of two, 16 <= b <= a <= 128) the Sylvester matrix factors as
H_n = H_a (x) H_b, so for the row viewed as X [a, b] (x[i * b + j] = X[i, j])

    fwht(x) = (H_a X H_b) / sqrt(n)        (Sylvester matrices are symmetric)

two small matrix products (fp32 IEEE, on tensor cores where the compiler maps them) with H_a and H_b
built in registers from the bit-parity rule H[i, j] = (-1)^popcount(i & j). Sizes outside 256..16384 use
the torch version.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from casp.hadamard import fwht as torch_fwht
from casp.hadamard import is_power_of_two
from casp.kernels.triton_uniform import _interpreting

MIN_N, MAX_N = 256, 16384


@triton.jit
def _sylvester(A: tl.constexpr):
    """The A x A Sylvester Hadamard matrix (entries +-1, fp32): (-1)^popcount(i & j)."""
    i = tl.arange(0, A)[:, None]
    j = tl.arange(0, A)[None, :]
    v = i & j
    parity = tl.zeros([A, A], dtype=tl.int32)
    for k in tl.static_range(7):  # A <= 128: 7 bits
        parity ^= (v >> k) & 1
    return (1 - 2 * parity).to(tl.float32)


@triton.jit
def _fwht_kernel(X, Y, stride_x, stride_y, scale, A: tl.constexpr, B: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, A)[:, None] * B + tl.arange(0, B)[None, :]
    x = tl.load(X + row * stride_x + offs).to(tl.float32)  # [A, B]
    t = tl.dot(_sylvester(A), x, input_precision="ieee")
    y = tl.dot(t, _sylvester(B), input_precision="ieee") * scale
    tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty))


def fwht_rows(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform of the last dimension (same values as casp.hadamard.fwht): one Triton
    launch for power-of-two sizes 256..16384 on CUDA (or under Triton's interpreter), the torch version otherwise."""
    n = x.shape[-1]
    if not (is_power_of_two(n) and MIN_N <= n <= MAX_N and (x.is_cuda or _interpreting())):
        return torch_fwht(x)
    k = int(math.log2(n))
    a, b = 1 << ((k + 1) // 2), 1 << (k // 2)
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        warps = 4 if n <= 4096 else 8
        _fwht_kernel[(x2.shape[0],)](x2, y, x2.stride(0), y.stride(0), 1.0 / math.sqrt(n), A=a, B=b, num_warps=warps)
    return y.reshape(x.shape)
