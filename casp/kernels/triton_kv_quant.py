"""Triton kernel: quantize KV rows (optionally Walsh-Hadamard rotated) into AKVQ-VL's packed format.

The same function as casp.kv.quantizer.quantize_tokens (per group of ``group`` channels: clipped min/max
range, fp16 scale rounded up, integer zero point, codes packed little-endian) applied to rows x H or x of
a [n, B, H, d] (or [N, H, d]) view, in one launch: each row is read once, and the codes, scales and zeros
are written once. The torch version runs a dozen elementwise passes per slice of tokens with fp32
temporaries, hundreds of launches per layer at large batch.

Same arithmetic as the torch version: the rotation result is rounded to the input dtype before
quantization (as ``x @ H`` in that dtype), divisions are IEEE round-to-nearest and rounding is half-to-even,
so codes can differ from torch's only where the rotation's summation order moves a value across a rounding
boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from casp.kv.quantizer import _ABS_SCALE_FLOOR, _REL_SCALE_FLOOR, PackedKV, kernel_layout_ok

BLOCK_ROWS = 32


@triton.jit
def _rint(v):
    """Round half to even (torch.round) of fp32 |v| < 2^22: adding and removing 1.5 * 2^23 leaves no fraction
    bits, and the hardware add rounds to nearest even. (|v| <= 1024 / clip here: the scale floor bounds it.)"""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quant_rows_kernel(
    X, HMAT, C, S, Z, n_rows, rows_inner, stride_x0, stride_x1, stride_xh, stride_cn, stride_ch, stride_sn, stride_sh,
    clip, rel_floor, abs_floor,
    BITS: tl.constexpr, D: tl.constexpr, NG: tl.constexpr, ROTATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Rows [pid0 * BLOCK, +BLOCK) of head pid1; row r is x[r // rows_inner, r % rows_inner] of a 2-level view."""
    GC: tl.constexpr = D // NG
    UC: tl.constexpr = 32 // BITS
    DW: tl.constexpr = D // UC
    QMAX: tl.constexpr = (1 << BITS) - 1
    hh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n_rows
    r64 = rows.to(tl.int64)
    offs_d = tl.arange(0, D)
    base = (r64 // rows_inner) * stride_x0 + (r64 % rows_inner) * stride_x1 + hh * stride_xh
    x = tl.load(X + base[:, None] + offs_d[None, :], mask=rmask[:, None], other=0.0)
    if ROTATE:
        hm = tl.load(HMAT + offs_d[:, None] * D + offs_d[None, :])
        x = tl.dot(x.to(hm.dtype), hm).to(hm.dtype)  # x H, rounded to the input dtype as the torch path
    xg = tl.reshape(x.to(tl.float32), [BLOCK, NG, GC])
    a = tl.min(xg, axis=2) * clip
    c = tl.max(xg, axis=2) * clip
    s = tl.math.div_rn(c - a, tl.full(c.shape, QMAX, tl.float32))  # IEEE division, as torch
    s = tl.maximum(s, tl.maximum(tl.abs(a), tl.abs(c)) * rel_floor)  # |z| stays an exact fp16 integer
    s = tl.maximum(s, abs_floor)
    s16 = s.to(tl.float16)
    # round the scale *up* to fp16 (the s/2 error bound then holds exactly): next fp16 = bit pattern + 1
    up = (s16.to(tl.int16, bitcast=True) + 1).to(tl.int16).to(tl.float16, bitcast=True)
    s16 = tl.where(s16.to(tl.float32) < s, up, s16)
    sf = s16.to(tl.float32)
    z = -_rint(tl.math.div_rn(a, sf))
    q = _rint(tl.math.div_rn(xg, sf[:, :, None])) + z[:, :, None]
    q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)  # [BLOCK, NG, GC]
    shifts = (tl.arange(0, UC) * BITS)[None, None, :]
    words = tl.sum(tl.reshape(q, [BLOCK, DW, UC]) << shifts, axis=2)  # disjoint bit fields: the sum is an OR
    offs_w = tl.arange(0, DW)
    tl.store(C + r64[:, None] * stride_cn + hh * stride_ch + offs_w[None, :], words, mask=rmask[:, None])
    so = r64[:, None] * stride_sn + hh * stride_sh + tl.arange(0, NG)[None, :]
    tl.store(S + so, s16, mask=rmask[:, None])
    tl.store(Z + so, z.to(tl.float16), mask=rmask[:, None])


def quantize_rows(x: torch.Tensor, bits: int, group: int, clip: float, hadamard: torch.Tensor | None) -> PackedKV:
    """Packed rows [N, H, d] of quantize_tokens(x H) (or of x) for x [n, B, H, d] or [N, H, d] (any strides
    with a contiguous last dimension; N = n * B rows in row-major order); casp.kv.quantizer.kernel_layout_ok
    must hold."""
    if x.dim() not in (3, 4) or x.stride(-1) != 1:
        raise ValueError(f"x must be [n, B, H, d] or [N, H, d] with a contiguous last dim, got {tuple(x.shape)}")
    inner = x.shape[1] if x.dim() == 4 else 1
    n_rows = x.shape[0] * inner
    h, d = x.shape[-2], x.shape[-1]
    if not kernel_layout_ok(d, bits, group):
        raise ValueError(f"the quantize kernel needs 2/4/8 bits and groups of whole words; d={d}, group={group}")
    s0, s1 = (x.stride(0), x.stride(1)) if x.dim() == 4 else (x.stride(0), 0)
    ng, gb = d // group, group * bits // 8
    codes = torch.empty(n_rows, h, ng, gb, dtype=torch.uint8, device=x.device)
    scale = torch.empty(n_rows, h, ng, dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    if n_rows:
        words = codes.view(n_rows, h, ng * gb).view(torch.int32)
        hm = None if hadamard is None else hadamard.to(x.dtype).contiguous()
        grid = (triton.cdiv(n_rows, BLOCK_ROWS), h)
        _quant_rows_kernel[grid](
            x, hm if hm is not None else x, words, scale, zero, n_rows, inner, s0, s1, x.stride(-2),
            words.stride(0), words.stride(1), scale.stride(0), scale.stride(1), float(clip), _REL_SCALE_FLOOR,
            _ABS_SCALE_FLOOR,
            BITS=bits, D=d, NG=ng, ROTATE=hm is not None, BLOCK=BLOCK_ROWS,
        )  # fmt: skip
    return PackedKV(codes, scale, zero, bits)
