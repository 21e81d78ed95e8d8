"""Triton decode attention (one query token, GQA) that reads AKVQ-VL's packed KV store directly.

What one call computes. A *store* is one precision class of a layer's quantized tokens (casp.kv.cache,
AKVQLayer): packed rows ``codes`` uint8 [N, Hkv, NG, GROUP * BITS / 8] with fp16 ``scale``/``zero``
[N, Hkv, NG] (casp.kv.quantizer.PackedKV; NG groups of GROUP channels, D = NG * GROUP), and an index
``idx`` int32 [B, L]: the store row of the j-th token of batch row b, or -1 for a slot to skip
(padding, pivot tokens held in fp16 elsewhere, masked positions). For every (batch row b, query head h)
the kernel returns the flash-decoding partial triple over the store's tokens, per split of ``idx``:

    m = max_j s_j,  l = sum_j exp(s_j - m),  acc = sum_j exp(s_j - m) v_j,   s_j = sm_scale * q_h . k_j

where k_j = (c_j - z_j) s_j is dequantized in registers (c: codes, s/z: the group's scale/zero) and
never written to memory. The caller (casp.kv.attention) merges the triples of all splits, all stores
and the fp16 parts (recent window, kept pivot tokens) with one log-sum-exp merge (on CUDA together with
the window, casp.kernels.triton_kv_merge), so one kernel handles any mix of classes (TSA: text 4-bit +
image 2-bit; PSA: one 2-bit store + fp16 pivots).

Two kernels compute it:
* ``_packed_decode_kernel`` (CUDA cores, the default with one query head per KV head): one program per
  (b, query head, split), 2-D grid [B * Hq, splits], one warp on 16-token tiles, so every reduction (over
  channels for the scores, over tokens for p.v) stays inside the warp: no shared memory, many small
  programs in flight. 1.15-2.0x faster than 4 warps on 64-token tiles at batch 16-64 on an H100 (1.8-2.0x
  at batch 64 x 4096 tokens; slightly slower at batch 1).
* ``_packed_decode_tc_kernel`` (tensor cores, the default under grouped-query attention): one program per
  (b, KV head, split) serves the KV head's query heads as the rows of an MMA, so the codes are read once
  per KV head (docstring there).
Splits over ``idx`` give parallelism at small batch (flash-decoding); at large batch one split.

Design choices of the CUDA-core kernel:
* Unpacking: a token's packed head is read as D * BITS / 32 int32 words (16-byte vector loads, the
  store's uint8 codes viewed as words: code p of a word is channel 32 / BITS * word + p) and decoded in
  registers by casp.kernels.triton_uniform's ``_decode`` (one LOP3 + one FFMA per code, per-position
  tiles interleaved back into channel order). The first version loaded one byte per channel (four
  channels per address) and was bound by load instructions at 100-200 GB/s on an H100
  (benchmarks/results/kv_attention_h100.txt).
* Latency: the next tile's index, words, scales and zeros are loaded before the current tile is
  used (one tile of software prefetch), so a program always has a tile's reads in flight.
* One group per head (NG == 1, LLaVA: D = GROUP = 128): scale and zero are per (token, head) scalars
  and are factored out, s (sum_c q_c c_c - z sum_c q_c) for scores and sum_j (p_j s_j) c_j -
  sum_j p_j s_j z_j for values, so the inner loop is one multiply-add per code. Several groups:
  scale/zero are gathered per channel and applied per code.
* Keys are stored in the rotated (Walsh-Hadamard) basis: the caller passes q H, not q; values are
  consumed as stored (the caller rotates acc back when the cache rotated them online).
* Masked/empty tiles: scores of skipped slots are -inf; a split with no valid token returns m = -inf,
  l = 0, acc = 0, which the merge weights by exp(-inf) = 0.
Only bits 2 and 4 run here (AKVQ-VL's widths); casp.kv.attention uses its torch reference for 8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from casp.kernels.triton_uniform import _codes_fp16, _decode, _interpreting

KERNEL_BITS = (2, 4)
# Tokens per tile and warps per program: one warp on 16-token tiles was the fastest CUDA-core variant on an H100
# at batch >= 16 (1.15-2.0x faster than 64 x 4: every reduction stays inside the warp, no shared memory, and
# many small programs keep loads in flight; benchmarks/results/kv_attention_quick_h100_variants.log, all variants
# in one run); 130-168 registers.
BLOCK_N = 16
NUM_WARPS = 1
# The tensor-core kernel's tokens per tile (4 warps) at 4 query heads per KV head (batch 16 x 2048 tokens): 32 and
# 128 traded places between H100 runs (91.5 vs 111 us in kv_attention_quick_h100_variants.log, 61 vs 52 us in
# kv_attention_h100.txt); 32 is kept.
TC_BLOCK_N = 32
TC_NUM_WARPS = 4
# Aim for about this many programs per call before splitting the sequence (132 SMs x several waves).
_TARGET_PROGRAMS = 1024


@triton.jit
def _tile_words(ib, KC, VC, hk, n0, start, L, tokens_per_split, stride_kc_n, stride_kc_h, stride_vc_n, stride_vc_h,
                DW: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Tokens [start + n0, +BLOCK) of a split: valid [BLOCK] (an index >= 0 inside the split), their store rows
    (int64, 0 where invalid) and their key/value words [BLOCK, DW] (0 where invalid)."""
    offs_n = start + n0 + tl.arange(0, BLOCK)
    in_range = (offs_n < L) & (offs_n < start + tokens_per_split)
    rows = tl.load(ib + offs_n, mask=in_range, other=-1)
    valid = rows >= 0
    rows64 = tl.where(valid, rows, 0).to(tl.int64)
    offs_w = tl.arange(0, DW)
    kw = tl.load(KC + rows64[:, None] * stride_kc_n + hk * stride_kc_h + offs_w[None, :], mask=valid[:, None], other=0)
    vw = tl.load(VC + rows64[:, None] * stride_vc_n + hk * stride_vc_h + offs_w[None, :], mask=valid[:, None], other=0)
    return valid, rows64, kw, vw


@triton.jit
def _load_tile(ib, KC, KS, KZ, VC, VS, VZ, hk, n0, start, L, tokens_per_split,
               stride_kc_n, stride_kc_h, stride_ks_n, stride_ks_h, stride_vc_n, stride_vc_h, stride_vs_n, stride_vs_h,
               DW: tl.constexpr, NG: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One tile's reads: valid mask [BLOCK], key/value words [BLOCK, DW], scales/zeros [BLOCK, NG] (fp16)."""
    valid, rows64, kw, vw = _tile_words(ib, KC, VC, hk, n0, start, L, tokens_per_split, stride_kc_n, stride_kc_h,
                                        stride_vc_n, stride_vc_h, DW, BLOCK)  # fmt: skip
    offs_g = tl.arange(0, NG)
    kso = rows64[:, None] * stride_ks_n + hk * stride_ks_h + offs_g[None, :]
    vso = rows64[:, None] * stride_vs_n + hk * stride_vs_h + offs_g[None, :]
    ks = tl.load(KS + kso, mask=valid[:, None], other=0.0)
    kz = tl.load(KZ + kso, mask=valid[:, None], other=0.0)
    vs = tl.load(VS + vso, mask=valid[:, None], other=0.0)
    vz = tl.load(VZ + vso, mask=valid[:, None], other=0.0)
    return valid, kw, vw, ks, kz, vs, vz


@triton.jit
def _per_channel(t, NG: tl.constexpr, GC: tl.constexpr, BLOCK: tl.constexpr):
    """[BLOCK, NG] group values -> [BLOCK, NG * GC] (each repeated over its group's GC channels), fp32."""
    return tl.reshape(tl.broadcast_to(t.to(tl.float32)[:, :, None], [BLOCK, NG, GC]), [BLOCK, NG * GC])


@triton.jit
def _packed_decode_kernel(
    Q,  # [B, Hq, D] float, already scaled by nothing (sm_scale applied here)
    KC,
    KS,
    KZ,  # key codes as int32 words [N, Hkv, DW], scale/zero [N, Hkv, NG] fp16
    VC,
    VS,
    VZ,  # value codes, scale, zero: same layout
    IDX,  # [B, L] int32 store rows, -1 = skip
    M_OUT,
    L_OUT,  # [B, Hq, SPLITS] fp32
    ACC_OUT,  # [B, Hq, SPLITS, D] fp32
    sm_scale,
    L,
    tokens_per_split,
    num_q_heads,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kc_n,
    stride_kc_h,
    stride_ks_n,
    stride_ks_h,
    stride_vc_n,
    stride_vc_h,
    stride_vs_n,
    stride_vs_h,
    stride_ib,
    GQA: tl.constexpr,
    BITS: tl.constexpr,
    DW: tl.constexpr,  # words per head: D * BITS / 32 (a power of two)
    NG: tl.constexpr,  # quantization groups per head
    BLOCK: tl.constexpr,
    ASM: tl.constexpr,  # inline PTX in the decode (not under Triton's CPU interpreter)
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    hk = h // GQA

    D: tl.constexpr = DW * (32 // BITS)
    GC: tl.constexpr = D // NG  # channels per group
    offs_d = tl.arange(0, D)  # channel
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d).to(tl.float32) * sm_scale  # [D]
    q_sum = tl.sum(q, axis=0)

    m_i = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    acc = tl.zeros([D], tl.float32)

    ib = IDX + b * stride_ib
    start = pid_s * tokens_per_split
    # software prefetch: tile n0 + BLOCK is read while tile n0 is computed
    valid_n, kw_n, vw_n, ks_n, kz_n, vs_n, vz_n = _load_tile(
        ib, KC, KS, KZ, VC, VS, VZ, hk, 0, start, L, tokens_per_split, stride_kc_n, stride_kc_h, stride_ks_n,
        stride_ks_h, stride_vc_n, stride_vc_h, stride_vs_n, stride_vs_h, DW, NG, BLOCK)  # fmt: skip
    for n0 in range(0, tokens_per_split, BLOCK):  # a bound that is a plain argument: one loop shape
        valid, kw, vw, ks, kz, vs, vz = valid_n, kw_n, vw_n, ks_n, kz_n, vs_n, vz_n
        valid_n, kw_n, vw_n, ks_n, kz_n, vs_n, vz_n = _load_tile(
            ib, KC, KS, KZ, VC, VS, VZ, hk, n0 + BLOCK, start, L, tokens_per_split, stride_kc_n, stride_kc_h,
            stride_ks_n, stride_ks_h, stride_vc_n, stride_vc_h, stride_vs_n, stride_vs_h, DW, NG, BLOCK)  # fmt: skip
        kc = _decode(kw, kw, kw, BITS, ASM)  # [BLOCK, D] fp32 codes, channel order
        if NG == 1:
            s = tl.sum(ks, axis=1).to(tl.float32) * (
                tl.sum(kc * q[None, :], axis=1) - tl.sum(kz, axis=1).to(tl.float32) * q_sum
            )
        else:
            s = tl.sum((kc - _per_channel(kz, NG, GC, BLOCK)) * _per_channel(ks, NG, GC, BLOCK) * q[None, :], axis=1)
        s = tl.where(valid, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid token yet: keep exp() finite
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref)  # 0 for skipped slots

        vc = _decode(vw, vw, vw, BITS, ASM)
        if NG == 1:
            ps = p * tl.sum(vs, axis=1).to(tl.float32)
            pv = tl.sum(ps[:, None] * vc, axis=0) - tl.sum(ps * tl.sum(vz, axis=1).to(tl.float32), axis=0)  # [D]
        else:
            pv = tl.sum(p[:, None] * ((vc - _per_channel(vz, NG, GC, BLOCK)) * _per_channel(vs, NG, GC, BLOCK)), axis=0)

        acc = acc * alpha + pv
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    out = pid_bh * num_splits + pid_s
    tl.store(M_OUT + out, m_i)
    tl.store(L_OUT + out, l_i)
    tl.store(ACC_OUT + out * D + offs_d, acc)


@triton.jit
def _pair_channel(c, UC: tl.constexpr):
    """Channel of column c of a pair-order tile (triton_uniform._codes_fp16): column u*UC + 2j + h holds
    code j + h*UC/2 of word u, i.e. channel u*UC + j + h*UC/2."""
    r = c % UC
    return (c // UC) * UC + r // 2 + (r % 2) * (UC // 2)


@triton.jit
def _load_tile_tc(ib, KC, KS, KZ, VC, VS, VZ, hk, n0, start, L, tokens_per_split,
                  stride_kc_n, stride_kc_h, stride_ks_n, stride_ks_h, stride_vc_n, stride_vc_h, stride_vs_n,
                  stride_vs_h, DW: tl.constexpr, WPG: tl.constexpr, FACTORED: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    """One tile's reads for the tensor-core kernel: valid [BLOCK], words [BLOCK, DW], and the scales/zeros
    per token [BLOCK] (FACTORED: one group per head) or per word [BLOCK, DW] (group of word u: u // WPG)."""
    valid, rows64, kw, vw = _tile_words(ib, KC, VC, hk, n0, start, L, tokens_per_split, stride_kc_n, stride_kc_h,
                                        stride_vc_n, stride_vc_h, DW, BLOCK)  # fmt: skip
    offs_w = tl.arange(0, DW)
    if FACTORED:
        kso = rows64 * stride_ks_n + hk * stride_ks_h
        vso = rows64 * stride_vs_n + hk * stride_vs_h
        smask = valid
    else:
        g = offs_w // WPG
        kso = rows64[:, None] * stride_ks_n + hk * stride_ks_h + g[None, :]
        vso = rows64[:, None] * stride_vs_n + hk * stride_vs_h + g[None, :]
        smask = valid[:, None]
    ks = tl.load(KS + kso, mask=smask, other=0.0)
    kz = tl.load(KZ + kso, mask=smask, other=0.0)
    vs = tl.load(VS + vso, mask=smask, other=0.0)
    vz = tl.load(VZ + vso, mask=smask, other=0.0)
    return valid, kw, vw, ks, kz, vs, vz


@triton.jit
def _packed_decode_tc_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, IDX, M_OUT, L_OUT, ACC_OUT,
    sm_scale, L, tokens_per_split, num_kv_heads, num_splits,
    stride_qb, stride_qh, stride_kc_n, stride_kc_h, stride_ks_n, stride_ks_h, stride_vc_n, stride_vc_h,
    stride_vs_n, stride_vs_h, stride_ib,
    GQA: tl.constexpr, QB: tl.constexpr, BITS: tl.constexpr, DW: tl.constexpr, WPG: tl.constexpr,
    FACTORED: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """Same partials as _packed_decode_kernel, on tensor cores: one program per (batch row, KV head, split)
    serves the KV head's GQA query heads as the rows of a [QB, D] block (padded to QB >= 16 rows), so the
    packed codes are read once per KV head. Codes are decoded to fp16 in pair order (two codes per LOP3)
    and the query and output columns follow the same order (_pair_channel).

    FACTORED (one quantization group per head): the dots run on the raw codes, exact in fp16, and the
    token's scale and zero are applied to the scores in fp32, s_j = scale * s_j' (q . c_j - z_j sum(q)),
    and to the probabilities, p_j s_j (fp16) . c_j - sum_j p_j s_j z_j. Otherwise the codes are decoded
    straight to fp16 weights (c - z) s with per-word scales (groups of whole words)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    UC: tl.constexpr = 32 // BITS
    D: tl.constexpr = DW * UC
    chan = _pair_channel(tl.arange(0, D), UC)  # [D]: channel of each pair-order column
    rq = tl.arange(0, QB)
    qmask = rq < GQA
    h = hk * GQA + rq
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + chan[None, :], mask=qmask[:, None], other=0.0)
    q16 = q.to(tl.float16)
    q_sum = tl.sum(q16.to(tl.float32), axis=1)  # [QB]

    m_i = tl.full([QB], float("-inf"), tl.float32)
    l_i = tl.zeros([QB], tl.float32)
    acc = tl.zeros([QB, D], tl.float32)
    vzs = tl.zeros([QB], tl.float32)  # FACTORED: sum_j p_j s_j z_j, subtracted at the end

    ib = IDX + b * stride_ib
    start = pid_s * tokens_per_split
    valid_n, kw_n, vw_n, ks_n, kz_n, vs_n, vz_n = _load_tile_tc(
        ib, KC, KS, KZ, VC, VS, VZ, hk, 0, start, L, tokens_per_split, stride_kc_n, stride_kc_h, stride_ks_n,
        stride_ks_h, stride_vc_n, stride_vc_h, stride_vs_n, stride_vs_h, DW, WPG, FACTORED, BLOCK)  # fmt: skip
    for n0 in range(0, tokens_per_split, BLOCK):
        valid, kw, vw, ks, kz, vs, vz = valid_n, kw_n, vw_n, ks_n, kz_n, vs_n, vz_n
        valid_n, kw_n, vw_n, ks_n, kz_n, vs_n, vz_n = _load_tile_tc(
            ib, KC, KS, KZ, VC, VS, VZ, hk, n0 + BLOCK, start, L, tokens_per_split, stride_kc_n, stride_kc_h,
            stride_ks_n, stride_ks_h, stride_vc_n, stride_vc_h, stride_vs_n, stride_vs_h, DW, WPG, FACTORED,
            BLOCK)  # fmt: skip
        if FACTORED:
            kc = _codes_fp16(kw, kw, kw, BITS, False, ASM)  # [BLOCK, D] raw codes, pair order
            d = tl.dot(q16, tl.trans(kc))  # [QB, BLOCK]
            s = (d - q_sum[:, None] * kz.to(tl.float32)[None, :]) * (ks.to(tl.float32) * sm_scale)[None, :]
        else:
            kd = _codes_fp16(kw, ks, kz, BITS, True, ASM)  # [BLOCK, D] fp16 keys (c - z) s
            s = tl.dot(q16, tl.trans(kd)) * sm_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid token yet: keep exp() finite
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])  # [QB, BLOCK], 0 for skipped slots
        if FACTORED:
            vsf = vs.to(tl.float32)
            ps = p * vsf[None, :]
            vc = _codes_fp16(vw, vw, vw, BITS, False, ASM)
            pv = tl.dot(ps.to(tl.float16), vc)  # [QB, D]
            vzs = vzs * alpha + tl.sum(ps * vz.to(tl.float32)[None, :], axis=1)
        else:
            vd = _codes_fp16(vw, vs, vz, BITS, True, ASM)
            pv = tl.dot(p.to(tl.float16), vd)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    if FACTORED:
        acc = acc - vzs[:, None]
    out = (b * num_kv_heads * GQA + h) * num_splits + pid_s  # [QB]
    tl.store(M_OUT + out, m_i, mask=qmask)
    tl.store(L_OUT + out, l_i, mask=qmask)
    tl.store(ACC_OUT + out[:, None] * D + chan[None, :], acc, mask=qmask[:, None])


def _words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, H, DB] viewed as int32 words [N, H, DB / 4] (copied first if the view is not possible)."""
    if codes.stride(-1) != 1 or codes.stride(0) % 4 or codes.stride(1) % 4 or codes.storage_offset() % 4:
        codes = codes.contiguous()
    return codes.view(torch.int32)


def num_splits_for(batch: int, heads: int, length: int, block: int = BLOCK_N) -> int:
    """Splits of the sequence so that a call has about _TARGET_PROGRAMS programs (at least one tile each);
    ``heads``: programs per batch row (query heads for the CUDA-core kernel, KV heads for the tensor-core one)."""
    tiles = max(1, -(-length // block))
    want = max(1, -(-_TARGET_PROGRAMS // max(1, batch * heads)))
    return min(tiles, want)


def tc_supported(bits: int, head_dim: int, n_groups: int) -> bool:
    """The tensor-core kernel applies: 2/4-bit codes, head dim >= 16, groups of whole 32-bit words."""
    uc = 32 // bits
    return bits in KERNEL_BITS and head_dim >= 16 and head_dim % n_groups == 0 and (head_dim // n_groups) % uc == 0


def packed_decode_partials(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    idx: torch.Tensor,
    bits: int,
    sm_scale: float,
    splits: int | None = None,
    block: int | None = None,
    num_warps: int | None = None,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial attention (m, l, acc) of queries ``q`` [B, Hq, D] over one packed store (module docstring).

    k_codes/v_codes: uint8 [N, Hkv, NG, GB]; scales/zeros fp16 [N, Hkv, NG]; idx int32 [B, L].
    Returns m, l fp32 [B, Hq, S] and acc fp32 [B, Hq, S, D] for S = ``splits`` (default: num_splits_for).
    ``kernel``: "tc" (tensor cores, one program per KV head), "simt" (CUDA cores, one per query head), or
    None: "tc" under grouped-query attention where ``tc_supported`` (it reads the codes once per KV head instead
    of once per query head: at 4 query heads per KV head 91.5 us against 102.3 us for "simt" in the same H100
    run), else "simt" (faster with one query head per KV head; kv_attention_quick_h100_variants.log).
    ``block``/``num_warps`` None: the kernel's default.
    """
    if bits not in KERNEL_BITS:
        raise ValueError(f"the packed decode kernel supports bits {KERNEL_BITS}, got {bits}")
    b, hq, d = q.shape
    n, hkv, ng, gb = k_codes.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if ng * gb * 8 // bits != d or v_codes.shape[1:] != k_codes.shape[1:]:
        raise ValueError(f"packed rows {tuple(k_codes.shape)} / {tuple(v_codes.shape)} do not hold head dim {d}")
    db = ng * gb
    if db & (db - 1) or db < 4:
        raise ValueError(f"head dim {d} at {bits} bits is {db} bytes, not a power of two of at least one word")
    if idx.shape[0] != b or idx.dtype != torch.int32:
        raise ValueError(f"idx must be int32 [B={b}, L], got {idx.dtype} {tuple(idx.shape)}")
    kernel = kernel or ("tc" if hq > hkv and tc_supported(bits, d, ng) else "simt")
    if kernel not in ("tc", "simt"):
        raise ValueError(f"kernel must be 'tc' or 'simt', got {kernel!r}")
    if kernel == "tc" and not tc_supported(bits, d, ng):
        raise ValueError(f"the tensor-core kernel needs groups of whole words; head dim {d}, {ng} groups, {bits} bits")
    block = block or (TC_BLOCK_N if kernel == "tc" else BLOCK_N)
    num_warps = num_warps or (TC_NUM_WARPS if kernel == "tc" else NUM_WARPS)
    length = idx.shape[1]
    gqa = hq // hkv
    programs = hkv if kernel == "tc" else hq
    splits = splits or num_splits_for(b, programs, length, block)
    per_split = -(-max(1, length) // splits)
    per_split = -(-per_split // block) * block
    q = q.contiguous()
    idx = idx.contiguous()
    kc, vc = _words(k_codes.reshape(n, hkv, db)), _words(v_codes.reshape(n, hkv, db))
    ks, kz = k_scale.reshape(n, hkv, ng), k_zero.reshape(n, hkv, ng)
    vs, vz = v_scale.reshape(n, hkv, ng), v_zero.reshape(n, hkv, ng)
    if ks.stride() != kz.stride() or vs.stride() != vz.stride():
        ks, kz, vs, vz = ks.contiguous(), kz.contiguous(), vs.contiguous(), vz.contiguous()
    for t in (kc, vc, ks, vs):
        if t.stride(-1) != 1:
            raise ValueError("packed store tensors must be contiguous in their last dimension")
    m = torch.empty(b, hq, splits, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b, hq, splits, d, device=q.device, dtype=torch.float32)
    strides = (
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), ks.stride(0), ks.stride(1),
        vc.stride(0), vc.stride(1), vs.stride(0), vs.stride(1), idx.stride(0),
    )  # fmt: skip
    if kernel == "tc":
        uc = 32 // bits
        _packed_decode_tc_kernel[(b * hkv, splits)](
            q, kc, ks, kz, vc, vs, vz, idx, m, l_sum, acc, float(sm_scale), length, per_split, hkv, splits, *strides,
            GQA=gqa, QB=max(16, triton.next_power_of_2(gqa)), BITS=bits, DW=db // 4, WPG=d // ng // uc,
            FACTORED=ng == 1, BLOCK=block, ASM=not _interpreting(), num_warps=num_warps,
        )  # fmt: skip
    else:
        _packed_decode_kernel[(b * hq, splits)](
            q, kc, ks, kz, vc, vs, vz, idx, m, l_sum, acc, float(sm_scale), length, per_split, hq, splits, *strides,
            GQA=gqa, BITS=bits, DW=db // 4, NG=ng, BLOCK=block, ASM=not _interpreting(), num_warps=num_warps,
        )  # fmt: skip
    return m, l_sum, acc
