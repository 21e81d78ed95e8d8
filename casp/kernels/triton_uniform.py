"""Triton kernels for the "uniform" packed format (formats.md): y = x W^T with W stored as b-bit codes.

Four kernels (which one runs for which batch: casp/kernels/uniform_config.py, choose_path):

* ``_gemv_kernel`` (M = 1): fused unpack + dot on CUDA cores, fp32 decode and accumulation, split-K
  with an in-kernel reduction. About 4.5 SASS instructions per weight (2 FFMA, 1 LOP3, activation
  conversion, reductions): at batch 1 it is bound by instruction issue and latency, not by memory.
* ``_tc_kernel`` (2 <= M <= 64, b in {2, 4, 8}): fp16 decode of two codes per LOP3 + HFMA2, the
  weight tile is the A operand of ``tl.dot`` (wgmma on Hopper), scales and zeros applied to the
  [BN, BM] partial product once per group.
* ``_dot_kernel`` (2 <= M <= 64 where ``_tc_kernel`` does not apply: 3 bits, groups that split a word):
  fp32 decode, then ``tl.dot``.
* ``_dequant_kernel`` (M > 64, prefill): unpack the full weight into the activation dtype, then cuBLAS
  (``F.linear``): at M ~ 2048 the GEMM dominates and the extra pass costs 10-20%.

Unpacking. A *unit* is the smallest run of words that holds whole codes: one word of 32/b codes for
b in {2, 4, 8}, three words of 32 codes for b = 3. Each code position p of a unit is extracted from
the word tile [BN, BU] into its own fp32 tile with the 2^23 trick (no int->float conversion):
``(w & (mask << sh)) | 0x4B000000`` read as fp32 is 2^23 + c * 2^sh, exact while sh + b <= 23, and
one FFMA ``f * 2^-sh - 2^(23-sh)`` gives c exactly. Codes higher in the word are read from w >> 16
so that the condition holds; the two codes of a 3-bit unit that straddle words are assembled with
integer ops. The per-position tiles are then merged with a tree of ``tl.interleave`` into a
[BN, BU * codes_per_unit] tile in stored column order, without leaving registers.

Groups. With scale s and zero z of a group, sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k):
the scale and zero are applied once per (row, group) instead of per weight. A tile of BK columns is
split into NGT = BK / GSUB chunks of GSUB columns that each lie inside one group: GSUB = BK when
the layer has a single group (per-channel), else min(BK, lowest set bit of group_size), so any
group size (including a partial last group) is handled exactly.

Act-order (``perm``) is handled by the caller of these kernels: x[..., perm] once, then the stored
weight; no gather in the inner loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from casp.kernels import triton_interpreting as _interpreting
from casp.kernels import uniform_config as cfgs
from casp.kernels.uniform_config import KernelConfig, choose_path, pick_config, tc_supported, unit_geometry


@triton.jit
def _and_or(w, MASK: tl.constexpr, ASM: tl.constexpr):
    """(w & MASK) | bits(2^23). One LOP3 with inline PTX; plain Triton compiles it to two (and, or)."""
    if ASM:
        r = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;",  # 0xEA = (a & b) | c
            "=r,r,r,r",
            [w, tl.full(w.shape, MASK, tl.int32), tl.full(w.shape, 0x4B000000, tl.int32)],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        r = (w & MASK) | 0x4B000000
    return r


@triton.jit
def _code(w0, w1, w2, P: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """fp32 tile of code position P of a unit whose words are w0 (and w1, w2 for 3 bits)."""
    BITPOS: tl.constexpr = P * BITS
    IDX: tl.constexpr = BITPOS // 32
    SH: tl.constexpr = BITPOS % 32
    MASK: tl.constexpr = (1 << BITS) - 1
    if IDX == 0:
        w = w0
        wn = w1
    elif IDX == 1:
        w = w1
        wn = w2
    else:
        w = w2
        wn = w2
    if SH + BITS <= 23:
        f = _and_or(w, MASK << SH, ASM).to(tl.float32, bitcast=True)
        v = tl.fma(f, 1.0 / (1 << SH), -8388608.0 / (1 << SH))
    elif SH + BITS <= 32:
        # high codes: shift the word down by 16 (arithmetic shift; the mask drops the sign bits)
        LOW: tl.constexpr = SH - 16
        f = _and_or(w >> 16, MASK << LOW, ASM).to(tl.float32, bitcast=True)
        v = tl.fma(f, 1.0 / (1 << LOW), -8388608.0 / (1 << LOW))
    else:
        # 3-bit code split over two words: low (32 - SH) bits at the top of w, the rest at the bottom of wn
        NLO: tl.constexpr = 32 - SH
        c = ((w >> SH) & ((1 << NLO) - 1)) | ((wn & ((1 << (BITS - NLO)) - 1)) << NLO)
        v = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return v


# Interleave trees: _uN(.., P0, S) is a tile whose column u*N + t holds code P0 + S*t of unit u.
@triton.jit
def _u2(w0, w1, w2, P0: tl.constexpr, S: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    return tl.interleave(_code(w0, w1, w2, P0, BITS, ASM), _code(w0, w1, w2, P0 + S, BITS, ASM))


@triton.jit
def _u4(w0, w1, w2, P0: tl.constexpr, S: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    return tl.interleave(_u2(w0, w1, w2, P0, 2 * S, BITS, ASM), _u2(w0, w1, w2, P0 + S, 2 * S, BITS, ASM))


@triton.jit
def _u8(w0, w1, w2, P0: tl.constexpr, S: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    return tl.interleave(_u4(w0, w1, w2, P0, 2 * S, BITS, ASM), _u4(w0, w1, w2, P0 + S, 2 * S, BITS, ASM))


@triton.jit
def _u16(w0, w1, w2, P0: tl.constexpr, S: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    return tl.interleave(_u8(w0, w1, w2, P0, 2 * S, BITS, ASM), _u8(w0, w1, w2, P0 + S, 2 * S, BITS, ASM))


@triton.jit
def _u32(w0, w1, w2, P0: tl.constexpr, S: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    return tl.interleave(_u16(w0, w1, w2, P0, 2 * S, BITS, ASM), _u16(w0, w1, w2, P0 + S, 2 * S, BITS, ASM))


# fp16 decode for the tensor-core kernel (b in {2, 4, 8}). The two 16-bit halves of a word are decoded
# together: code J sits at bit J*b of the low half and code J + 8/b*... (J + P/2) at the same offset of the
# high half, so one LOP3 ``(w & mask) | 0x64006400`` gives the half2 (1024 + c_lo 2^sh, 1024 + c_hi 2^sh),
# exact while c 2^sh < 1024; one HFMA2 turns it into (c_lo, c_hi) and a second one into the weights
# c s - z s. Codes higher in the half are read from w >> 8 so that the condition holds.
@triton.jit
def _pair(w, s2, z2, J: tl.constexpr, BITS: tl.constexpr, SCALED: tl.constexpr, ASM: tl.constexpr):
    """fp16 codes J and J + 16 // BITS of each word, or with SCALED the weights c s - z s.

    s2, z2: half2 (s, s) and (-z s, -z s) packed in int32 (plain fp16 s and -z s without ASM).
    """
    S: tl.constexpr = J * BITS
    FAR: tl.constexpr = ((1 << BITS) - 1) * (1 << S) >= 1024
    SH: tl.constexpr = S - 8 * FAR
    MASK: tl.constexpr = (((1 << BITS) - 1) << SH) * 65537
    SCALE: tl.constexpr = ((15 - SH) << 10) * 65537  # half2(2^-sh, 2^-sh)
    OFF: tl.constexpr = (0x8000 | ((25 - SH) << 10)) * 65537  # half2(-2^(10-sh), -2^(10-sh))
    src = w
    if FAR:
        src = w >> 8  # arithmetic shift: the mask keeps bits below 24 only
    if not ASM:
        # same values without inline PTX (Triton's CPU interpreter); s2, z2 are then plain fp16 s and -z s
        lo = ((src >> SH) & ((1 << BITS) - 1)).to(tl.float16)
        hi = ((src >> (16 + SH)) & ((1 << BITS) - 1)).to(tl.float16)
        if SCALED:
            lo = (lo.to(tl.float32) * s2.to(tl.float32) + z2.to(tl.float32)).to(tl.float16)
            hi = (hi.to(tl.float32) * s2.to(tl.float32) + z2.to(tl.float32)).to(tl.float16)
    elif SCALED:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $2, $3, $4, 0xEA; fma.rn.f16x2 t, t, $5, $6; fma.rn.f16x2 t, t, $7, $8; "
            "mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r,r,r,r,r,r",
            [
                src,
                tl.full(w.shape, MASK, tl.uint32),
                tl.full(w.shape, 0x64006400, tl.uint32),
                tl.full(w.shape, SCALE, tl.uint32),
                tl.full(w.shape, OFF, tl.uint32),
                s2,
                z2,
            ],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=1,
        )
    else:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $2, $3, $4, 0xEA; fma.rn.f16x2 t, t, $5, $6; mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r,r,r,r",
            [
                src,
                tl.full(w.shape, MASK, tl.uint32),
                tl.full(w.shape, 0x64006400, tl.uint32),
                tl.full(w.shape, SCALE, tl.uint32),
                tl.full(w.shape, OFF, tl.uint32),
            ],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=1,
        )
    return lo, hi


@triton.jit
def _hcode(w, s2, z2, J: tl.constexpr, HI: tl.constexpr, BITS: tl.constexpr, SCALED: tl.constexpr, ASM: tl.constexpr):
    lo, hi = _pair(w, s2, z2, J, BITS, SCALED, ASM)
    v = lo
    if HI:
        v = hi
    return v


# Trees over the pair index J (HI selects the high-half code of each pair); column u*N + t holds pair J0 + S*t.
@triton.jit
def _h2(
    w,
    s2,
    z2,
    J0: tl.constexpr,
    S: tl.constexpr,
    HI: tl.constexpr,
    BITS: tl.constexpr,
    SCALED: tl.constexpr,
    ASM: tl.constexpr,
):
    return tl.interleave(_hcode(w, s2, z2, J0, HI, BITS, SCALED, ASM), _hcode(w, s2, z2, J0 + S, HI, BITS, SCALED, ASM))


@triton.jit
def _h4(
    w,
    s2,
    z2,
    J0: tl.constexpr,
    S: tl.constexpr,
    HI: tl.constexpr,
    BITS: tl.constexpr,
    SCALED: tl.constexpr,
    ASM: tl.constexpr,
):
    return tl.interleave(
        _h2(w, s2, z2, J0, 2 * S, HI, BITS, SCALED, ASM), _h2(w, s2, z2, J0 + S, 2 * S, HI, BITS, SCALED, ASM)
    )


@triton.jit
def _h8(
    w,
    s2,
    z2,
    J0: tl.constexpr,
    S: tl.constexpr,
    HI: tl.constexpr,
    BITS: tl.constexpr,
    SCALED: tl.constexpr,
    ASM: tl.constexpr,
):
    return tl.interleave(
        _h4(w, s2, z2, J0, 2 * S, HI, BITS, SCALED, ASM), _h4(w, s2, z2, J0 + S, 2 * S, HI, BITS, SCALED, ASM)
    )


@triton.jit
def _htree(w, s2, z2, HI: tl.constexpr, BITS: tl.constexpr, SCALED: tl.constexpr, ASM: tl.constexpr):
    """[BN, BU * 16 // BITS]: for each word, its low-half codes (HI=False) or high-half codes, in order."""
    if BITS == 2:
        v = _h8(w, s2, z2, 0, 1, HI, BITS, SCALED, ASM)
    elif BITS == 4:
        v = _h4(w, s2, z2, 0, 1, HI, BITS, SCALED, ASM)
    else:
        v = _h2(w, s2, z2, 0, 1, HI, BITS, SCALED, ASM)
    return v


@triton.jit
def _pack_half2(h):
    """int32 tile holding half2 (h, h)."""
    return tl.inline_asm_elementwise("mov.b32 $0, {$1, $1};", "=r,h", [h], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _codes_fp16(w, s, z, BITS: tl.constexpr, SCALED: tl.constexpr, ASM: tl.constexpr):
    """fp16 tile [BN, BU * 32 // BITS] of words w [BN, BU]: the codes c, or with SCALED the weights (c - z) s
    (s, z: fp16 scales and zeros broadcastable to w).

    Columns are in *pair order* within each word: column u*P + 2j + h holds code j + h*P/2 of word u,
    so the two halves of one decoded half2 stay adjacent (the caller reads x in the same order).
    """
    if SCALED:
        s2 = s
        z2 = (-(z.to(tl.float32) * s.to(tl.float32))).to(tl.float16)
        if ASM:
            s2 = _pack_half2(s2)
            z2 = _pack_half2(z2)
    else:
        s2 = w
        z2 = w
    return tl.interleave(_htree(w, s2, z2, False, BITS, SCALED, ASM), _htree(w, s2, z2, True, BITS, SCALED, ASM))


@triton.jit
def _load_words(qw_ptr, rn, nmask, u0, u_end, stride_qn, UW: tl.constexpr, BU: tl.constexpr):
    """Words of units [u0, min(u0 + BU, u_end)) of rows rn: [BN, BU] tiles w0 (and w1, w2 for 3 bits)."""
    uu = u0 + tl.arange(0, BU)
    lmask = nmask[:, None] & (uu < u_end)[None, :]
    ptr = qw_ptr + rn[:, None].to(tl.int64) * stride_qn + uu[None, :] * UW
    w0 = tl.load(ptr, mask=lmask, other=0)
    if UW == 3:
        w1 = tl.load(ptr + 1, mask=lmask, other=0)
        w2 = tl.load(ptr + 2, mask=lmask, other=0)
    else:
        w1 = w0
        w2 = w0
    return w0, w1, w2


@triton.jit
def _decode(w0, w1, w2, BITS: tl.constexpr, ASM: tl.constexpr):
    """fp32 codes [BN, BU * codes_per_unit] of the unit tiles, in stored column order."""
    if BITS == 2:
        q = _u16(w0, w1, w2, 0, 1, BITS, ASM)
    elif BITS == 4:
        q = _u8(w0, w1, w2, 0, 1, BITS, ASM)
    elif BITS == 8:
        q = _u4(w0, w1, w2, 0, 1, BITS, ASM)
    else:
        q = _u32(w0, w1, w2, 0, 1, BITS, ASM)
    return q


@triton.jit
def _split_reduce(acc, ws_ptr, cnt_ptr, off, mask, cnt_idx, pid_s, MN, SPLIT: tl.constexpr):
    """Split-K epilogue in one kernel: each split stores its fp32 partial; the last to arrive sums them.

    Returns (sum over splits, is_last). The counter is reset by the last program, so the zeroed
    counter buffer is reusable by the next launch on the stream. Deterministic: partials are added
    in split order, whichever program finishes last.
    """
    tl.store(ws_ptr + pid_s * MN + off, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the release below
    cnt = tl.atomic_add(cnt_ptr + cnt_idx, 1, sem="acq_rel")
    last = cnt == SPLIT - 1
    tot = tl.zeros_like(acc)
    for s in tl.static_range(SPLIT):
        tot += tl.load(ws_ptr + s * MN + off, mask=mask & last, other=0.0, cache_modifier=".cg")
    tl.store(cnt_ptr + cnt_idx, 0, mask=last)
    return tot, last


@triton.jit
def _store_row(y, y_ptr, b_ptr, ws_ptr, cnt_ptr, m, rn, nmask, pid_n, pid_s, M, N, stride_ym,
               HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """GEMV epilogue: y [BN] (fp32) of output row m -> split-K sum, + bias, stored by the last split."""
    omask = nmask
    if SPLIT > 1:
        y, last = _split_reduce(y, ws_ptr, cnt_ptr, m * N + rn, nmask, pid_n * M + m, pid_s, M * N, SPLIT)
        omask = nmask & last
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=omask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """Tensor-core prologue (grid: row blocks, activation-row blocks, K splits): the program's ids, its outputs rn,
    activation rows rm, and their masks."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    return pid_n, pid_m, pid_s, rn, rm, rn < N, rm < M


@triton.jit
def _store_tile(acc, y_ptr, b_ptr, ws_ptr, cnt_ptr, rm, rn, mmask, nmask, pid_n, pid_m, pid_s, M, N, stride_ym,
                HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Tensor-core epilogue: acc [BM, BN] (fp32) of rows rm and outputs rn -> split-K sum, + bias, stored by the last
    split (grid: row blocks, activation-row blocks, splits)."""
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT > 1:
        off = rm[:, None] * N + rn[None, :]
        acc, last = _split_reduce(
            acc, ws_ptr, cnt_ptr, off, omask, pid_n * tl.num_programs(1) + pid_m, pid_s, M * N, SPLIT
        )
        omask = omask & last
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _group_params(s_ptr, z_ptr, rn, nmask, k0, G, GROUP, stride_sn, NGT: tl.constexpr, GSUB: tl.constexpr):
    """fp32 scales and zeros [BN, NGT] of the NGT column chunks starting at k0."""
    g = (k0 + tl.arange(0, NGT) * GSUB) // GROUP
    off = rn[:, None].to(tl.int64) * stride_sn + g[None, :]
    m = nmask[:, None] & (g < G)[None, :]
    s = tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=m, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, n_units, units_per_split, G, GROUP, stride_xm, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr, UC: tl.constexpr, UW: tl.constexpr, ASM: tl.constexpr,
    ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, GSUB: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """y[m, rn] = x[m] . W[rn]^T for activation row m = program_id(1), BN output rows, K split program_id(2)."""
    BU: tl.constexpr = BK // UC
    NGT: tl.constexpr = BK // GSUB
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rk = tl.arange(0, BK)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    u_lo = pid_s * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    acc = tl.zeros([BN, NGT], dtype=tl.float32)
    xacc = tl.zeros([NGT], dtype=tl.float32)
    # software prefetch: the next tile's words are in flight while this one is decoded
    w0n, w1n, w2n = _load_words(qw_ptr, rn, nmask, u_lo, u_hi, stride_qn, UW, BU)
    for u0 in range(u_lo, u_hi, BU):
        w0, w1, w2 = w0n, w1n, w2n
        w0n, w1n, w2n = _load_words(qw_ptr, rn, nmask, u0 + BU, u_hi, stride_qn, UW, BU)
        kk = u0 * UC + rk
        xv = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)  # [BK]
        if not ONE_GROUP:
            s, z = _group_params(s_ptr, z_ptr, rn, nmask, u0 * UC, G, GROUP, stride_sn, NGT, GSUB)
        q = _decode(w0, w1, w2, BITS, ASM)  # [BN, BK]
        d = tl.sum(tl.reshape(q * xv[None, :], [BN, NGT, GSUB]), axis=2)  # [BN, NGT]: sum_k q_k x_k per chunk
        xs = tl.sum(tl.reshape(xv, [NGT, GSUB]), axis=1)  # [NGT]: sum_k x_k per chunk
        if ONE_GROUP:
            acc += d
            xacc += xs
        else:
            acc += s * (d - z * xs[None, :])
    if ONE_GROUP:
        s = tl.load(s_ptr + rn.to(tl.int64) * stride_sn, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn.to(tl.int64) * stride_sn, mask=nmask, other=0.0).to(tl.float32)
        y = s * (tl.sum(acc, axis=1) - z * tl.sum(xacc, axis=0))
    else:
        y = tl.sum(acc, axis=1)
    _store_row(y, y_ptr, b_ptr, ws_ptr, cnt_ptr, m, rn, nmask, pid_n, pid_s, M, N, stride_ym, HAS_BIAS, SPLIT)


@triton.jit
def _dot_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, n_units, units_per_split, G, GROUP, stride_xm, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr, UC: tl.constexpr, UW: tl.constexpr, ASM: tl.constexpr,
    ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GSUB: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """y[rm, rn] = x[rm] W[rn]^T on tensor cores, the weight tile unpacked in registers; K split program_id(2)."""
    BU: tl.constexpr = BK // UC
    NGT: tl.constexpr = BK // GSUB
    pid_n, pid_m, pid_s, rn, rm, nmask, mmask = _tile(M, N, BM, BN)
    rk = tl.arange(0, BK)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    u_lo = pid_s * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    xacc = tl.zeros([BM], dtype=tl.float32)
    w0n, w1n, w2n = _load_words(qw_ptr, rn, nmask, u_lo, u_hi, stride_qn, UW, BU)
    for u0 in range(u_lo, u_hi, BU):
        w0, w1, w2 = w0n, w1n, w2n
        w0n, w1n, w2n = _load_words(qw_ptr, rn, nmask, u0 + BU, u_hi, stride_qn, UW, BU)
        kk = u0 * UC + rk
        xt = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :], other=0.0)  # [BM, BK]
        q = _decode(w0, w1, w2, BITS, ASM)  # [BN, BK]
        if ONE_GROUP:
            # codes are small integers: exact in fp16/bf16, so the dot is exact up to fp32 accumulation
            acc += tl.dot(xt, tl.trans(q.to(xt.dtype)))
            xacc += tl.sum(xt.to(tl.float32), axis=1)
        elif NGT == 1:
            s, z = _group_params(s_ptr, z_ptr, rn, nmask, u0 * UC, G, GROUP, stride_sn, 1, GSUB)
            d = tl.dot(xt, tl.trans(q.to(xt.dtype)))
            xs = tl.sum(xt.to(tl.float32), axis=1)
            acc += tl.reshape(s, [1, BN]) * (d - tl.reshape(z, [1, BN]) * xs[:, None])
        else:
            # several groups inside the tile: dequantize each weight, then dot
            s, z = _group_params(s_ptr, z_ptr, rn, nmask, u0 * UC, G, GROUP, stride_sn, NGT, GSUB)
            w = (tl.reshape(q, [BN, NGT, GSUB]) - z[:, :, None]) * s[:, :, None]
            acc += tl.dot(xt, tl.trans(tl.reshape(w, [BN, BK]).to(xt.dtype)))
    if ONE_GROUP:
        s = tl.load(s_ptr + rn.to(tl.int64) * stride_sn, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn.to(tl.int64) * stride_sn, mask=nmask, other=0.0).to(tl.float32)
        acc = s[None, :] * (acc - z[None, :] * xacc[:, None])
    _store_tile(acc, y_ptr, b_ptr, ws_ptr, cnt_ptr, rm, rn, mmask, nmask, pid_n, pid_m, pid_s, M, N, stride_ym,
                HAS_BIAS, SPLIT)


@triton.jit
def _tc_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, n_units, units_per_split, G, GROUP, stride_xm, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr, UC: tl.constexpr, ASM: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr,
    FACTORED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """y[rm, rn] = x[rm] W[rn]^T: weights dequantized to fp16 in registers (2 codes per LOP3 + 2 HFMA2), tl.dot.

    FACTORED: each K tile lies in one group (or the layer has one group): the tile's codes go to the tensor
    cores as they are and the scale and zero are applied to the [BN, BM] partial product. Else scales and
    zeros are looked up per packed word and applied while decoding.
    """
    BU: tl.constexpr = BK // UC
    pid_n, pid_m, pid_s, rn, rm, nmask, mmask = _tile(M, N, BM, BN)
    rk = tl.arange(0, BK)
    # pair order: tile column u*UC + 2j + h holds code j + h*UC/2 of word u; x is put in the same order
    ru = tl.arange(0, BU)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    s_rows = rn[:, None].to(tl.int64) * stride_sn
    u_lo = pid_s * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    xacc = tl.zeros([BM], dtype=tl.float32)
    w0n, _, _ = _load_words(qw_ptr, rn, nmask, u_lo, u_hi, stride_qn, 1, BU)
    for u0 in range(u_lo, u_hi, BU):
        w = w0n
        w0n, _, _ = _load_words(qw_ptr, rn, nmask, u0 + BU, u_hi, stride_qn, 1, BU)
        kk = u0 * UC + rk
        xt = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :], other=0.0)  # [BM, BK]
        # into pair order: (u, h, j) -> (u, j, h)
        xt = tl.reshape(tl.permute(tl.reshape(xt, [BM, BU, 2, UC // 2]), [0, 1, 3, 2]), [BM, BK])
        if FACTORED:
            # codes only; the tile lies in one group: acc += s (x.q - z sum(x)) per row
            q = _codes_fp16(w, w, w, BITS, False, ASM)  # [BN, BK] fp16 codes, pair order
            d = tl.dot(q.to(xt.dtype), tl.trans(xt))  # [BN, BM]
            xs = tl.sum(xt.to(tl.float32), axis=1)  # [BM]
            if ONE_GROUP:
                acc += d
                xacc += xs
            else:
                g = u0 * UC // GROUP
                sc = tl.load(s_ptr + s_rows + g, mask=nmask[:, None], other=0.0).to(tl.float32)  # [BN, 1]
                zc = tl.load(z_ptr + s_rows + g, mask=nmask[:, None], other=0.0).to(tl.float32)
                acc += sc * (d - zc * xs[None, :])
        else:
            # several groups per tile: scales and zeros per packed word, applied while decoding
            g = (u0 + ru) * UC // GROUP
            gm = nmask[:, None] & (g < G)[None, :]
            s = tl.load(s_ptr + s_rows + g[None, :], mask=gm, other=0.0)  # [BN, BU]
            z = tl.load(z_ptr + s_rows + g[None, :], mask=gm, other=0.0)
            wt = _codes_fp16(w, s, z, BITS, True, ASM)  # [BN, BK] fp16 weights, pair order
            acc = tl.dot(wt.to(xt.dtype), tl.trans(xt), acc)  # [BN, BM]: the weight tile is the A operand
    if ONE_GROUP:
        sc = tl.load(s_ptr + s_rows, mask=nmask[:, None], other=0.0).to(tl.float32)
        zc = tl.load(z_ptr + s_rows, mask=nmask[:, None], other=0.0).to(tl.float32)
        acc = sc * (acc - zc * xacc[None, :])
    _store_tile(tl.trans(acc), y_ptr, b_ptr, ws_ptr, cnt_ptr, rm, rn, mmask, nmask, pid_n, pid_m, pid_s, M, N,
                stride_ym, HAS_BIAS, SPLIT)


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr,
    N, K, n_units, G, GROUP, stride_qn, stride_sn, stride_wn,
    BITS: tl.constexpr, UC: tl.constexpr, UW: tl.constexpr, ASM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, GSUB: tl.constexpr,
):  # fmt: skip
    """W[rn, k] = (q - z) s for a [BN, BK] tile, written in the output's dtype (stored column order)."""
    BU: tl.constexpr = BK // UC
    NGT: tl.constexpr = BK // GSUB
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = rn < N
    u0 = tl.program_id(1) * BU
    w0, w1, w2 = _load_words(qw_ptr, rn, nmask, u0, n_units, stride_qn, UW, BU)
    q = _decode(w0, w1, w2, BITS, ASM)
    s, z = _group_params(s_ptr, z_ptr, rn, nmask, u0 * UC, G, GROUP, stride_sn, NGT, GSUB)
    w = tl.reshape((tl.reshape(q, [BN, NGT, GSUB]) - z[:, :, None]) * s[:, :, None], [BN, BK])
    kk = u0 * UC + tl.arange(0, BK)
    ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + kk[None, :]
    tl.store(ptrs, w.to(w_ptr.dtype.element_ty), mask=nmask[:, None] & (kk < K)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Host side


# Split-K counters: one zeroed int32 buffer per device, created outside graph capture and reset by the
# kernels themselves (like a cuBLAS workspace). Launches on concurrent streams of one device must not
# both use split-K at the same time.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_N_COUNTERS = 1 << 16


def _common(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, cfg: KernelConfig) -> dict:
    uc, uw = unit_geometry(bits)
    if cfg.bk < uc:
        raise ValueError(f"KernelConfig.bk={cfg.bk} is smaller than one unit of {uc} codes at {bits} bits")
    gsub = cfgs.gsub(cfg.bk, group_size, scales.shape[1])
    return dict(BITS=bits, UC=uc, UW=uw, ASM=not _interpreting(), BN=cfg.bn, BK=cfg.bk, GSUB=gsub)


def _split_plan(n_units: int, bu: int, split: int, n_tiles: int, M: int, N: int, device: torch.device):
    """(units per split, splits, workspace, counters) with no empty split; split 1 when counters are unavailable."""
    per, split = cfgs.split_sizes(n_units, bu, split)
    if split > 1 and device not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            split = 1  # never allocate the persistent counters inside a graph capture
        else:
            _COUNTERS[device] = torch.zeros(_N_COUNTERS, dtype=torch.int32, device=device)
    if split > 1 and n_tiles > _N_COUNTERS:
        split = 1
    if split == 1:
        return n_units, 1, None, None
    ws = torch.empty(split * M * N, dtype=torch.float32, device=device)
    return per, split, ws, _COUNTERS[device]


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    cfg: KernelConfig | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T with the CUDA-core kernel (one grid row per activation row)."""
    M, K = x.shape
    N, n_groups = scales.shape
    cfg = cfg or pick_config("gemv", bits, N, K, M)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    n_units = cfgs.n_units(K, bits)
    nb = triton.cdiv(N, cfg.bn)
    per, split, ws, cnt = _split_plan(n_units, cfg.bk // unit_geometry(bits)[0], cfg.split, nb * M, M, N, x.device)
    _gemv_kernel[(nb, M, split)](
        x, qweight, scales, zeros, bias if bias is not None else y, y, ws if ws is not None else y,
        cnt if cnt is not None else qweight,
        M, N, K, n_units, per, n_groups, group_size, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        ONE_GROUP=n_groups == 1, HAS_BIAS=bias is not None, SPLIT=split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_common(qweight, scales, bits, group_size, cfg),
    )  # fmt: skip
    return y


def dot(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    cfg: KernelConfig | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T with the tensor-core kernel (weight tile unpacked in registers)."""
    M, K = x.shape
    N, n_groups = scales.shape
    cfg = cfg or pick_config("dot", bits, N, K, M)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    n_units = cfgs.n_units(K, bits)
    nb, mb = triton.cdiv(N, cfg.bn), triton.cdiv(M, cfg.bm)
    per, split, ws, cnt = _split_plan(n_units, cfg.bk // unit_geometry(bits)[0], cfg.split, nb * mb, M, N, x.device)
    _dot_kernel[(nb, mb, split)](
        x, qweight, scales, zeros, bias if bias is not None else y, y, ws if ws is not None else y,
        cnt if cnt is not None else qweight,
        M, N, K, n_units, per, n_groups, group_size, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        ONE_GROUP=n_groups == 1, HAS_BIAS=bias is not None, BM=cfg.bm, SPLIT=split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_common(qweight, scales, bits, group_size, cfg),
    )  # fmt: skip
    return y


def tc(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    cfg: KernelConfig | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T, weights dequantized to fp16 in registers, tensor cores (M <= BM rows per program)."""
    M, K = x.shape
    N, n_groups = scales.shape
    if not tc_supported(bits, group_size, n_groups):
        return dot(x, qweight, scales, zeros, bits, group_size, bias)
    cfg = cfg or pick_config("tc", bits, N, K, M, group_size)
    uc, _ = unit_geometry(bits)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    n_units = cfgs.n_units(K, bits)
    nb, mb = triton.cdiv(N, cfg.bn), triton.cdiv(M, cfg.bm)
    per, split, ws, cnt = _split_plan(n_units, cfg.bk // uc, cfg.split, nb * mb, M, N, x.device)
    factored = n_groups == 1 or group_size % cfg.bk == 0
    _tc_kernel[(nb, mb, split)](
        x, qweight, scales, zeros, bias if bias is not None else y, y, ws if ws is not None else y,
        cnt if cnt is not None else qweight,
        M, N, K, n_units, per, n_groups, group_size, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, UC=uc, ASM=not _interpreting(), HAS_BIAS=bias is not None, ONE_GROUP=n_groups == 1,
        FACTORED=factored,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, SPLIT=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    K: int,
    dtype: torch.dtype,
    cfg: KernelConfig | None = None,
) -> torch.Tensor:
    """Dense W [N, K] in ``dtype``, stored column order ((q - z) s computed in fp32, as the torch path)."""
    N, n_groups = scales.shape
    cfg = cfg or pick_config("dequant", bits, N, K)
    w = torch.empty(N, K, dtype=dtype, device=qweight.device)
    uc, _ = unit_geometry(bits)
    n_units = cfgs.n_units(K, bits)
    grid = (triton.cdiv(N, cfg.bn), triton.cdiv(n_units, cfg.bk // uc))
    _dequant_kernel[grid](
        qweight, scales, zeros, w, N, K, n_units, n_groups, group_size,
        qweight.stride(0), scales.stride(0), w.stride(0),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_common(qweight, scales, bits, group_size, cfg),
    )  # fmt: skip
    return w


def _check_inputs(x, qweight, scales, zeros, perm, bits, group_size, bias) -> None:
    """One clear message per mismatch instead of a kernel fault or a deep traceback."""
    N, K = qweight.shape[0], x.shape[-1]
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"uniform kernels take fp16 or bf16 activations, got {x.dtype}; use the torch path for others")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"uniform kernels support 2, 3, 4 or 8 bits, got {bits}")
    if qweight.dtype != torch.int32 or qweight.shape[1] != (K + 31) // 32 * bits:
        raise ValueError(
            f"qweight {tuple(qweight.shape)} {qweight.dtype} does not match activations with K={K} at {bits} bits "
            f"(expected int32 [N, {(K + 31) // 32 * bits}]); is x's last dimension the layer's in_features?"
        )
    n_groups = -(-K // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (N, n_groups) or t.dtype != torch.float16:
            raise ValueError(f"{name} must be float16 [{N}, {n_groups}], got {t.dtype} {tuple(t.shape)}")
    if perm is not None and perm.shape != (K,):
        raise ValueError(f"perm must have shape ({K},), got {tuple(perm.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    devices = {t.device for t in (x, qweight, scales, zeros, perm, bias) if t is not None}
    if len(devices) != 1 or not (x.is_cuda or _interpreting()):
        raise ValueError(f"uniform kernels need every tensor on one CUDA device, got {sorted(map(str, devices))}")
    if not (qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()):
        raise ValueError("qweight, scales and zeros must be contiguous")


def uniform_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    path: str | None = None,
    cfg: KernelConfig | None = None,
    m1: str | None = None,
) -> torch.Tensor:
    """y = x W^T (+ bias) for a "uniform" weight, x [..., K] in fp16/bf16 on CUDA; y in x's dtype.

    ``path`` forces "gemv", "slab", "slab16", "kmajor", "tc", "dot" or "dequant" (benchmarks); None picks by the number
    of rows (uniform_config.choose_path), with ``m1`` (default uniform_config.GEMV_M1) the kernel at one row.
    """
    N, K = qweight.shape[0], x.shape[-1]
    _check_inputs(x, qweight, scales, zeros, perm, bits, group_size, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if perm is not None:
        x2 = x2.index_select(1, perm)  # act-order: stored column j holds input feature perm[j]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, N)
    path = path or choose_path(M, bits, group_size, scales.shape[1], m1=m1, half=x.dtype == torch.float16)
    if path == "dequant":
        w = dequantize(qweight, scales, zeros, bits, group_size, K, x.dtype, cfg)
        y = F.linear(x2, w, bias)
    elif path == "dot":
        y = dot(x2, qweight, scales, zeros, bits, group_size, bias, cfg)
    elif path == "gemv":
        y = gemv(x2, qweight, scales, zeros, bits, group_size, bias, cfg)
    elif path == "tc":
        y = tc(x2, qweight, scales, zeros, bits, group_size, bias, cfg)
    elif path in ("slab", "slab16"):
        from casp.kernels.triton_slab import slab_gemv  # imports this module: loaded lazily

        y = slab_gemv(x2, qweight, scales, zeros, bits, group_size, bias, cfg, half=path == "slab16")
    elif path == "kmajor":
        from casp.kernels.triton_kmajor import kmajor_gemv  # imports this module: loaded lazily

        y = kmajor_gemv(x2, qweight, scales, zeros, bits, group_size, bias, cfg)
    else:
        raise ValueError(
            f"unknown kernel path {path!r}; use 'gemv', 'slab', 'slab16', 'kmajor', 'tc', 'dot' or 'dequant'"
        )
    return y.reshape(*lead, N)
