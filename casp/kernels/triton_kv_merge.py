"""Triton: the last step of a fused AKVQ-VL decode attention in one launch (window partial + log-sum-exp merge).

casp.kv.attention splits a decode query's attention into flash-decoding partials (m, l, acc) per segment of
the cache: the packed precision classes (casp.kernels.triton_kv_attention, several splits each) and the exact
fp16 tokens (the recent window; in PSA layers also the kept pivot tokens). Done in torch, the window partial
and the merge are ~25 small ops per layer and step; profiled on an H100 their launches cost as much host time
as the packed kernel's GPU time (benchmarks/results/kv_decode_profile_h100.txt). This kernel does both for one
(batch row b, query head h) per program:

    (m, l, acc) <- merge of the S given partials:  m = max_s m_s,  l = sum_s e^(m_s - m) l_s,
                                                     acc = sum_s e^(m_s - m) acc_s
    then, over the window's tokens j (online softmax): s_j = scale * q . k_j, m' = max(m, s_j) ...
    o = acc / l

Keys/values of the window are [B, Hkv, W, D] with any strides but the last (1); under GQA query head h reads
KV head h // (Hq / Hkv). ``valid`` [B, W] (nonzero = attend) masks padding. A row with no token at all gives
0 / 0 = NaN, as the torch merge does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Window tokens per tile and warps per program: one warp on 16-token tiles (reductions inside the warp) was 1.3-1.5x
# faster than 32 x 4 at kv-bench's batch 160-792, window 48 on an H100: 240 us for 0.62 GB, 2.6 TB/s
# (benchmarks/results/kv_merge_variants_h100.txt).
BLOCK_W = 16
NUM_WARPS = 1


@triton.jit
def _window_merge_kernel(
    Q,  # [B, Hq, D]
    K,
    V,  # window [B, Hkv, W, D]
    VALID,  # [B, W] int8 (read only when HAS_VALID)
    M_IN,
    L_IN,  # [B, Hq, S] fp32 partials of the other segments
    ACC_IN,  # [B, Hq, S, D] fp32
    OUT,  # [B, Hq, D] fp32
    sm_scale,
    W,
    S,
    num_q_heads,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kw,
    stride_vb,
    stride_vh,
    stride_vw,
    stride_valid_b,
    GQA: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_VALID: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_q_heads
    h = pid % num_q_heads
    hk = h // GQA
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d).to(tl.float32) * sm_scale

    # merge the given partials: the running state (m_i, l_i, acc) is relative to m_i
    offs_s = tl.arange(0, BLOCK_S)
    in_s = offs_s < S
    m_s = tl.load(M_IN + pid * S + offs_s, mask=in_s, other=float("-inf"))
    l_s = tl.load(L_IN + pid * S + offs_s, mask=in_s, other=0.0)
    m_i = tl.max(m_s, axis=0)
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    w_s = tl.exp(m_s - m_ref)  # 0 for empty partials and padding slots
    l_i = tl.sum(w_s * l_s, axis=0)
    acc_s = tl.load(ACC_IN + (pid * S + offs_s)[:, None] * D + offs_d[None, :], mask=in_s[:, None], other=0.0)
    acc = tl.sum(w_s[:, None] * acc_s, axis=0)

    # then the window's exact tokens, online softmax
    for w0 in range(0, W, BLOCK):
        offs_w = w0 + tl.arange(0, BLOCK)
        ok = offs_w < W
        if HAS_VALID:
            ok = ok & (tl.load(VALID + b * stride_valid_b + offs_w, mask=ok, other=0) != 0)
        k = tl.load(
            K + b * stride_kb + hk * stride_kh + offs_w[:, None] * stride_kw + offs_d[None, :],
            mask=ok[:, None],
            other=0.0,
        ).to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref)
        v = tl.load(
            V + b * stride_vb + hk * stride_vh + offs_w[:, None] * stride_vw + offs_d[None, :],
            mask=ok[:, None],
            other=0.0,
        ).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    tl.store(OUT + pid * D + offs_d, acc / l_i)


def window_merge(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    m: torch.Tensor,
    l_sum: torch.Tensor,
    acc: torch.Tensor,
    sm_scale: float,
    block: int = BLOCK_W,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """o [B, Hq, D] (fp32): softmax attention of q [B, Hq, D] over the window k/v [B, Hkv, W, D] (valid [B, W]
    bool or None) together with the partials m, l [B, Hq, S] / acc [B, Hq, S, D] of the other tokens.
    ``block``: window tokens per tile; ``num_warps``: warps per program."""
    b, hq, d = q.shape
    hkv, w = k.shape[1], k.shape[2]
    if hq % hkv or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"window k/v {tuple(k.shape)} / {tuple(v.shape)} do not match queries {tuple(q.shape)}")
    if d & (d - 1) or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("window_merge needs a power-of-two head dim and k/v contiguous in their last dimension")
    s = m.shape[-1]
    if m.shape != (b, hq, s) or l_sum.shape != m.shape or acc.shape != (b, hq, s, d):
        raise ValueError(f"partials m {tuple(m.shape)} / acc {tuple(acc.shape)} do not match queries {(b, hq, d)}")
    q = q.contiguous()
    m, l_sum, acc = m.float().contiguous(), l_sum.float().contiguous(), acc.float().contiguous()
    valid_i8 = valid.to(torch.int8).contiguous() if valid is not None else m  # any pointer when unused
    out = torch.empty(b, hq, d, device=q.device, dtype=torch.float32)
    _window_merge_kernel[(b * hq,)](
        q,
        k,
        v,
        valid_i8,
        m,
        l_sum,
        acc,
        out,
        float(sm_scale),
        w,
        s,
        hq,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        valid_i8.stride(0) if valid is not None else 0,
        GQA=hq // hkv,
        D=d,
        BLOCK=block,
        BLOCK_S=max(1, triton.next_power_of_2(s)),
        HAS_VALID=valid is not None,
        num_warps=num_warps,
    )
    return out
