"""Decode attention straight over AKVQ-VL's packed cache (no dequantized copy of the cache).

For one query token per sequence (a decode step) and each (batch row b, query head h):

    o = sum_j exp(s_j - M) v_j / sum_j exp(s_j - M),   s_j = scale * q . k_j,   M = max_j s_j

over the layer's tokens, which live in up to four *segments*:

* packed segments, one per precision class of old tokens (casp.kv.cache.AKVQLayer: TSA text 4-bit,
  image 2-bit; PSA and uniform layers one 2-bit class): rows of packed codes (casp.kv.quantizer.PackedKV)
  addressed through an index [B, L] of store rows (-1: skip, e.g. a pivot token held in fp16). Keys are
  stored in the Walsh-Hadamard basis, K' = K H, so their scores use the rotated query: q . k = (q H) . (k H)
  (H orthogonal); values are used as stored, and when the cache rotated them online (model without
  folded v_proj/o_proj) the class's p.v sum is rotated back, (sum_j p_j v_j H) H = sum_j p_j v_j;
* dense fp16 segments: the recent window and, in PSA layers, the kept pivot tokens (exact, model basis).

Each segment gives a flash-decoding partial triple (m, l, acc) = (max score, sum exp(s - m),
sum exp(s - m) v); the triples are merged with a log-sum-exp: M = max m, o = sum e^(m-M) acc / sum
e^(m-M) l. This is exactly softmax attention over the dequantized cache that the torch path builds
(casp.kv.cache: update() returns deq(quant(K H)) H^T, etc.), in another summation order.

Packed segments run in the Triton kernel casp.kernels.triton_kv_attention (CUDA, 2/4 bits) or in
``packed_partial_reference`` (gather + dequantize + dense partial: the CPU path and the test oracle).

Wiring into transformers: ``enable_fused_kv_attention(model)`` registers ``casp_kv_attention`` as the
attention implementation "casp_kv" (its masks are sdpa's). An AKVQCache whose model uses it returns, on
decode steps, the new token's states tagged with the cache layer instead of the dequantized cache;
``casp_kv_attention`` then runs ``layer_decode_attention``. Every other call (prefill, untagged
states, other caches) goes to transformers' sdpa attention unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from casp.kv.quantizer import PackedKV, dequantize

FUSED_ATTENTION = "casp_kv"
# Attribute set on the key/value tensors an AKVQ layer returns on a fused decode step.
LAZY_LAYER_ATTR = "casp_kv_layer"


@dataclasses.dataclass(frozen=True)
class Partial:
    """Flash-decoding partial over some tokens: m, l [B, Hq, S] and acc [B, Hq, S, D] (fp32), S splits."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 (the paper's name)
    acc: torch.Tensor


@dataclasses.dataclass(frozen=True)
class PackedSegment:
    """One precision class of quantized tokens: rows ``k``/``v`` [N, Hkv, D] (packed) and ``idx`` int32
    [B, L] (store row of the j-th token of batch row b, -1 = skip), ``pos`` int32 [B, L] its position."""

    k: PackedKV
    v: PackedKV
    idx: torch.Tensor
    pos: torch.Tensor


@dataclasses.dataclass(frozen=True)
class DenseSegment:
    """Exact tokens: ``k``/``v`` [B, Hkv, W, D]; ``pos`` int [B, W] positions; ``valid`` bool [B, W] or None."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor | None = None


def merge_partials(parts: list[Partial]) -> torch.Tensor:
    """o [B, Hq, D] (fp32) from partial triples: M = max m, o = sum e^(m-M) acc / sum e^(m-M) l."""
    m = torch.cat([p.m for p in parts], dim=-1)
    l_sum = torch.cat([p.l for p in parts], dim=-1)
    acc = torch.cat([p.acc for p in parts], dim=-2)
    top = m.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # a row with no token at all
    w = torch.exp(m - top)  # [B, Hq, S]
    return (w.unsqueeze(-1) * acc).sum(dim=-2) / (w * l_sum).sum(dim=-1, keepdim=True)


def dense_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, scale: float
) -> Partial:
    """Partial of queries q [B, Hq, D] over exact keys/values [B, Hkv, W, D] (valid [B, W] or None).

    Scores and p.v are matmuls in k's dtype (fp32 accumulation inside), softmax statistics in fp32."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g, d).to(k.dtype)
    s = (qg @ k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, W]
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m_ref = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m_ref)
    acc = (p.to(v.dtype) @ v).float()  # [B, Hkv, G, D]
    return Partial(m.reshape(b, hq, 1), p.sum(dim=-1).reshape(b, hq, 1), acc.reshape(b, hq, 1, d))


def packed_partial_reference(q: torch.Tensor, k: PackedKV, v: PackedKV, idx: torch.Tensor, scale: float) -> Partial:
    """Partial of q [B, Hq, D] over packed rows ``k``/``v`` [N, Hkv, D] indexed by ``idx`` [B, L], in fp32:
    gather the rows, dequantize, dense attention. The oracle of the Triton kernel."""
    b, length = idx.shape
    rows = idx.clamp_min(0).long().flatten()
    kd = dequantize(k.select(rows), torch.float32)  # [B*L, Hkv, D]
    vd = dequantize(v.select(rows), torch.float32)
    kd = kd.view(b, length, *kd.shape[1:]).transpose(1, 2)  # [B, Hkv, L, D]
    vd = vd.view(b, length, *vd.shape[1:]).transpose(1, 2)
    return dense_partial(q.float(), kd, vd, idx >= 0, scale)


def triton_usable(q: torch.Tensor, bits: int) -> bool:
    """True when the Triton kernel runs by default: CUDA tensors, 2/4-bit codes, triton importable."""
    return q.is_cuda and bits in (2, 4) and importlib.util.find_spec("triton") is not None


def packed_partial(
    q: torch.Tensor, k: PackedKV, v: PackedKV, idx: torch.Tensor, scale: float, use_triton: bool | None = None
) -> Partial:
    """Partial over a packed segment: the Triton kernel or the torch reference.

    use_triton: None = the kernel where ``triton_usable``; True = the kernel (on CPU tensors only under
    TRITON_INTERPRET=1, which the tests use); False = the reference."""
    if use_triton is None:
        use_triton = triton_usable(q, k.bits) and k.bits == v.bits
    if not use_triton:
        return packed_partial_reference(q, k, v, idx, scale)
    if k.bits != v.bits or k.bits not in (2, 4) or importlib.util.find_spec("triton") is None:
        raise ValueError("the Triton KV attention kernel needs 2/4-bit keys and values of one width and triton")
    from casp.kernels.triton_kv_attention import packed_decode_partials

    m, l_sum, acc = packed_decode_partials(
        q, k.codes, k.scale, k.zero, v.codes, v.scale, v.zero, idx.to(torch.int32), k.bits, scale
    )
    return Partial(m, l_sum, acc)


def _gather_valid(key_valid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return key_valid.gather(1, pos.clamp_min(0).long())


def decode_attention(
    q: torch.Tensor,
    packed: list[PackedSegment],
    dense: list[DenseSegment],
    scale: float,
    key_valid: torch.Tensor | None = None,
    hadamard: torch.Tensor | None = None,
    rotate_keys: bool = False,
    rotate_values: bool = False,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """o [B, Hq, D] (fp32) of queries q [B, Hq, D] over packed and dense segments (module docstring).

    key_valid: bool [B, T] over token positions (the attention mask's key padding), or None;
    hadamard: H [D, D] when ``rotate_keys`` (packed keys are K H) or ``rotate_values`` (packed values
    are V H, rotated online by the cache). With Triton (``use_triton``; default: CUDA tensors and triton
    installed) the packed classes run in casp.kernels.triton_kv_attention and the last dense segment (the
    window) together with the merge in casp.kernels.triton_kv_merge; otherwise everything runs in torch."""
    if (rotate_keys or rotate_values) and hadamard is None:
        raise ValueError("rotated packed keys/values need the Hadamard matrix")
    parts = []
    q_rot = q @ hadamard.to(q.dtype) if rotate_keys else q
    d = q.shape[-1]
    fused_merge = use_triton
    if fused_merge is None:  # the merge kernel's tiles need a power-of-two head dim
        from casp.kernels import triton_available

        fused_merge = q.is_cuda and d & (d - 1) == 0 and triton_available()
    for seg in packed:
        idx = seg.idx
        if key_valid is not None:
            idx = torch.where(_gather_valid(key_valid, seg.pos), idx, torch.full_like(idx, -1))
        part = packed_partial(q_rot, seg.k, seg.v, idx, scale, use_triton)
        if rotate_values:
            part = Partial(part.m, part.l, part.acc @ hadamard.float())
        parts.append(part)
    valids = []
    for seg in dense:
        valid = seg.valid
        if key_valid is not None:
            hit = _gather_valid(key_valid, seg.pos)
            valid = hit if valid is None else valid & hit
        valids.append(valid)
    if fused_merge and dense:
        # the last dense segment (the recent window) and the merge of everything in one Triton launch
        from casp.kernels.triton_kv_merge import window_merge

        parts += [dense_partial(q, seg.k, seg.v, valid, scale) for seg, valid in zip(dense[:-1], valids[:-1])]
        b, hq = q.shape[:2]
        m = torch.cat([p.m for p in parts], dim=-1) if parts else q.new_empty(b, hq, 0, dtype=torch.float32)
        l_sum = torch.cat([p.l for p in parts], dim=-1) if parts else m
        acc = torch.cat([p.acc for p in parts], dim=-2) if parts else m.new_empty(b, hq, 0, d)
        return window_merge(q, dense[-1].k, dense[-1].v, valids[-1], m, l_sum, acc, scale)
    parts += [dense_partial(q, seg.k, seg.v, valid, scale) for seg, valid in zip(dense, valids)]
    return merge_partials(parts)


def key_valid_from_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """bool [B, length] keys the (last) query may attend to, from a transformers 4-D mask (bool, True =
    attend, or additive float), or None when there is no mask."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(f"expected a 4-D attention mask [B, 1, q, kv], got shape {tuple(attention_mask.shape)}")
    row = attention_mask[:, 0, -1, :length]
    if row.dtype == torch.bool:
        return row
    return row > torch.finfo(row.dtype).min / 2


def layer_decode_attention(
    layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scale: float, use_triton: bool | None = None
) -> torch.Tensor:
    """Attention output [B, Hq, 1, D] (query's dtype) of one decode query [B, Hq, 1, D] over an AKVQ
    layer's current contents (its packed store, kept pivots and recent window: ``layer.decode_segments()``)."""
    if query.shape[2] != 1:
        raise ValueError(f"fused KV decode attention takes one query token, got {query.shape[2]}")
    packed, dense = layer.decode_segments()
    rotate = layer.rotate_keys or layer.rotate_values
    out = decode_attention(
        query[:, :, 0],
        packed,
        dense,
        scale,
        key_valid_from_mask(attention_mask, layer.get_seq_length()),
        layer.hadamard_matrix() if rotate else None,
        layer.rotate_keys,
        layer.rotate_values,
        use_triton,
    )
    return out.to(query.dtype).unsqueeze(2)


def casp_kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function "casp_kv": fused decode over a tagged AKVQ layer, else sdpa.

    Returns (output [B, q, Hq, D], None) like transformers' attention functions."""
    layer = getattr(key, LAZY_LAYER_ATTR, None)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer_decode_attention(layer, query, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def register_fused_kv_attention() -> str:
    """Register "casp_kv" with transformers' attention and mask interfaces (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FUSED_ATTENTION, casp_kv_attention)
    AttentionMaskInterface.register(FUSED_ATTENTION, sdpa_mask)
    return FUSED_ATTENTION


def enable_fused_kv_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` use "casp_kv" attention (sdpa everywhere except decode steps over an AKVQ cache)."""
    model.set_attn_implementation(register_fused_kv_attention())
    return model


def uses_fused_kv_attention(attention_module: torch.nn.Module) -> bool:
    """True if this attention module (self_attn of a decoder block) dispatches to "casp_kv"."""
    config = getattr(attention_module, "config", None)
    return getattr(config, "_attn_implementation", None) == FUSED_ATTENTION
