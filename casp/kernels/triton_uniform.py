"""Triton kernels for the "uniform" packed format (formats.md): y = x W^T with W stored as b-bit codes.

Three kernels share one unpacking routine:

* ``_gemv_kernel`` (decode, one activation row per program row of the grid): fused unpack + dot on
  CUDA cores. Per code it costs one LOP3, one FFMA to turn the bits into a float, one FFMA for the
  product, so at batch 1 it is bound by memory, not by arithmetic.
* ``_dot_kernel`` (small batch, M <= 64): unpack a [BN, BK] tile in registers, then ``tl.dot`` on
  tensor cores against an activation tile [BM, BK].
* ``_dequant_kernel`` (prefill): unpack the full weight into the activation dtype once per call,
  then cuBLAS (``F.linear``): at M ~ 2048 the GEMM dominates and cuBLAS is faster than any Triton
  tile loop that also unpacks.

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

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_MAGIC = 0x4B000000  # fp32 bit pattern of 2^23: OR-ing a small integer c into the mantissa gives 2^23 + c


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
    omask = nmask
    if SPLIT > 1:
        y, last = _split_reduce(y, ws_ptr, cnt_ptr, m * N + rn, nmask, pid_n * M + m, pid_s, M * N, SPLIT)
        omask = nmask & last
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=omask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=omask)


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
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    nmask = rn < N
    mmask = rm < M
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
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT > 1:
        off = rm[:, None] * N + rn[None, :]
        acc, last = _split_reduce(
            acc, ws_ptr, cnt_ptr, off, omask, pid_n * tl.num_programs(1) + pid_m, pid_s, M * N, SPLIT
        )
        omask = omask & last
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask)


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


class KernelConfig:
    """Tile sizes and launch options of one kernel call.

    bn: output rows per program; bk: weight columns per loop step; split: programs sharing one
    row block along K (reduced in-kernel by the last one); bm: activation rows per program of the
    tensor-core kernel.
    """

    __slots__ = ("bn", "bk", "bm", "num_warps", "num_stages", "split")

    def __init__(self, bn: int, bk: int, num_warps: int = 4, num_stages: int = 2, bm: int = 16, split: int = 1):
        for name, v in (("bn", bn), ("bk", bk), ("bm", bm)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {v}")
        if split < 1:
            raise ValueError(f"KernelConfig.split must be >= 1, got {split}")
        self.bn, self.bk, self.bm, self.num_warps, self.num_stages, self.split = (
            bn,
            bk,
            bm,
            num_warps,
            num_stages,
            split,
        )

    def replace(self, **kw) -> KernelConfig:
        d = {k: getattr(self, k) for k in self.__slots__}
        d.update(kw)
        return KernelConfig(**d)

    def __repr__(self) -> str:
        return (
            f"KernelConfig({self.bn}, {self.bk}, {self.num_warps}, {self.num_stages}, bm={self.bm}, split={self.split})"
        )


# Best configs measured on an H100 (benchmarks/kernels.py --sweep), keyed (path, bits, N, K); others use defaults.
TUNED: dict[tuple[str, int, int, int], KernelConfig] = {}

# Paths by batch rows M: gemv for M <= GEMV_MAX_M, tensor-core dot for M <= DOT_MAX_M, else dequantize + cuBLAS.
GEMV_MAX_M = 1
DOT_MAX_M = 64

# Split-K counters: one zeroed int32 buffer per device, created outside graph capture and reset by the
# kernels themselves (like a cuBLAS workspace). Launches on concurrent streams of one device must not
# both use split-K at the same time.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_N_COUNTERS = 1 << 16


def unit_geometry(bits: int) -> tuple[int, int]:
    """(codes per unit, words per unit): 32/b codes in one word for b in {2, 4, 8}; 32 codes in 3 words for b = 3."""
    return (32, 3) if bits == 3 else (32 // bits, 1)


def default_config(path: str, bits: int, N: int, K: int, M: int = 1) -> KernelConfig:
    """A reasonable config when the shape is not in TUNED: enough programs along N and K to fill 132 SMs."""
    uc, _ = unit_geometry(bits)
    if path == "gemv":
        bn, bk = 16, max(512, uc)
        split = max(1, min(8, (132 * 8) // max(1, -(-N // bn))))
        return KernelConfig(bn, bk, 4, 2, split=split)
    if path == "dot":
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        bn = 64
        split = max(1, min(8, (132 * 4) // max(1, -(-N // bn) * -(-M // bm))))
        return KernelConfig(bn, max(256, uc), 4, 2, bm=bm, split=split)
    return KernelConfig(32, max(256, uc), 4, 1)


def pick_config(path: str, bits: int, N: int, K: int, M: int = 1) -> KernelConfig:
    cfg = TUNED.get((path, bits, N, K))
    if cfg is not None and path == "dot":
        cfg = cfg.replace(bm=default_config(path, bits, N, K, M).bm)
    return cfg or default_config(path, bits, N, K, M)


def _interpreting() -> bool:
    """Under Triton's CPU interpreter (TRITON_INTERPRET=1): CPU tensors allowed, no inline PTX."""
    return os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")


def _n_units(K: int, bits: int) -> int:
    """Units per row: K padded to a multiple of 32 codes, divided by the codes per unit."""
    return (K + 31) // 32 * (32 // unit_geometry(bits)[0])


def _gsub(bk: int, group_size: int, n_groups: int) -> int:
    """Columns per chunk that lie inside one group (see module docstring)."""
    return bk if n_groups == 1 else min(bk, group_size & -group_size)


def _common(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, cfg: KernelConfig) -> dict:
    uc, uw = unit_geometry(bits)
    if cfg.bk < uc:
        raise ValueError(f"KernelConfig.bk={cfg.bk} is smaller than one unit of {uc} codes at {bits} bits")
    gsub = _gsub(cfg.bk, group_size, scales.shape[1])
    return dict(BITS=bits, UC=uc, UW=uw, ASM=not _interpreting(), BN=cfg.bn, BK=cfg.bk, GSUB=gsub)


def _split_plan(n_units: int, bu: int, split: int, n_tiles: int, M: int, N: int, device: torch.device):
    """(units per split, splits, workspace, counters) with no empty split; split 1 when counters are unavailable."""
    per = triton.cdiv(triton.cdiv(n_units, split), bu) * bu  # units per split, a multiple of the tile
    split = -(-n_units // per)
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
    n_units = _n_units(K, bits)
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
    n_units = _n_units(K, bits)
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
    n_units = _n_units(K, bits)
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


def choose_path(M: int) -> str:
    return "gemv" if M <= GEMV_MAX_M else ("dot" if M <= DOT_MAX_M else "dequant")


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
) -> torch.Tensor:
    """y = x W^T (+ bias) for a "uniform" weight, x [..., K] in fp16/bf16 on CUDA; y in x's dtype.

    ``path`` forces "gemv", "dot" or "dequant" (benchmarks); None picks by the number of rows.
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
    path = path or choose_path(M)
    if path == "dequant":
        w = dequantize(qweight, scales, zeros, bits, group_size, K, x.dtype, cfg)
        y = F.linear(x2, w, bias)
    elif path == "dot":
        y = dot(x2, qweight, scales, zeros, bits, group_size, bias, cfg)
    elif path == "gemv":
        y = gemv(x2, qweight, scales, zeros, bits, group_size, bias, cfg)
    else:
        raise ValueError(f"unknown kernel path {path!r}; use 'gemv', 'dot' or 'dequant'")
    return y.reshape(*lead, N)
