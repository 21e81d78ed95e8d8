"""Batch-1 GEMV on the K-major slab layout (casp/kernels/slab_layout.py): many rows per thread, half2 decode.

Why another batch-1 kernel: the row-major slab kernel (triton_slab, "slab16") gives each thread one row's
words, so every 16-byte load of weights needs 8 loads of activation pairs, and ncu counted 4.1 issued
instructions per weight (benchmarks/results/kernels_slab_notes.md): at batch 1 it is bound by
instruction issue and L1 traffic, not by HBM. Here the words are stored [K-words, N]: a thread's 16-byte
load holds one word of 4 consecutive rows, so each activation pair it loads serves all of them (and
every row block the thread covers), and the loads of a warp are 512 contiguous bytes.

Per program: BN output rows, a K range of whole steps (split-K over programs, reduced in-kernel as in
triton_uniform), BK words per row per step, all inside one slab (so one scale and zero per row and step).
Word v of slab t holds, in field J of its low / high 16-bit half, the codes of columns 2p and 2p + 1 of
pair p = t SP + J WPG + v (SP pairs per slab). Per (row, step), with scale s and zero z of the group:

    sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k)

One LOP3 puts the two codes of field J of a word into a half2 (1024 + q 2^sh, 1024 + q' 2^sh), one HFMA2
turns it into (q, q') 2^-4, one HFMA2 accumulates (q x[2p], q' x[2p+1]) 2^-4 (triton_slab._half_mac; the
2^4 goes to the packed scale, so the decode stays exact and the half2 sums sit 16x below fp16's range).
A word's half2 sum is turned into fp32 at the end of its fields: a lane holds at most 8 products
(2 bits) or 4 (4 bits), so it overflows only when |x| > 43669 (2 bits) or > 17467 (4 bits) over a whole
word's columns. The zero is applied in fp32 (zeros need not be integers). fp16 activations only (the half2
products); bf16 and 3/8 bits use the stored-layout gemv.

Without inline PTX (Triton's CPU interpreter) the same index arithmetic runs in fp32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from casp.kernels import uniform_config as cfgs
from casp.kernels.slab_layout import KMajorWeight, cached_kmajor, n_slabs, slab_words
from casp.kernels.triton_slab import _hadd2, _half_mac, _half_sum, _split_pair
from casp.kernels.triton_uniform import _interpreting, _split_plan, _store_row
from casp.kernels.uniform_config import KernelConfig

KMAJOR_BITS = (2, 4)


@triton.jit
def _x_pairs(x_base, p0, rc, KH, EVEN: tl.constexpr):
    """Activation pairs (int32) p0 + rc after the scalar pointer x_base (zeros past pair KH of the row)."""
    xp = x_base + p0  # scalar: the per-element offsets rc are constants, so the loads take immediate offsets
    if EVEN:
        x2 = tl.load(xp + rc)
    else:
        x2 = tl.load(xp + rc, mask=p0 + rc < KH, other=0)
    return x2


@triton.jit
def _fp32_words(
    w, x_base, p0, rc, KH, BITS: tl.constexpr, WPG: tl.constexpr, PRE: tl.constexpr, EVEN: tl.constexpr
):  # fmt: skip
    """(sum_k q_k x_k 2^-PRE per row [BN], sum_k x_k) of the words w [BC, BN] in fp32: the interpreter's decode."""
    d = tl.zeros(w.shape, dtype=tl.float32)
    xs = tl.zeros(rc.shape, dtype=tl.float32)
    for J in tl.static_range(16 // BITS):
        x_lo, x_hi = _split_pair(_x_pairs(x_base, p0 + J * WPG, rc, KH, EVEN), False)
        xs += x_lo + x_hi
        q_lo = ((w >> (J * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        q_hi = ((w >> (16 + J * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        d += q_lo * (x_lo * (1.0 / (1 << PRE)))[:, None]
        d += q_hi * (x_hi * (1.0 / (1 << PRE)))[:, None]
    return tl.sum(d, axis=0), tl.sum(xs, axis=0)


@triton.jit
def _kmajor_step(
    acc, wa, wb, kw0, x_row, sz_ptr, rn, nmask, rc, N, KH, GROUP,
    BITS: tl.constexpr, WPG: tl.constexpr, PRE: tl.constexpr, TWO: tl.constexpr, ASM: tl.constexpr,
    EVEN: tl.constexpr,
):  # fmt: skip
    """acc [BN] + the products of one step: the words wa [BC, BN] at K-words kw0 .. kw0 + BC - 1 and, if TWO,
    wb at the next BC K-words (one slab in all). TWO: both word tiles feed one half2 sum per lane (4-bit:
    8 products per lane, as one 2-bit word), halving the conversions to fp32."""
    HP: tl.constexpr = 16 // BITS  # fields (column pairs) per word
    SP: tl.constexpr = HP * WPG  # column pairs per slab
    BC: tl.constexpr = wa.shape[0]
    t = kw0 // WPG
    pa = t * SP + (kw0 - t * WPG)  # pair of field 0 of the first word of wa (scalar: loads use fixed offsets)
    pb = pa + BC
    g = (t * 2 * SP) // GROUP
    if EVEN:
        sz = tl.load(sz_ptr + g * N + rn)
    else:
        sz = tl.load(sz_ptr + g * N + rn, mask=nmask, other=0)
    s, z = _split_pair(sz, False)  # [BN] fp32 scale * 2^PRE, zero * 2^-PRE
    if ASM:
        d2 = tl.zeros(wa.shape, dtype=tl.int32)  # half2 (0, 0)
        for J in tl.static_range(HP):
            xa = _x_pairs(x_row, pa + J * WPG, rc, KH, EVEN)
            if J == 0:
                xs2 = xa  # (not a zeros tensor: that would get a layout of its own and a second load of x)
            else:
                xs2 = _hadd2(xs2, xa)
            d2 = _half_mac(wa, tl.broadcast_to(xa[:, None], wa.shape), d2, J, BITS, PRE)
            if TWO:
                xb = _x_pairs(x_row, pb + J * WPG, rc, KH, EVEN)
                xs2 = _hadd2(xs2, xb)
                d2 = _half_mac(wb, tl.broadcast_to(xb[:, None], wb.shape), d2, J, BITS, PRE)
        d = tl.sum(_half_sum(d2), axis=0)  # [BN]; in-thread when the warps lie side by side along the rows
        xs = tl.sum(_half_sum(xs2), axis=0)
    else:
        d, xs = _fp32_words(wa, x_row, pa, rc, KH, BITS, WPG, PRE, EVEN)
        if TWO:
            db, xsb = _fp32_words(wb, x_row, pb, rc, KH, BITS, WPG, PRE, EVEN)
            d += db
            xs += xsb
    return acc + s * (d - z * xs)


@triton.jit
def _load_words(w_ptrs, kw0, N, nmask, BC: tl.constexpr, TWO: tl.constexpr, EVEN: tl.constexpr):
    """Word tiles [BC, BN] at K-words kw0 and (if TWO) kw0 + BC; without TWO the second is the first."""
    if EVEN:
        wa = tl.load(w_ptrs + kw0 * N)
    else:
        wa = tl.load(w_ptrs + kw0 * N, mask=nmask[None, :], other=0)
    wb = wa
    if TWO:
        if EVEN:
            wb = tl.load(w_ptrs + (kw0 + BC) * N)
        else:
            wb = tl.load(w_ptrs + (kw0 + BC) * N, mask=nmask[None, :], other=0)
    return wa, wb


@triton.jit
def _prefetch_l2(ptrs, ok, NBYTES: tl.constexpr):
    """Ask the L2 for NBYTES (a multiple of 16) at each 16-byte-aligned pointer of ``ptrs`` where ``ok``.

    One bulk prefetch instruction per pointer (sm_90): the bytes stream in while the thread goes on, holding no
    registers and no shared memory, so a program can put its whole K range in flight at once.
    """
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; } // $0",
        "=r,l,r,r",
        [ptrs, ok.to(tl.int32), tl.full(ptrs.shape, NBYTES, tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _kmajor_gemv_kernel(
    x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, KH, KW, words_per_split, GROUP, stride_xm, stride_ym,
    BITS: tl.constexpr, WPG: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, PRE: tl.constexpr,
    TWO: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    STAGES: tl.constexpr, PREFETCH: tl.constexpr = False, PDL: tl.constexpr = 0, PF: tl.constexpr = 1,
):  # fmt: skip
    """y[m, rn] = x[m] . W[rn]^T; row block program_id(0), K split program_id(1), activation row program_id(2).

    x_ptr: activations as int32 column pairs [M, KH]; w_ptr: K-major words [KW, N]; sz_ptr: half2
    (scale, zero) [G, N]. BK words per row per step, as one tile or (TWO) two of BK / 2. EVEN: N % BN == 0
    and K fills its last slab (no masks). STAGES <= 2: the next step's words are prefetched by hand;
    STAGES >= 3: Triton's pipeliner keeps STAGES - 1 steps in flight.

    sm_90 only (the host turns them off elsewhere): PREFETCH (with EVEN) first asks the L2 for the program's
    whole K range of words and its scale rows (PF: a power of two >= the K-words per program). PDL: launched
    with programmatic dependent launch, the program may start while the previous kernel on the stream still
    runs; it prefetches (weights are never written by a kernel) and then waits for that kernel before it reads
    x or writes anything. PDL 1 lets the next kernel launch once every program has started, 2 once every
    program has finished its loop.
    """
    BC: tl.constexpr = BK // 2 if TWO else BK
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rc = tl.arange(0, BC)
    kw_lo = pid_s * words_per_split
    kw_hi = tl.minimum(kw_lo + words_per_split, KW)
    # [BC, BN] with the rows contiguous: Triton gives each thread 16 bytes = 4 rows of one K-word, the 32
    # threads of a warp 128 consecutive rows, and the warps further rows (for BN >= 128 * num_warps)
    w_ptrs = w_ptr + rc[:, None].to(tl.int64) * N + rn[None, :]
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH and EVEN:
        S: tl.constexpr = (32 // BITS) * WPG  # codes per slab
        kw = kw_lo + tl.arange(0, PF)
        _prefetch_l2(w_ptr + kw.to(tl.int64) * N + pid_n * BN, kw < kw_hi, BN * 4)
        g_lo = (kw_lo // WPG) * S // GROUP
        g_hi = ((kw_hi - 1) // WPG) * S // GROUP
        g = g_lo + tl.arange(0, PF)
        _prefetch_l2(sz_ptr + g.to(tl.int64) * N + pid_n * BN, g <= g_hi, BN * 4)
    if PDL > 0:
        # x comes from the previous kernel, whose split-K workspace and counters may still be in use
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BN], dtype=tl.float32)
    if STAGES >= 3:
        for kw0 in tl.range(kw_lo, kw_hi, BK, num_stages=STAGES):
            wa, wb = _load_words(w_ptrs, kw0, N, nmask, BC, TWO, EVEN)
            acc = _kmajor_step(acc, wa, wb, kw0, x_row, sz_ptr, rn, nmask, rc, N, KH, GROUP,
                               BITS, WPG, PRE, TWO, ASM, EVEN)  # fmt: skip
    else:
        wa_n, wb_n = _load_words(w_ptrs, kw_lo, N, nmask, BC, TWO, EVEN)
        for kw0 in range(kw_lo, kw_hi, BK):
            wa, wb = wa_n, wb_n
            # the next step's words are in flight while this one is decoded (the last load repeats in range)
            wa_n, wb_n = _load_words(w_ptrs, tl.minimum(kw0 + BK, kw_hi - BK), N, nmask, BC, TWO, EVEN)
            acc = _kmajor_step(acc, wa, wb, kw0, x_row, sz_ptr, rn, nmask, rc, N, KH, GROUP,
                               BITS, WPG, PRE, TWO, ASM, EVEN)  # fmt: skip
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    y = acc
    _store_row(y, y_ptr, b_ptr, ws_ptr, cnt_ptr, m, rn, nmask, pid_n, pid_s, M, N, stride_ym, HAS_BIAS, SPLIT)


def kmajor_supported(bits: int, group_size: int, K: int) -> bool:
    """True if the K-major kernel applies: 2 or 4 bits and a group size that is a multiple of the codes per word."""
    return bits in KMAJOR_BITS and slab_words(bits, group_size, K) is not None


def step_words(cfg: KernelConfig, bits: int, wpg: int) -> int:
    """Words per row per loop step: cfg.bk codes, at least one word, at most one slab."""
    return max(1, min(wpg, cfg.bk // (32 // bits)))


def kmajor_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    cfg: KernelConfig | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T on the K-major layout (repacked once per qweight tensor, then cached on it).

    ``cfg.bk`` is the codes per row per loop step (rounded to whole words, at most one slab).
    """
    K = x.shape[1]
    wpg = slab_words(bits, group_size, K)
    if bits not in KMAJOR_BITS or wpg is None or x.dtype != torch.float16:
        raise ValueError(f"the K-major kernel needs fp16 activations, 2 or 4 bits and a group size that is a "
                         f"multiple of the codes per word; got {x.dtype}, {bits} bits, group {group_size}: "
                         f"use path 'gemv'")  # fmt: skip
    return kmajor_gemv_packed(x, cached_kmajor(qweight, scales, zeros, bits, group_size, K), bias, cfg)


def kmajor_gemv_packed(
    x: torch.Tensor, kw: KMajorWeight, bias: torch.Tensor | None = None, cfg: KernelConfig | None = None
) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T for fp16 x (already in stored column order) and a K-major weight."""
    M, K = x.shape
    N, bits, wpg = kw.out_features, kw.bits, kw.wpg
    if x.dtype != torch.float16:
        raise ValueError(f"the K-major GEMV multiplies half2 pairs: it needs fp16 activations, got {x.dtype}")
    cfg = cfg or cfgs.pick_config("kmajor", bits, N, K, M, kw.group_size)
    bk = step_words(cfg, bits, wpg)
    S = wpg * 32 // bits
    T = n_slabs(K, bits, wpg)
    xp = column_pairs(x)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    nb = triton.cdiv(N, cfg.bn)
    KW = T * wpg
    per, split, ws, cnt = _split_plan(KW, bk, cfg.split, nb * M, M, N, x.device)
    even = N % cfg.bn == 0 and K == T * S
    # bulk prefetch and grid dependency control are sm_90 instructions (asked only when an option is on: hot path)
    hopper = (cfg.prefetch or cfg.pdl > 0) and _sm90(x.device)
    launch = {"launch_pdl": True} if hopper and cfg.pdl else {}
    _kmajor_gemv_kernel[(nb, split, M)](
        xp, kw.words, kw.sz, bias if bias is not None else y, y, ws if ws is not None else y,
        cnt if cnt is not None else kw.words,
        M, N, xp.shape[1], KW, per, kw.group_size, xp.stride(0), y.stride(0),
        BITS=bits, WPG=wpg, BK=bk, BN=cfg.bn, PRE=kw.pre, TWO=bits == 4 and bk > 1, ASM=not _interpreting(),
        EVEN=even, HAS_BIAS=bias is not None,
        SPLIT=split, STAGES=cfg.num_stages, PREFETCH=hopper and cfg.prefetch, PDL=cfg.pdl if hopper else 0,
        PF=triton.next_power_of_2(per), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch,
    )  # fmt: skip
    return y


def column_pairs(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (16-bit) as int32 column pairs [M, ceil(K / 2)], an odd K padded with a zero column."""
    xp = x if x.shape[1] % 2 == 0 else F.pad(x, (0, 1))
    xp = xp.contiguous()
    if xp.storage_offset() % 2:
        xp = xp.clone()  # a 32-bit view needs 4-byte alignment
    return xp.view(torch.int32)


def _sm90(device: torch.device) -> bool:
    """True on a CUDA device of compute capability 9.0 or later, outside Triton's interpreter."""
    return device.type == "cuda" and not _interpreting() and _major_capability(device.index) >= 9


@functools.cache
def _major_capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]
