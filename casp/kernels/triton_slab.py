"""Batch-1 GEMV on the slab layout (casp/kernels/slab_layout.py): no interleaving, shifts and masks only.

Per program: BN output rows, a K range of whole slabs (split-K over programs, reduced in-kernel as in
triton_uniform), SL slabs per loop step, so the word tile is [SL, BN, WPG] (SL * WPG contiguous words
per row). The activations are read as 32-bit column pairs (x[2p], x[2p+1]); field J of a word's two
halves holds the codes of one such pair, and field J of a slab's WPG words covers WPG consecutive pairs,
so every load of x is a plain contiguous slice. Per (row, slab), with scale s and zero z of its group:

    sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k)

The inner sums are kept per word lane d[n, sl, v] and folded into the fp32 accumulator once per slab
(two FFMA per word); the row sum happens once at the end.

Two decodes (``HALF``):

* fp32 (``HALF=False``, path "slab"): ``(w & (mask << sh)) | 0x4B000000`` read as fp32 is 2^23 + q 2^sh,
  one FFMA gives q, one FFMA accumulates q x: 3 instructions per weight (the stored-layout gemv: ~4.5
  plus the interleave tree). fp16 or bf16 activations.
* half2 (``HALF=True``, path "slab16", fp16 activations): one LOP3 puts the two codes of field J into a
  half2 (1024 + q 2^sh, 1024 + q' 2^sh), one HFMA2 gives (q, q'), one HFMA2 accumulates
  (q x[2p], q' x[2p+1]) with the pair loaded as is: 1.5 instructions per weight. A half2 lane sum holds
  at most cpw/2 products (8 at 2 bits, 4 at 4 bits) before it goes to fp32, which bounds the fp16
  rounding (relative ~1e-3 of a lane sum), but it overflows fp16 when cpw/2 * (2^b - 1) * |x| > 65504,
  i.e. |x| > 2730 at 2 bits, 1092 at 4 bits, 257 at 8 bits: use the fp32 decode for models whose
  activations reach that.

Without inline PTX (Triton's CPU interpreter) both decodes run the same index arithmetic in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from casp.kernels import uniform_config as cfgs
from casp.kernels.slab_layout import cached_slabs, n_slabs, slab_words
from casp.kernels.triton_uniform import _code, _interpreting, _split_plan, _store_row
from casp.kernels.uniform_config import KernelConfig


@triton.jit
def _half_mac(w, x2, d, J: tl.constexpr, BITS: tl.constexpr, PRE: tl.constexpr = 0):
    """d + (q_J x_J, q_J' x_J') 2^-PRE as half2 (int32 bits), q_J, q_J' = codes J and J + 16/BITS of each word w.

    Same constants as triton_uniform._pair: codes far up a half are read from w >> 8 so that
    q 2^sh < 1024 (the fp16 1024 + q 2^sh is then exact). PRE scales the decoded codes by an exact
    power of two (free: it is folded into the decode constants), which keeps half2 sums further from
    fp16 overflow.
    """
    S: tl.constexpr = J * BITS
    FAR: tl.constexpr = ((1 << BITS) - 1) * (1 << S) >= 1024
    SH: tl.constexpr = S - 8 * FAR
    MASK: tl.constexpr = (((1 << BITS) - 1) << SH) * 65537
    SCALE: tl.constexpr = ((15 - SH - PRE) << 10) * 65537  # half2(2^-(sh+pre), ...)
    OFF: tl.constexpr = (0x8000 | ((25 - SH - PRE) << 10)) * 65537  # half2(-2^(10-sh-pre), ...)
    src = w
    if FAR:
        src = w >> 8  # arithmetic shift: the mask keeps bits below 24 only
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; lop3.b32 t, $1, $4, $5, 0xEA; fma.rn.f16x2 t, t, $6, $7; fma.rn.f16x2 $0, t, $2, $3; }",
        "=r,r,r,r,r,r,r,r",
        [
            src,
            x2,
            d,
            tl.full(w.shape, MASK, tl.uint32),
            tl.full(w.shape, 0x64006400, tl.uint32),
            tl.full(w.shape, SCALE, tl.uint32),
            tl.full(w.shape, OFF, tl.uint32),
        ],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _pack2(lo, hi):
    """int32 holding half2 (lo, hi) of two fp16 tiles."""
    return tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [lo, hi], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _half_sum(d):
    """fp32 lo + hi of a half2 tile (int32 bits)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 a, b; .reg .f32 fa, fb; mov.b32 {a, b}, $1; cvt.f32.f16 fa, a; cvt.f32.f16 fb, b; "
        "add.f32 $0, fa, fb; }",
        "=f,r",
        [d],
        dtype=tl.float32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _hadd2(a, b):
    """a + b of half2 tiles (int32 bits)."""
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _split_pair(x2, XBF16: tl.constexpr):
    """fp32 (x[2p], x[2p+1]) of a tile of 32-bit activation pairs (fp16 or bf16 halves)."""
    if XBF16:
        lo = (x2 << 16).to(tl.float32, bitcast=True)
        hi = (x2 & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (x2 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (x2 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _load_slabs(w_ptrs, t0, t_hi, nmask, rsl, WPG: tl.constexpr, EVEN: tl.constexpr):
    """Word tile [SL, BN, WPG] of slabs t0 .. t0 + SL - 1 (zeros past t_hi or past the rows)."""
    if EVEN:
        w = tl.load(w_ptrs + t0 * WPG)
    else:
        w = tl.load(w_ptrs + t0 * WPG, mask=nmask[None, :, None] & (t0 + rsl < t_hi)[:, None, None], other=0)
    return w


@triton.jit
def _slab_step(
    acc, w, t0, t_hi, x_ptrs, s_ptr, z_ptr, s_rows, nmask, rsl, rv, G, GROUP, KH,
    BITS: tl.constexpr, WPG: tl.constexpr, SL: tl.constexpr, BN: tl.constexpr,
    HALF: tl.constexpr, ASM: tl.constexpr, XBF16: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    """acc [SL, BN, WPG] + the products of one loop step's words w (slabs t0 .. t0 + SL - 1)."""
    HP: tl.constexpr = 16 // BITS  # fields per 16-bit half
    SP: tl.constexpr = HP * WPG  # column pairs per slab
    S: tl.constexpr = 2 * SP  # codes per slab
    slab = t0 + rsl  # [SL]
    g = slab * S // GROUP
    if EVEN:
        sc = tl.load(s_ptr + s_rows + g[:, None]).to(tl.float32)  # [SL, BN]
        zc = tl.load(z_ptr + s_rows + g[:, None]).to(tl.float32)
    else:
        gmask = nmask[None, :] & ((slab < t_hi) & (g < G))[:, None]
        sc = tl.load(s_ptr + s_rows + g[:, None], mask=gmask, other=0.0).to(tl.float32)
        zc = tl.load(z_ptr + s_rows + g[:, None], mask=gmask, other=0.0).to(tl.float32)
    xp = x_ptrs + t0 * SP
    pair0 = slab[:, None] * SP + rv[None, :]  # [SL, WPG]: pair index of field 0
    if HALF and ASM:
        d2 = tl.zeros([SL, BN, WPG], dtype=tl.int32)  # half2 (0, 0)
        xs2 = tl.zeros([SL, WPG], dtype=tl.int32)
        for J in tl.static_range(HP):
            if EVEN:
                x2 = tl.load(xp + J * WPG)
            else:
                x2 = tl.load(xp + J * WPG, mask=pair0 + J * WPG < KH, other=0)
            xs2 = _hadd2(xs2, x2)
            d2 = _half_mac(w, tl.broadcast_to(x2[:, None, :], [SL, BN, WPG]), d2, J, BITS, 0)
        d = _half_sum(d2)
        xsum = _half_sum(xs2)
    else:
        d = tl.zeros([SL, BN, WPG], dtype=tl.float32)
        xsum = tl.zeros([SL, WPG], dtype=tl.float32)
        for J in tl.static_range(HP):
            if EVEN:
                x2 = tl.load(xp + J * WPG)
            else:
                x2 = tl.load(xp + J * WPG, mask=pair0 + J * WPG < KH, other=0)
            x_lo, x_hi = _split_pair(x2, XBF16)
            xsum += x_lo + x_hi
            if HALF:
                # the half2 path's shifts and masks, in fp32 (interpreter)
                SJ: tl.constexpr = J * BITS
                FAR: tl.constexpr = ((1 << BITS) - 1) * (1 << SJ) >= 1024
                SH: tl.constexpr = SJ - 8 * FAR
                src = w
                if FAR:
                    src = w >> 8
                q_lo = ((src >> SH) & ((1 << BITS) - 1)).to(tl.float32)
                q_hi = ((src >> (16 + SH)) & ((1 << BITS) - 1)).to(tl.float32)
            else:
                q_lo = _code(w, w, w, J, BITS, ASM)
                q_hi = _code(w, w, w, J + HP, BITS, ASM)
            d += q_lo * x_lo[:, None, :]  # two separate FFMA chains (a sum of products first costs FMUL + FADD)
            d += q_hi * x_hi[:, None, :]
    return acc + sc[:, :, None] * (d - zc[:, :, None] * xsum[:, None, :])


@triton.jit
def _slab_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, KH, n_slab, slabs_per_split, G, GROUP, stride_xm, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr, WPG: tl.constexpr, SL: tl.constexpr, BN: tl.constexpr,
    HALF: tl.constexpr, ASM: tl.constexpr, XBF16: tl.constexpr, EVEN: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """y[m, rn] = x[m] . W[rn]^T for activation row m = program_id(1), K split over program_id(2).

    x_ptr: the activations as int32 column pairs [M, KH]; EVEN: N % BN == 0 and every loop step holds
    whole in-range slabs (no masks). STAGES <= 2: the next step's words are prefetched by hand (one tile
    ahead); STAGES >= 3: Triton's software pipeliner keeps STAGES - 1 steps in flight.
    """
    HP: tl.constexpr = 16 // BITS  # fields per 16-bit half
    SP: tl.constexpr = HP * WPG  # column pairs per slab
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rsl = tl.arange(0, SL)
    rv = tl.arange(0, WPG)
    t_lo = pid_s * slabs_per_split
    t_hi = tl.minimum(t_lo + slabs_per_split, n_slab)
    # Tiles are [SL, BN, WPG] (slab, row, word): with the slab axis ahead of the row axis, Triton gives each
    # thread 4 consecutive words (one 16-byte load) of one slab in several rows, so each activation pair it
    # loads and sums serves several rows.
    w_ptrs = qw_ptr + rn[None, :, None].to(tl.int64) * stride_qn + (rsl[:, None, None] * WPG + rv[None, None, :])
    x_ptrs = x_ptr + m.to(tl.int64) * stride_xm + (rsl[:, None] * SP + rv[None, :])  # [SL, WPG], field 0 of slab 0
    s_rows = rn[None, :].to(tl.int64) * stride_sn  # [1, BN]
    acc = tl.zeros([SL, BN, WPG], dtype=tl.float32)
    if STAGES >= 3:
        for t0 in tl.range(t_lo, t_hi, SL, num_stages=STAGES):
            w = _load_slabs(w_ptrs, t0, t_hi, nmask, rsl, WPG, EVEN)
            acc = _slab_step(acc, w, t0, t_hi, x_ptrs, s_ptr, z_ptr, s_rows, nmask, rsl, rv, G, GROUP, KH,
                             BITS, WPG, SL, BN, HALF, ASM, XBF16, EVEN)  # fmt: skip
    else:
        # software prefetch: the next step's words are in flight while this one is decoded
        wn = _load_slabs(w_ptrs, t_lo, t_hi, nmask, rsl, WPG, EVEN)
        for t0 in range(t_lo, t_hi, SL):
            w = wn
            if EVEN:
                wn = _load_slabs(w_ptrs, tl.minimum(t0 + SL, t_hi - SL), t_hi, nmask, rsl, WPG, EVEN)  # stays valid
            else:
                wn = _load_slabs(w_ptrs, t0 + SL, t_hi, nmask, rsl, WPG, EVEN)
            acc = _slab_step(acc, w, t0, t_hi, x_ptrs, s_ptr, z_ptr, s_rows, nmask, rsl, rv, G, GROUP, KH,
                             BITS, WPG, SL, BN, HALF, ASM, XBF16, EVEN)  # fmt: skip
    y = tl.sum(tl.sum(acc, axis=2), axis=0)  # [BN]
    _store_row(y, y_ptr, b_ptr, ws_ptr, cnt_ptr, m, rn, nmask, pid_n, pid_s, M, N, stride_ym, HAS_BIAS, SPLIT)


def slab_supported(bits: int, group_size: int, K: int) -> bool:
    """True if the slab layout applies (b in {2, 4, 8}, group size a multiple of the codes per word)."""
    return slab_words(bits, group_size, K) is not None


def slab_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    cfg: KernelConfig | None = None,
    half: bool = True,
) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T on the slab layout (repacked once per qweight tensor, then cached on it).

    ``half`` selects the half2 decode (fp16 x only; bf16 x always uses the fp32 decode).
    ``cfg.bk`` is the codes per loop step (a multiple of the slab size; smaller values are rounded up).
    """
    M, K = x.shape
    N, n_groups = scales.shape
    wpg = slab_words(bits, group_size, K)
    if wpg is None:
        raise ValueError(f"the slab kernel needs 2, 4 or 8 bits and a group size that is a multiple of "
                         f"{32 // bits if bits in (2, 4, 8) else 'the codes per word'}; got {bits} bits, group "
                         f"{group_size}: use path 'gemv'")  # fmt: skip
    cfg = cfg or cfgs.pick_config("slab16" if half else "slab", bits, N, K, M, group_size)
    words = cached_slabs(qweight, bits, K, wpg)
    S = wpg * 32 // bits
    sl = max(1, cfg.bk // S)
    T = n_slabs(K, bits, wpg)
    xp = x if K % 2 == 0 else F.pad(x, (0, 1))  # whole column pairs
    xp = xp.contiguous()
    if xp.storage_offset() % 2:
        xp = xp.clone()  # a 32-bit view needs 4-byte alignment
    xp = xp.view(torch.int32)  # [M, ceil(K/2)] pairs of fp16/bf16
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    nb = triton.cdiv(N, cfg.bn)
    per, split, ws, cnt = _split_plan(T, sl, cfg.split, nb * M, M, N, x.device)
    even = N % cfg.bn == 0 and T % sl == 0 and K == T * S
    _slab_gemv_kernel[(nb, M, split)](
        xp, words, scales, zeros, bias if bias is not None else y, y, ws if ws is not None else y,
        cnt if cnt is not None else words,
        M, N, xp.shape[1], T, per, n_groups, group_size, xp.stride(0), words.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, WPG=wpg, SL=sl, BN=cfg.bn, HALF=half and x.dtype == torch.float16, ASM=not _interpreting(),
        XBF16=x.dtype == torch.bfloat16, EVEN=even, HAS_BIAS=bias is not None, SPLIT=split,
        STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y
