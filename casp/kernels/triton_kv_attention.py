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
and the fp16 parts (recent window, kept pivot tokens) with one log-sum-exp merge in torch, so one
kernel handles any mix of classes (TSA: text 4-bit + image 2-bit; PSA: one 2-bit store + fp16 pivots).

Design choices:
* One program per (b, query head, split), 2-D grid [B * Hq, splits]. Under GQA the KV head is
  h // (Hq / Hkv); its codes are read once per query head of the group (from L2 after the first).
  Splits over ``idx`` give parallelism at small batch (flash-decoding); at large batch one split.
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

from casp.kernels.triton_uniform import _decode, _interpreting

KERNEL_BITS = (2, 4)
# Tokens per tile and warps per program: 64 x 4 was the fastest of 16x4, 32x4, 64x4, 64x8 and 128x8 in every
# LLaVA-7B-shaped case on an H100 (benchmarks/results/kv_attention_h100.txt); 128-168 registers, no spills.
BLOCK_N = 64
NUM_WARPS = 4
# Aim for about this many programs per call before splitting the sequence (132 SMs x several waves).
_TARGET_PROGRAMS = 1024


@triton.jit
def _load_tile(ib, KC, KS, KZ, VC, VS, VZ, hk, n0, start, L, tokens_per_split,
               stride_kc_n, stride_kc_h, stride_ks_n, stride_ks_h, stride_vc_n, stride_vc_h, stride_vs_n, stride_vs_h,
               DW: tl.constexpr, NG: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One tile's reads: valid mask [BLOCK], key/value words [BLOCK, DW], scales/zeros [BLOCK, NG] (fp16)."""
    offs_n = start + n0 + tl.arange(0, BLOCK)
    in_range = (offs_n < L) & (offs_n < start + tokens_per_split)
    rows = tl.load(ib + offs_n, mask=in_range, other=-1)
    valid = rows >= 0
    rows64 = tl.where(valid, rows, 0).to(tl.int64)
    offs_w = tl.arange(0, DW)
    offs_g = tl.arange(0, NG)
    kw = tl.load(KC + rows64[:, None] * stride_kc_n + hk * stride_kc_h + offs_w[None, :], mask=valid[:, None], other=0)
    vw = tl.load(VC + rows64[:, None] * stride_vc_n + hk * stride_vc_h + offs_w[None, :], mask=valid[:, None], other=0)
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


def _words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, H, DB] viewed as int32 words [N, H, DB / 4] (copied first if the view is not possible)."""
    if codes.stride(-1) != 1 or codes.stride(0) % 4 or codes.stride(1) % 4 or codes.storage_offset() % 4:
        codes = codes.contiguous()
    return codes.view(torch.int32)


def num_splits_for(batch: int, q_heads: int, length: int, block: int = BLOCK_N) -> int:
    """Splits of the sequence so that a call has about _TARGET_PROGRAMS programs (at least one tile each)."""
    tiles = max(1, -(-length // block))
    want = max(1, -(-_TARGET_PROGRAMS // max(1, batch * q_heads)))
    return min(tiles, want)


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
    block: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial attention (m, l, acc) of queries ``q`` [B, Hq, D] over one packed store (module docstring).

    k_codes/v_codes: uint8 [N, Hkv, NG, GB]; scales/zeros fp16 [N, Hkv, NG]; idx int32 [B, L].
    Returns m, l fp32 [B, Hq, S] and acc fp32 [B, Hq, S, D] for S = ``splits`` (default: num_splits_for).
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
    length = idx.shape[1]
    splits = splits or num_splits_for(b, hq, length, block)
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
    grid = (b * hq, splits)
    _packed_decode_kernel[grid](
        q,
        kc,
        ks,
        kz,
        vc,
        vs,
        vz,
        idx,
        m,
        l_sum,
        acc,
        float(sm_scale),
        length,
        per_split,
        hq,
        splits,
        q.stride(0),
        q.stride(1),
        kc.stride(0),
        kc.stride(1),
        ks.stride(0),
        ks.stride(1),
        vc.stride(0),
        vc.stride(1),
        vs.stride(0),
        vs.stride(1),
        idx.stride(0),
        GQA=hq // hkv,
        BITS=bits,
        DW=db // 4,
        NG=ng,
        BLOCK=block,
        ASM=not _interpreting(),
        num_warps=num_warps,
    )
    return m, l_sum, acc
