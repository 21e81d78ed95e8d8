"""Triton kernels for AQLM-style codes (format "aqlm", casp/quant/aqlm.py): a batch-1 GEMV, which
casp.kernels.linear runs for one-row calls with codebooks of at most 256 codewords (casp.kernels.aqlm_gemv_applies),
and a dequantize into the activations' dtype for cuBLAS, for the other calls (``aqlm_dense``).

W[n, j g : (j+1) g] = s_n sum_m C_m[b_{n,j,m}] (M codebooks of 2^B codewords of g weights). Per program: BN
output rows, a range of groups j (split-K over programs, reduced in-kernel as in triton_uniform), BJ groups
per loop step. Each code is a gather of one g-wide codeword row (16 bytes for g = 8 fp16): with 2^B <= 256
the codebooks (2 x 256 x 8 fp16 = 8 KB for 2x8) stay in L1 after first touch, which is how this kernel keeps
"the codebook in shared memory" without managing it by hand (Triton has no explicit shared-memory gathers).
The M codewords of a group are summed in fp16, converted once and multiplied with x's group in fp32 (FFMA);
the row scale s_n applies once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from casp.kernels.triton_uniform import _split_plan, _store_row


@triton.jit
def _aqlm_gemv_kernel(
    x_ptr, codes_ptr, cb_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, J, groups_per_split, stride_xm, stride_cn, stride_ym,
    NCB: tl.constexpr, NCODE: tl.constexpr, GS: tl.constexpr, WIDE: tl.constexpr,
    BN: tl.constexpr, BJ: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """y[m, rn] = s[rn] sum_j sum_c C_c[code[rn, j, c]] . x[m, j GS : (j+1) GS]."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rj = tl.arange(0, BJ)
    rg = tl.arange(0, GS)
    j_lo = pid_s * groups_per_split
    j_hi = tl.minimum(j_lo + groups_per_split, J)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    c_rows = codes_ptr + rn[None, :].to(tl.int64) * stride_cn  # [1, BN]
    # tiles are [BJ, BN, GS] (group, row, weight): with the group axis ahead of the row axis each thread holds
    # one group of x for several rows, so x is converted once per several rows (as in triton_slab)
    acc = tl.zeros([BJ, BN, GS], dtype=tl.float32)
    for j0 in range(j_lo, j_hi, BJ):
        jj = j0 + rj  # [BJ]
        jmask = jj < j_hi
        cmask = jmask[:, None] & nmask[None, :]  # [BJ, BN]
        xk = jj[:, None] * GS + rg[None, :]  # [BJ, GS]
        xv = tl.load(x_row + xk, mask=jmask[:, None], other=0.0).to(tl.float32)
        for c in tl.static_range(NCB):
            code = tl.load(c_rows + jj[:, None] * NCB + c, mask=cmask, other=0).to(tl.int32)  # [BJ, BN]
            if WIDE:
                code = code & 0xFFFF  # int16 storage of a uint16 code
            row = cb_ptr + (c * NCODE + code[:, :, None]) * GS + rg[None, None, :]  # [BJ, BN, GS]
            cw = tl.load(row, mask=cmask[:, :, None], other=0.0)
            # the codewords of a group are summed in fp16 (one rounding, like the fp16 weight itself)
            if c == 0:
                w = cw
            else:
                w = w + cw
        acc += w.to(tl.float32) * xv[:, None, :]
    y = tl.sum(tl.sum(acc, axis=2), axis=0) * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    _store_row(y, y_ptr, y_ptr, ws_ptr, cnt_ptr, m, rn, nmask, pid_n, pid_s, M, N, stride_ym, False, SPLIT)


def aqlm_gemv(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bn: int = 64,
    bj: int = 8,
    split: int = 4,
    num_warps: int = 4,
) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T for an AQLM weight (codes [N, K/g, Mc] uint8/int16, codebooks fp16 [Mc, 2^B, g],
    scales fp16 [N]); x fp16/bf16 on CUDA (or CPU under Triton's interpreter)."""
    Mrows, K = x.shape
    N, J, ncb = codes.shape
    ncb2, ncode, gs = codebooks.shape
    if ncb2 != ncb or J * gs != K or gs & (gs - 1):
        raise ValueError(
            f"aqlm_gemv: codes {tuple(codes.shape)}, codebooks {tuple(codebooks.shape)} and x [.., {K}] do not "
            "match (K = groups * group, group a power of two)"
        )
    x = x.contiguous()
    codes = codes.contiguous()
    y = torch.empty(Mrows, N, dtype=x.dtype, device=x.device)
    nb = triton.cdiv(N, bn)
    per, split, ws, cnt = _split_plan(J, bj, split, nb * Mrows, Mrows, N, x.device)
    _aqlm_gemv_kernel[(nb, Mrows, split)](
        x, codes, codebooks.contiguous(), scales, y, ws if ws is not None else y, cnt if cnt is not None else codes,
        Mrows, N, J, per, x.stride(0), codes.stride(0), y.stride(0),
        NCB=ncb, NCODE=ncode, GS=gs, WIDE=codes.dtype == torch.int16, BN=bn, BJ=bj, SPLIT=split,
        num_warps=num_warps,
    )  # fmt: skip
    return y


@triton.jit
def _aqlm_dequant_kernel(
    codes_ptr, cb_ptr, s_ptr, w_ptr, N, J, stride_cn, stride_wn,
    NCB: tl.constexpr, NCODE: tl.constexpr, GS: tl.constexpr, WIDE: tl.constexpr,
    BN: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """W[rn, j GS : (j+1) GS] = s[rn] sum_c C_c[code[rn, j, c]] for the BJ groups j of program_id(1), in W's dtype
    (the codewords summed in fp16 as the GEMV does, the scale applied in fp32)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rj = tl.program_id(1) * BJ + tl.arange(0, BJ)
    rg = tl.arange(0, GS)
    mask = (rn < N)[:, None] & (rj < J)[None, :]  # [BN, BJ]
    for c in tl.static_range(NCB):
        code = tl.load(codes_ptr + rn[:, None].to(tl.int64) * stride_cn + rj[None, :] * NCB + c, mask=mask, other=0)
        code = code.to(tl.int32)
        if WIDE:
            code = code & 0xFFFF  # int16 storage of a uint16 code
        cw = tl.load(cb_ptr + (c * NCODE + code[:, :, None]) * GS + rg[None, None, :], mask=mask[:, :, None], other=0.0)
        if c == 0:
            w = cw
        else:
            w = w + cw
    w = w.to(tl.float32) * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None, None]
    ptrs = w_ptr + rn[:, None, None].to(tl.int64) * stride_wn + rj[None, :, None] * GS + rg[None, None, :]
    tl.store(ptrs, w.to(w_ptr.dtype.element_ty), mask=mask[:, :, None])


def aqlm_dequantize(
    codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, bn: int = 64, bj: int = 16
) -> torch.Tensor:
    """Dense W [N, K] in ``dtype`` from AQLM codes [N, K/g, Mc], codebooks fp16 [Mc, 2^B, g] (g a power of two) and
    scales fp16 [N], on their device."""
    N, J, ncb = codes.shape
    _, ncode, gs = codebooks.shape
    w = torch.empty(N, J * gs, dtype=dtype, device=codes.device)
    codes = codes.contiguous()
    _aqlm_dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(J, bj))](
        codes, codebooks.contiguous(), scales, w, N, J, codes.stride(0), w.stride(0),
        NCB=ncb, NCODE=ncode, GS=gs, WIDE=codes.dtype == torch.int16, BN=bn, BJ=bj, num_warps=4,
    )  # fmt: skip
    return w


def aqlm_dense(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = x W^T for x [..., K] (fp16/bf16): W dequantized by :func:`aqlm_dequantize` in x's dtype, then cuBLAS."""
    return torch.nn.functional.linear(x, aqlm_dequantize(codes, codebooks, scales, x.dtype))
