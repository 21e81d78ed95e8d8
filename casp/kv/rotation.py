"""Walsh-Hadamard rotation of the head dimension (AKVQ-VL's outlier suppression).

H is the normalized Sylvester Hadamard matrix of size d (head dim): orthogonal, symmetric, its own
inverse. Rotating a vector spreads an outlier channel over all channels, so per-token uniform
quantization of the rotated vector loses far less.

Keys (online, after RoPE): (Q H)(K H)^T = Q K^T. casp quantizes K H inside the cache update and
hands attention the *un-rotated* reconstruction  K^ = deq(quant(K H)) H^T. Then
Q K^^T = (Q H) deq(quant(K H))^T: exactly "rotate Q and K after RoPE, quantize K in the rotated
space", without patching the attention function, so eager, sdpa and flash attention all work
unchanged. (A fused kernel would instead rotate Q once and read the rotated codes directly.)

Values (offline): V H is produced directly by folding H into v_proj, and H^T into o_proj:
    v_h' = v_h H           ->  W_V,h' = H^T W_V,h      (rows of head h of v_proj, and its bias)
    o_h' W_O,h'^T = o_h W_O,h^T  with o_h' = o_h H  ->  W_O,h' = W_O,h H   (columns of head h of o_proj)
Every head uses the same H, so under GQA each KV head's rotation matches the query heads that read
it. The re-parameterization is exact: model outputs are unchanged (up to float rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from casp.hadamard import fwht, hadamard_matrix, is_power_of_two

# Marker set on the model config by fold_value_rotation, so a folded model is never folded twice
# (folding is an involution: a second fold would silently undo the first) and the cache knows
# values already arrive rotated. It is saved with the config.
VALUE_ROTATION_KEY = "casp_kv_value_rotation"


def rotate(x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """x H on the last dimension; ``h`` a precomputed dense H (a GEMM, fast on GPU), else the FWHT.

    H is symmetric and orthogonal, so ``rotate`` is also the inverse rotation.
    """
    if h is None:
        return fwht(x)
    return x @ h


def rotate_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q H, K H): attention scores are unchanged, (QH)(KH)^T = Q K^T."""
    return fwht(q), fwht(k)


def check_head_dim(head_dim: int) -> None:
    if not is_power_of_two(head_dim):
        raise ValueError(
            f"Hadamard rotation needs a power-of-two head dim, got {head_dim}; use rotate=False for this model"
        )


def is_value_rotation_folded(model: nn.Module) -> bool:
    return bool(getattr(model.config, VALUE_ROTATION_KEY, False))


def _fold_block(attn: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    v, o = attn.v_proj, attn.o_proj
    h = hadamard_matrix(head_dim, dtype=torch.float32, device=v.weight.device)
    if v.weight.shape[0] != num_kv_heads * head_dim or o.weight.shape[1] != num_heads * head_dim:
        raise ValueError(
            f"v_proj {tuple(v.weight.shape)} / o_proj {tuple(o.weight.shape)} do not match "
            f"{num_kv_heads} KV heads, {num_heads} heads of dim {head_dim}"
        )
    with torch.no_grad():
        wv = v.weight.float().view(num_kv_heads, head_dim, -1)  # [Hkv, d, in]
        v.weight.copy_((h.T @ wv).reshape_as(v.weight))  # W_V,h' = H^T W_V,h
        if v.bias is not None:
            v.bias.copy_((v.bias.float().view(num_kv_heads, head_dim) @ h).reshape(-1))  # b_h' = b_h H
        wo = o.weight.float().view(o.weight.shape[0], num_heads, head_dim)  # [out, Hq, d]
        o.weight.copy_((wo @ h).reshape_as(o.weight))  # W_O,h' = W_O,h H


def fold_value_rotation(model: nn.Module, adapter=None) -> nn.Module:
    """Fold the per-head Hadamard rotation of V into v_proj / o_proj of every decoder block, in place.

    Returns the model. Raises if it was already folded (see VALUE_ROTATION_KEY).
    """
    from casp.models import get_adapter

    adapter = adapter or get_adapter(model)
    if is_value_rotation_folded(model):
        raise ValueError("value rotation is already folded into this model; folding again would undo it")
    text = adapter.text_config(model)
    num_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    for block in adapter.decoder_layers(model):
        attn = adapter.attention(block)
        head_dim = attn.head_dim
        check_head_dim(head_dim)
        _fold_block(attn, num_heads, num_kv_heads, head_dim)
    setattr(model.config, VALUE_ROTATION_KEY, "hadamard")
    return model
