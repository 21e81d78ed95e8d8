"""Per-layer sensitivities for the bit allocator (CASP section 3.4), independent of the quantizer.

For a layer y = W x with input Gram matrix G and a candidate config b, the quantizer in use gives
Ŵ_b = quantize_fn(W, G, b).dequantize() and

    e_l(b) = tr(ΔW G ΔW^T) / tr(W G W^T),   ΔW = W - Ŵ_b,

the relative output error of quantizing that layer alone. The cost is the QuantizedWeight's
storage_bits() (codes, scales, zeros, codebooks, signs: the true cost with overheads).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from casp.alloc.knapsack import AllocationError
from casp.quant.base import QuantConfig, QuantizedWeight, output_error

QuantizeFn = Callable[[torch.Tensor, "torch.Tensor | None", QuantConfig], QuantizedWeight]
# quantize W at every config of a list in one call (e.g. casp.quant.quantize_candidates); same results
QuantizeManyFn = Callable[[torch.Tensor, "torch.Tensor | None", Sequence[QuantConfig]], Sequence[QuantizedWeight]]


def _quantize_all(W, G, candidates, quantize_fn: QuantizeFn, quantize_many: QuantizeManyFn | None):
    return quantize_many(W, G, candidates) if quantize_many is not None else [quantize_fn(W, G, c) for c in candidates]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One option of one layer: its config, relative output error and storage cost in bits."""

    config: QuantConfig
    error: float
    storage_bits: int


def layer_sensitivity(
    W: torch.Tensor,
    G: torch.Tensor | None,
    candidates: Sequence[QuantConfig],
    quantize_fn: QuantizeFn,
    quantize_many: QuantizeManyFn | None = None,
) -> list[Candidate]:
    """Quantize W with every candidate and measure e(b) = tr(ΔW G ΔW^T) / tr(W G W^T) and storage bits.

    ``quantize_many``, when given, quantizes at all candidates in one call (same results, faster for GPTQ).
    """
    if len(candidates) == 0:
        raise AllocationError("layer_sensitivity needs at least one candidate config")
    out = []
    for cfg, qw in zip(candidates, _quantize_all(W, G, candidates, quantize_fn, quantize_many)):
        W_hat = qw.dequantize(torch.float32).to(W.device)
        out.append(Candidate(cfg, output_error(W, W_hat, G), int(qw.storage_bits())))
    return out


def factor_sensitivity(
    A: torch.Tensor,
    B: torch.Tensor,
    G: torch.Tensor | None,
    candidates: Sequence[QuantConfig],
    quantize_fn: QuantizeFn,
    quantize_many: QuantizeManyFn | None = None,
) -> list[Candidate]:
    """Sensitivity of a low-rank pair W_r = A B ([m, r] x [r, n]) with both factors at the same config.

    B is quantized with the layer's Gram G; A sees B's outputs, so it is quantized with their Gram
    G_A = B G B^T. The error is that of the product against the unquantized product,
    tr(ΔP G ΔP^T) / tr(A B G B^T A^T) with ΔP = A B - Â B̂ (the truncation error is the low-rank step's,
    not the quantizer's). Storage counts both factors.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
        raise AllocationError(f"expected A [m, r] and B [r, n], got {tuple(A.shape)} and {tuple(B.shape)}")
    if len(candidates) == 0:
        raise AllocationError("factor_sensitivity needs at least one candidate config")
    Af, Bf = A.float(), B.float()
    G_A = None if G is None else Bf @ G.float().to(B.device) @ Bf.T  # [r, r]
    P = Af @ Bf
    out = []
    quantized_B = _quantize_all(B, G, candidates, quantize_fn, quantize_many)
    quantized_A = _quantize_all(A, G_A, candidates, quantize_fn, quantize_many)
    for cfg, qA, qB in zip(candidates, quantized_A, quantized_B):
        P_hat = qA.dequantize(torch.float32).to(A.device) @ qB.dequantize(torch.float32).to(A.device)
        out.append(Candidate(cfg, output_error(P, P_hat, G), int(qA.storage_bits()) + int(qB.storage_bits())))
    return out


def candidate_table(per_layer: Sequence[Sequence[Candidate]]) -> tuple[list[list[float]], list[list[float]]]:
    """(errors, costs) lists for :func:`casp.alloc.knapsack.allocate` from per-layer Candidate lists."""
    errors = [[c.error for c in layer] for layer in per_layer]
    costs = [[float(c.storage_bits) for c in layer] for layer in per_layer]
    return errors, costs


def apply_importance(errors: Sequence[Sequence[float]], weights: Sequence[float]) -> list[list[float]]:
    """s_l * e_l(b): scale each layer's errors by its end-to-end importance s_l (>= 0)."""
    if len(errors) != len(weights):
        raise AllocationError(f"got {len(weights)} importance weights for {len(errors)} layers")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise AllocationError("importance weights must be finite and >= 0")
    return [[w * e for e in layer] for layer, w in zip(errors, weights)]


def budget_bits(original_params: int, target_bits_per_param: float) -> float:
    """Total storage budget in bits: original_params x target.

    The target counts bits per ORIGINAL parameter, overheads included (2-bit GPTQ with group-128 fp16
    scale and zero is ~2.25 bits). ``original_params`` counts every allocated layer at its dense size,
    low-rank layers included at m x n (not at their factors' r (m + n)): the parameters that the low-rank
    step removed are therefore budget that the allocator spends on the layers that need more bits.
    """
    if original_params <= 0:
        raise AllocationError(f"original_params must be positive, got {original_params}")
    if not (math.isfinite(target_bits_per_param) and target_bits_per_param > 0):
        raise AllocationError(f"target bits per parameter must be positive, got {target_bits_per_param}")
    return float(original_params) * float(target_bits_per_param)
