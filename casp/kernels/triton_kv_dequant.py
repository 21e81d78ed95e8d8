"""Triton kernel: dequantize rows of AKVQ-VL's packed KV store straight into the attention's K/V buffer.

A prefill chunk (or a decode step on the torch path) attends over every cached token, so the cache
writes the dequantized store into the [B, H, S, d] key/value tensors it hands to the attention
(casp.kv.cache.AKVQLayer._load_into). In torch that is unpack, convert, subtract, multiply, rotate and a
strided copy per slice of tokens, several passes over the data and, at large batch, hundreds of launches
per layer. Here one launch per (store class, K or V) reads each packed row once and writes its d values:

    out[b, h, s, :] = ((c - z) s) H      (H: the d x d Walsh-Hadamard matrix when the store holds rotated
                                          rows, applied on tensor cores; omitted otherwise)

for store row r of token (s, b) = (dest[r] // B, dest[r] % B), dest being the flat [S, B] position of the
row (row-major order of the store's class map; rows of a one-class store are in that order already, so
``dest`` may be omitted). Codes are decoded in registers with the uniform-weight kernels' ``_decode``
(int32 words, code p of a word is channel 32 / bits * word + p, the store's uint8 codes viewed as words).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from casp.kernels.triton_kv_attention import _per_channel, _words
from casp.kernels.triton_uniform import _decode, _interpreting

BLOCK_ROWS = 32


@triton.jit
def _dequant_rows_kernel(
    C, S, Z, HMAT, OUT, DEST, n_rows, batch,
    stride_cn, stride_ch, stride_sn, stride_sh, stride_ob, stride_oh, stride_os,
    BITS: tl.constexpr, DW: tl.constexpr, NG: tl.constexpr, HAS_DEST: tl.constexpr, ROTATE: tl.constexpr,
    BLOCK: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """Rows [pid0 * BLOCK, +BLOCK) of head pid1: decode, dequantize, rotate, store at their (b, s)."""
    D: tl.constexpr = DW * (32 // BITS)
    GC: tl.constexpr = D // NG
    hh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n_rows
    if HAS_DEST:
        dest = tl.load(DEST + rows, mask=rmask, other=0).to(tl.int64)
    else:
        dest = rows.to(tl.int64)
    pos_s = dest // batch
    pos_b = dest % batch
    r64 = rows.to(tl.int64)
    w = tl.load(C + r64[:, None] * stride_cn + hh * stride_ch + tl.arange(0, DW)[None, :], mask=rmask[:, None], other=0)
    so = r64[:, None] * stride_sn + hh * stride_sh + tl.arange(0, NG)[None, :]
    sc = tl.load(S + so, mask=rmask[:, None], other=0.0)
    zc = tl.load(Z + so, mask=rmask[:, None], other=0.0)
    x = (_decode(w, w, w, BITS, ASM) - _per_channel(zc, NG, GC, BLOCK)) * _per_channel(sc, NG, GC, BLOCK)
    offs_d = tl.arange(0, D)
    if ROTATE:
        hm = tl.load(HMAT + offs_d[:, None] * D + offs_d[None, :])  # [D, D] in the output dtype
        x = tl.dot(x.to(hm.dtype), hm)
    ptr = OUT + pos_b[:, None] * stride_ob + hh * stride_oh + pos_s[:, None] * stride_os + offs_d[None, :]
    tl.store(ptr, x.to(OUT.dtype.element_ty), mask=rmask[:, None])


def dequantize_rows_into(
    out: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    dest: torch.Tensor | None = None,
    hadamard: torch.Tensor | None = None,
) -> None:
    """Write packed rows (codes uint8 [N, H, NG, GB], scale/zero fp16 [N, H, NG]) into ``out`` [B, H, S, d].

    Row r goes to token (s, b) = divmod(dest[r], B) (``dest`` int32 [N]; None: dest[r] = r). ``hadamard``:
    multiply each row by this [d, d] matrix (rows stored in the rotated basis). ``out`` needs a contiguous
    last dimension; its dtype is the output dtype (fp16/bf16 for the rotation's tensor cores)."""
    n, heads, ng, gb = codes.shape
    b, h_out, s_len, d = out.shape
    if h_out != heads or ng * gb * 8 // bits != d:
        raise ValueError(f"packed rows {tuple(codes.shape)} at {bits} bits do not fit K/V of shape {tuple(out.shape)}")
    if n > b * s_len:
        raise ValueError(f"{n} packed rows do not fit {b} x {s_len} token slots")
    if out.stride(-1) != 1:
        raise ValueError("the output K/V must be contiguous in its last dimension")
    if dest is not None and (dest.shape != (n,) or dest.dtype != torch.int32):
        raise ValueError(f"dest must be int32 [{n}], got {dest.dtype} {tuple(dest.shape)}")
    if n == 0:
        return
    words = _words(codes.reshape(n, heads, ng * gb))
    sc, zc = scale.reshape(n, heads, ng), zero.reshape(n, heads, ng)
    if sc.stride() != zc.stride():
        sc, zc = sc.contiguous(), zc.contiguous()
    hm = None if hadamard is None else hadamard.to(out.dtype).contiguous()
    grid = (triton.cdiv(n, BLOCK_ROWS), heads)
    _dequant_rows_kernel[grid](
        words, sc, zc, hm if hm is not None else out, out, dest if dest is not None else words, n, b,
        words.stride(0), words.stride(1), sc.stride(0), sc.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BITS=bits, DW=ng * gb // 4, NG=ng, HAS_DEST=dest is not None, ROTATE=hm is not None, BLOCK=BLOCK_ROWS,
        ASM=not _interpreting(),
    )  # fmt: skip
