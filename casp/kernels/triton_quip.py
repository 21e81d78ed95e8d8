"""Matmul for QuIP#-style weights (format "quip", casp/quant/quip.py), in Triton.

Two ways for the middle product, neither dispatched by casp.kernels.linear until they are measured on a GPU (their
times against the torch path: ``benchmarks/kernels.py --quip``): ``quip_linear``, a decode-and-dot GEMV on rotated
activations, and ``quip_dense``, which decodes the rotated weight into the activations' dtype for cuBLAS (any
batch; it writes 2 bytes per weight where the torch path builds an fp32 copy).

    y = D_N T_N^T ( s * (C (T_K D_K x)) )

The two orthogonal transforms act on activation vectors (K or N numbers per row): one Triton launch each
for power-of-two sizes (casp.kernels.triton_fwht), casp.hadamard.kron_transform otherwise. The kernel does
the middle product: per output row n and 8-column block j, the E8P codeword C[n, j] is decoded in registers
from its 16-bit code (casp.quant.e8p: source vector a = S[code >> 8], read from a 256 x 8 table that stays
in L1; signs from bits 1..7, coordinate 0's sign from the parity rule; shift +-1/4 from bit 0) and dotted
with the 8 activations of block j; 3 bits add the 1-bit sign residual (codes2 bit i: sign of coordinate i)
and 4 bits a second E8P codeword, both over ``resid_scale``. The row scale s_n applies once per row. Per
program: BN output rows and one activation row (program_id(1)), K split over program_id(2) and reduced
in-kernel as in triton_uniform.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from casp.hadamard import kron_factor, kron_transform
from casp.kernels.triton_fwht import fwht_rows
from casp.kernels.triton_uniform import _split_plan, _store_row
from casp.quant.e8p import CODE_DIM, e8p_source, source_parity


@triton.jit
def _e8p_decode(code, src_ptr, par_ptr, rk):
    """Codewords [BJ, BN, 8] (fp32) of 16-bit codes [BJ, BN] (int32, 0..65535); rk = arange(8)."""
    src = code >> 8
    a = tl.load(src_ptr + src[:, :, None] * 8 + rk[None, None, :])  # [BJ, BN, 8]
    flips = (code[:, :, None] >> rk[None, None, :]) & 1  # bit k for coordinate k >= 1 (bit 0 is the shift)
    flips = tl.where(rk[None, None, :] >= 1, flips, 0)
    flip0 = (tl.load(par_ptr + src) + tl.sum(flips, axis=2)) & 1  # coordinate 0: the parity rule
    flips = tl.where(rk[None, None, :] == 0, flip0[:, :, None], flips)
    shift = tl.where((code & 1) == 1, 0.25, -0.25)
    return a * (1 - 2 * flips).to(tl.float32) + shift[:, :, None]


@triton.jit
def _e8p_weights(code, c2, src_ptr, par_ptr, rk, inv_resid, BITS: tl.constexpr):
    """Unscaled rotated weights [BJ, BN, 8] (fp32) of the codes (and residual codes c2 at 3 and 4 bits)."""
    w = _e8p_decode(code, src_ptr, par_ptr, rk)
    if BITS == 3:  # 1-bit sign residual: bit k of c2 is the sign of coordinate k
        neg = (c2[:, :, None] >> rk[None, None, :]) & 1
        w += (1 - 2 * neg).to(tl.float32) * inv_resid
    elif BITS == 4:  # a second E8P codeword
        w += _e8p_decode(c2 & 0xFFFF, src_ptr, par_ptr, rk) * inv_resid
    return w


@triton.jit
def _quip_gemv_kernel(
    x_ptr, codes_ptr, codes2_ptr, src_ptr, par_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, J, blocks_per_split, stride_xm, stride_cn, stride_c2n, stride_ym, inv_resid,
    BITS: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """y'[m, rn] = s[rn] sum_j C[rn, j] . x'[m, 8 j : 8 j + 8] for the rotated activations x'."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rj = tl.arange(0, BJ)
    rk = tl.arange(0, 8)
    j_lo = pid_s * blocks_per_split
    j_hi = tl.minimum(j_lo + blocks_per_split, J)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    rows = rn[None, :].to(tl.int64)
    # tiles are [BJ, BN, 8] (block, row, weight), as in triton_aqlm: each thread holds one block of x for
    # several rows
    acc = tl.zeros([BJ, BN, 8], dtype=tl.float32)
    for j0 in range(j_lo, j_hi, BJ):
        jj = j0 + rj
        jmask = jj < j_hi
        cmask = jmask[:, None] & nmask[None, :]  # [BJ, BN]
        xv = tl.load(x_row + jj[:, None] * 8 + rk[None, :], mask=jmask[:, None], other=0.0).to(tl.float32)
        code = tl.load(codes_ptr + rows * stride_cn + jj[:, None], mask=cmask, other=0).to(tl.int32) & 0xFFFF
        c2 = code
        if BITS > 2:
            c2 = tl.load(codes2_ptr + rows * stride_c2n + jj[:, None], mask=cmask, other=0).to(tl.int32)
        w = _e8p_weights(code, c2, src_ptr, par_ptr, rk, inv_resid, BITS)
        acc += tl.where(cmask[:, :, None], w, 0.0) * xv[:, None, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=0) * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    _store_row(y, y_ptr, y_ptr, ws_ptr, cnt_ptr, m, rn, nmask, pid_n, pid_s, M, N, stride_ym, False, SPLIT)


@triton.jit
def _quip_dequant_kernel(
    codes_ptr, codes2_ptr, src_ptr, par_ptr, s_ptr, w_ptr, N, J, stride_cn, stride_c2n, stride_wn, inv_resid,
    BITS: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """W'[rn, 8 j : 8 j + 8] = s[rn] C[rn, j] (the rotated weight) for the BJ blocks j of program_id(1), in W's
    dtype."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rj = tl.program_id(1) * BJ + tl.arange(0, BJ)
    rk = tl.arange(0, 8)
    mask = (rj < J)[:, None] & (rn < N)[None, :]  # [BJ, BN]
    rows = rn[None, :].to(tl.int64)
    code = tl.load(codes_ptr + rows * stride_cn + rj[:, None], mask=mask, other=0).to(tl.int32) & 0xFFFF
    c2 = code
    if BITS > 2:
        c2 = tl.load(codes2_ptr + rows * stride_c2n + rj[:, None], mask=mask, other=0).to(tl.int32)
    w = _e8p_weights(code, c2, src_ptr, par_ptr, rk, inv_resid, BITS)
    w = w * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :, None]
    ptrs = w_ptr + rows[:, :, None] * stride_wn + rj[:, None, None] * 8 + rk[None, None, :]
    tl.store(ptrs, w.to(w_ptr.dtype.element_ty), mask=mask[:, :, None])


@functools.lru_cache(maxsize=8)
def e8p_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(source vectors [256, 8] fp32, parity of each source's coordinate sum [256] int32) on ``device``, built once:
    a rebuild costs a host->device copy, which CUDA-graph capture refuses (9 KB per device)."""
    src = e8p_source(device)
    return src.contiguous(), source_parity(src).to(torch.int32)


def quip_rotated_gemv(
    xr: torch.Tensor,
    codes: torch.Tensor,
    codes2: torch.Tensor | None,
    scales: torch.Tensor,
    bits: int,
    resid_scale: float,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    bn: int = 32,
    bj: int = 16,
    split: int = 4,
    num_warps: int = 4,
) -> torch.Tensor:
    """y' [M, N] (fp32) = s * (xr C^T) for rotated activations xr [M, K] and E8P codes [N, K/8] (int16),
    codes2 (3 bits: uint8 sign bits; 4 bits: int16 E8P codes; 2 bits: None), scales fp16 [N]."""
    Mrows, K = xr.shape
    N, J = codes.shape
    if J * CODE_DIM != K or bits not in (2, 3, 4) or (codes2 is None) != (bits == 2):
        raise ValueError(f"quip_rotated_gemv: codes {tuple(codes.shape)} at {bits} bits do not match x [.., {K}]")
    src, parity = tables if tables is not None else e8p_tables(xr.device)
    xr = xr.float().contiguous()
    codes = codes.contiguous()
    c2 = codes if codes2 is None else codes2.contiguous()
    y = torch.empty(Mrows, N, dtype=torch.float32, device=xr.device)
    nb = triton.cdiv(N, bn)
    per, split, ws, cnt = _split_plan(J, bj, split, nb * Mrows, Mrows, N, xr.device)
    _quip_gemv_kernel[(nb, Mrows, split)](
        xr, codes, c2, src, parity, scales, y, ws if ws is not None else y, cnt if cnt is not None else codes,
        Mrows, N, J, per, xr.stride(0), codes.stride(0), c2.stride(0), y.stride(0), 1.0 / resid_scale,
        BITS=bits, BN=bn, BJ=bj, SPLIT=split, num_warps=num_warps,
    )  # fmt: skip
    return y


def _transform(v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """kron_transform of rows: for power-of-two sizes the one-launch Triton Walsh-Hadamard (its own inverse)."""
    return fwht_rows(v) if kron_factor(v.shape[-1])[1] == 1 else kron_transform(v, transpose=transpose)


def quip_linear(x: torch.Tensor, qw, **kernel_options) -> torch.Tensor:
    """y = x W^T for a QuIPWeight ``qw``: transforms (casp.kernels.triton_fwht for power-of-two sizes, else torch)
    around the decode-and-dot kernel; y in x's dtype."""
    N, K = qw.shape
    lead = x.shape[:-1]
    xr = _transform(x.reshape(-1, K).float() * qw.su.float())
    yr = quip_rotated_gemv(xr, qw.codes, qw.codes2, qw.scales, qw.bits, qw.resid_scale, **kernel_options)
    y = _transform(yr, transpose=True) * qw.sv.float()
    return y.to(x.dtype).reshape(*lead, N)


def quip_dequantize_rotated(qw, dtype: torch.dtype, bn: int = 64, bj: int = 16) -> torch.Tensor:
    """W' = s * decode(codes) [N, K] (the weight in the incoherent basis) in ``dtype``, on the codes' device."""
    N, J = qw.codes.shape
    src, parity = e8p_tables(qw.codes.device)
    codes = qw.codes.contiguous()
    c2 = codes if qw.codes2 is None else qw.codes2.contiguous()
    w = torch.empty(N, J * CODE_DIM, dtype=dtype, device=codes.device)
    _quip_dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(J, bj))](
        codes, c2, src, parity, qw.scales, w, N, J, codes.stride(0), c2.stride(0), w.stride(0), 1.0 / qw.resid_scale,
        BITS=qw.bits, BN=bn, BJ=bj, num_warps=4,
    )  # fmt: skip
    return w


def quip_dense(x: torch.Tensor, qw) -> torch.Tensor:
    """y = x W^T for a QuIPWeight ``qw`` and x [..., K] (fp16/bf16): the transforms in fp32 around cuBLAS on the
    rotated weight decoded into x's dtype (:func:`quip_dequantize_rotated`); y in x's dtype."""
    N, K = qw.shape
    lead = x.shape[:-1]
    xr = _transform(x.reshape(-1, K).float() * qw.su.float())
    yr = torch.nn.functional.linear(xr.to(x.dtype), quip_dequantize_rotated(qw, x.dtype)).float()
    y = _transform(yr, transpose=True) * qw.sv.float()
    return y.to(x.dtype).reshape(*lead, N)
