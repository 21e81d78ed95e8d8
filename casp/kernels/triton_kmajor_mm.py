"""Every batch size on the K-major layout alone, so a GPU can hold that copy instead of the stored one.

The batch-1 kernel (casp/kernels/triton_kmajor.py) reads a K-major copy of each weight's codes; the other
batch sizes read the stored layout, so a GPU running both holds the packed weights twice. With the two kernels
here the K-major copy serves every batch size ("kmajor-only" mode, casp.kernels.set_batch1_kernel):

* ``_kmajor_tc_kernel`` (a few rows): one slab per loop step. Field J of the slab's WPG words holds the codes of
  column pairs J WPG .. J WPG + WPG - 1, so decoding the fields in order J = 0, 1, ... gives the codes of *all*
  the slab's pairs in pair order: a [SP, BN] tile of the even columns (low halves) and one of the odd columns
  (high halves). Two ``tl.dot`` with the even and the odd activation columns make the slab's product (the code
  tiles as the A operand, as in triton_uniform's tc kernel: 4% fewer instructions than as B, offline SASS);
  the slab lies inside one group, so scale and zero apply once per (row, slab):
  ``s (x_even q_even + x_odd q_odd - z sum_k x_k)``.
* ``_kmajor_dequant_t_kernel`` (prefill): the dense weight, written transposed ([K, N]: a word tile's rows are
  contiguous along N, so the stores are coalesced), for cuBLAS.

``kmajor_linear`` picks between them and the batch-1 GEMV by the number of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from casp.kernels.slab_layout import KMajorWeight
from casp.kernels.triton_kmajor import column_pairs, kmajor_gemv_packed
from casp.kernels.triton_slab import _split_pair
from casp.kernels.triton_uniform import _interpreting, _split_plan, _store_tile, _tile
from casp.kernels.uniform_config import DOT_MAX_M, KernelConfig


@triton.jit
def _slab_scale_zero(sz_ptr, t, rn, nmask, N, GROUP, S: tl.constexpr, PRE: tl.constexpr):
    """fp32 (scale, zero) [BN] of slab t (one group), the power of two of the packed scale undone."""
    sz = tl.load(sz_ptr + ((t * S) // GROUP) * N + rn, mask=nmask, other=0)
    s = (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * (1.0 / (1 << PRE))
    z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * (1 << PRE)
    return s, z


@triton.jit
def _slab_codes(w, HI: tl.constexpr, BITS: tl.constexpr, XBF16: tl.constexpr, F32_DOT: tl.constexpr):
    """Codes [SP, BN] of the low (even columns) or high (odd) halves of a slab's words w [WPG, BN], in pair order
    (row J WPG + v is field J of word v), as the dot's operand type.

    A code q is put under the mantissa of 1024 (fp16, 0x6400) or 128 (bf16, 0x4300), whose last place is 1, and
    that number subtracted: exact, and no int -> float conversion (a quarter-rate instruction). F32_DOT (Triton's
    interpreter, whose bf16 arithmetic is wrong): the subtraction in fp32.
    """
    HP: tl.constexpr = 16 // BITS
    WPG: tl.constexpr = w.shape[0]
    BN: tl.constexpr = w.shape[1]
    shift = (tl.arange(0, HP) * BITS + 16 * HI)[:, None, None]
    q = tl.reshape((tl.broadcast_to(w[None, :, :], [HP, WPG, BN]) >> shift) & ((1 << BITS) - 1), [HP * WPG, BN])
    if XBF16 and F32_DOT:
        c = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32) - 128.0
    elif XBF16:
        c = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        c = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    return c


@triton.jit
def _kmajor_tc_kernel(
    x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, KH, T, slabs_per_split, GROUP, stride_xm, stride_ym,
    BITS: tl.constexpr, WPG: tl.constexpr, PRE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, XBF16: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    """y[rm, rn] = x[rm] W[rn]^T from the K-major words [T WPG, N]: BM x BN outputs, slabs split over program_id(2).

    x_ptr: the activations as int32 column pairs [M, KH] (fp16 or bf16 halves): one 4-byte load gives the even
    and the odd column of a pair.
    """
    SP: tl.constexpr = (16 // BITS) * WPG  # column pairs per slab
    pid_n, pid_m, pid_s, rn, rm, nmask, mmask = _tile(M, N, BM, BN)
    rv = tl.arange(0, WPG)
    rp = tl.arange(0, SP)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    t_lo = pid_s * slabs_per_split
    t_hi = tl.minimum(t_lo + slabs_per_split, T)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    # codes are exact in fp16/bf16 (F32_DOT: Triton's interpreter, whose bf16 dot is wrong, multiplies in fp32)
    dot_t: tl.constexpr = tl.float32 if F32_DOT else (tl.bfloat16 if XBF16 else tl.float16)
    for t in range(t_lo, t_hi):
        w = tl.load(w_ptr + (t * WPG + rv)[:, None].to(tl.int64) * N + rn[None, :], mask=nmask[None, :], other=0)
        pair = t * SP + rp
        x2 = tl.load(x_rows + pair[None, :], mask=mmask[:, None] & (pair < KH)[None, :], other=0)  # [BM, SP]
        x_even, x_odd = _split_pair(x2, XBF16)  # fp32, exact
        d = tl.dot(tl.trans(_slab_codes(w, 0, BITS, XBF16, F32_DOT).to(dot_t)), tl.trans(x_even.to(dot_t)))
        d = tl.dot(tl.trans(_slab_codes(w, 1, BITS, XBF16, F32_DOT).to(dot_t)), tl.trans(x_odd.to(dot_t)), d)
        xs = tl.sum(x_even + x_odd, axis=1)
        s, z = _slab_scale_zero(sz_ptr, t, rn, nmask, N, GROUP, 2 * SP, PRE)
        acc += s[:, None] * (d - z[:, None] * xs[None, :])
    _store_tile(tl.trans(acc), y_ptr, b_ptr, ws_ptr, cnt_ptr, rm, rn, mmask, nmask, pid_n, pid_m, pid_s, M, N,
                stride_ym, HAS_BIAS, SPLIT)


@triton.jit
def _kmajor_dequant_t_kernel(
    w_ptr, sz_ptr, out_ptr, N, K, GROUP,
    BITS: tl.constexpr, WPG: tl.constexpr, PRE: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """out[k, rn] = W[rn, k] = (q - z) s for the columns k of slab program_id(1), in the output's dtype."""
    HP: tl.constexpr = 16 // BITS
    S: tl.constexpr = 2 * HP * WPG
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.program_id(1)
    nmask = rn < N
    rv = tl.arange(0, WPG)
    w = tl.load(w_ptr + (t * WPG + rv)[:, None].to(tl.int64) * N + rn[None, :], mask=nmask[None, :], other=0)
    s, z = _slab_scale_zero(sz_ptr, t, rn, nmask, N, GROUP, S, PRE)
    for J in tl.static_range(HP):
        for H in tl.static_range(2):
            q = ((w >> (16 * H + J * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            k = t * S + 2 * (J * WPG + rv) + H  # [WPG]
            ptrs = out_ptr + k[:, None].to(tl.int64) * N + rn[None, :]
            v = (q - z[None, :]) * s[None, :]
            tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=(k < K)[:, None] & nmask[None, :])


def kmajor_tc_supported(bits: int, wpg: int) -> bool:
    """``tl.dot`` needs at least 16 column pairs per slab: WPG >= 2 words at 2 bits, >= 4 at 4 bits."""
    return (16 // bits) * wpg >= 16


def default_tc_config(M: int, N: int, T: int) -> KernelConfig:
    """64 rows x (16-64) activation rows per program; enough K splits (whole slabs) to give 132 SMs 4 programs
    (bk is unused: a loop step is one slab)."""
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    bn = 64
    tiles = -(-N // bn) * -(-M // bm)
    split = max(1, min(8, T, (132 * 4) // max(1, tiles)))
    return KernelConfig(bn, 128, 4, 2, bm=bm, split=split)


def kmajor_tc(
    x: torch.Tensor, kw: KMajorWeight, bias: torch.Tensor | None = None, cfg: KernelConfig | None = None
) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T on tensor cores from the K-major words (x already in stored column order)."""
    M, K = x.shape
    N = kw.out_features
    T = kw.words.shape[0] // kw.wpg
    if not kmajor_tc_supported(kw.bits, kw.wpg):
        raise ValueError(f"the K-major tensor-core kernel needs 16 column pairs per slab; this {kw.bits}-bit weight "
                         f"(group {kw.group_size}) has {(16 // kw.bits) * kw.wpg}: keep its stored layout")  # fmt: skip
    cfg = cfg or default_tc_config(M, N, T)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    nb, mb = triton.cdiv(N, cfg.bn), triton.cdiv(M, cfg.bm)
    per, split, ws, cnt = _split_plan(T, 1, cfg.split, nb * mb, M, N, x.device)
    xp = column_pairs(x)
    _kmajor_tc_kernel[(nb, mb, split)](
        xp, kw.words, kw.sz, bias if bias is not None else y, y, ws if ws is not None else y,
        cnt if cnt is not None else kw.words,
        M, N, xp.shape[1], T, per, kw.group_size, xp.stride(0), y.stride(0),
        BITS=kw.bits, WPG=kw.wpg, PRE=kw.pre, HAS_BIAS=bias is not None, BM=cfg.bm, BN=cfg.bn, SPLIT=split,
        XBF16=x.dtype == torch.bfloat16, F32_DOT=_interpreting() and x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def kmajor_dequantize_t(kw: KMajorWeight, dtype: torch.dtype, bn: int = 128) -> torch.Tensor:
    """Dense W^T [K, N] in ``dtype`` (stored column order), (q - z) s computed in fp32 as the torch path does."""
    N, K = kw.out_features, kw.in_features
    T = kw.words.shape[0] // kw.wpg
    out = torch.empty(K, N, dtype=dtype, device=kw.device)
    _kmajor_dequant_t_kernel[(triton.cdiv(N, bn), T)](
        kw.words, kw.sz, out, N, K, kw.group_size, BITS=kw.bits, WPG=kw.wpg, PRE=kw.pre, BN=bn, num_warps=4,
    )  # fmt: skip
    return out


def kmajor_linear(
    x: torch.Tensor, kw: KMajorWeight, bias: torch.Tensor | None = None, path: str | None = None
) -> torch.Tensor:
    """y = x W^T (+ bias) for a weight held only in the K-major layout; x [..., K] fp16/bf16 on W's device.

    ``path`` forces "gemv" (batch-1 kernel, fp16 only), "tc" or "dequant"; None picks by the number of rows:
    the GEMV at one fp16 row, tensor cores up to uniform_config.DOT_MAX_M rows, else dequantize + cuBLAS.
    """
    K = kw.in_features
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {K}")
    if x.dtype not in (torch.float16, torch.bfloat16) or x.device != kw.device:
        raise ValueError(f"K-major kernels take fp16/bf16 activations on {kw.device}, got {x.dtype} on {x.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if kw.perm is not None:
        x2 = x2.index_select(1, kw.perm)  # act-order: stored column j holds input feature perm[j]
    x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, kw.out_features)
    if path is None:
        fits_tc = kmajor_tc_supported(kw.bits, kw.wpg)
        path = "gemv" if M == 1 and x.dtype == torch.float16 else ("tc" if M <= DOT_MAX_M and fits_tc else "dequant")
    if path == "gemv":
        y = kmajor_gemv_packed(x2, kw, bias)
    elif path == "tc":
        y = kmajor_tc(x2, kw, bias)
    elif path == "dequant":
        y = F.linear(x2, kmajor_dequantize_t(kw, x.dtype).t(), bias)
    else:
        raise ValueError(f"unknown K-major path {path!r}; use 'gemv', 'tc' or 'dequant'")
    return y.reshape(*lead, kw.out_features)
