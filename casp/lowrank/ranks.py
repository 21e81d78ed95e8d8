"""Rank selection for the low-rank Q/K factors: the paper's fixed ratio and casp's adaptive ranks.

Fixed (CASP paper): keep a share ``ratio`` of the parameters of an m x n weight,
r = floor(m n ratio / (m + n))  (512 for 4096 x 4096 at 0.25).

Adaptive (casp, section 3.3 "beyond"): under the same total parameter budget, choose per-layer ranks

    minimize  sum_l w_l E_l(r_l)   subject to  sum_l r_l (m_l + n_l) <= budget,  1 <= r_l <= r_max,l

with E_l(r) = (sum_{i >= r} σ_{l,i}^2) / (sum_i σ_{l,i}^2) the whitened truncation error of layer l
*normalized by the layer's total whitened energy* (so a layer with large activations does not win
every rank: all layers are measured in "share of the layer's output energy lost"), and
w_l = weight_fn(D)_l growing with the attention density D_l (default D_l / mean(D)): a sparser
attention tolerates a larger error in q/k (the paper's bound), so it gets a smaller rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from casp.lowrank.whiten import LowRankError


def fixed_rank(m: int, n: int, ratio: float = 0.25) -> int:
    """r = floor(m n ratio / (m + n)) clamped to [1, min(m, n)]: the factors keep ``ratio`` of W's params."""
    if m < 1 or n < 1:
        raise LowRankError(f"weight shape must be positive, got {m}x{n}")
    if not 0 < ratio <= 1:
        raise LowRankError(f"rank ratio must be in (0, 1] (share of parameters kept), got {ratio}")
    exact = m * n * ratio / (m + n)
    return max(1, min(min(m, n), math.floor(exact + 1e-9)))  # +1e-9: 511.99999 from float rounding is 512


def max_useful_rank(m: int, n: int) -> int:
    """Largest rank whose factors r (m + n) are not bigger than the dense m n weight."""
    return max(1, (m * n) // (m + n))


def density_weights(densities: Sequence[float]) -> list[float]:
    """Default w_l = D_l / mean(D) (all ones if every density is 0)."""
    d = [float(x) for x in densities]
    mean = sum(d) / len(d)
    if mean <= 0:
        return [1.0] * len(d)
    return [x / mean for x in d]


def normalized_errors(spectrum: torch.Tensor) -> torch.Tensor:
    """E(r) for r = 0..len: share of the whitened energy dropped when keeping the r largest components."""
    s = spectrum.double().sort(descending=True).values
    total = float(s.sum())
    tail = torch.cat([s.flip(0).cumsum(0).flip(0), s.new_zeros(1)])  # tail[r] = sum_{i >= r} σ_i^2
    return tail / total if total > 0 else torch.zeros_like(tail)


def adaptive_ranks(
    spectra: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, int]],
    densities: Sequence[float],
    budget_params: int | None = None,
    weight_fn: Callable[[Sequence[float]], Sequence[float]] = density_weights,
    ratio: float = 0.25,
    min_rank: int = 1,
) -> list[int]:
    """Per-layer ranks minimizing sum_l w_l E_l(r_l) under sum_l r_l (m_l + n_l) <= budget_params.

    ``spectra[l]``: squared singular values σ^2 of layer l in the whitened space (any order; they are
    sorted descending), e.g. from :func:`casp.lowrank.whiten.whitened_spectrum`. ``budget_params``
    defaults to the budget of the fixed setting, sum_l fixed_rank(m_l, n_l, ratio) (m_l + n_l).
    Ranks are capped at min(len(spectrum), max_useful_rank(m, n)).

    Solver: start every layer at ``min_rank``; the gain of raising layer l from r to r+1 is
    w_l σ_{l,r}^2 / energy_l per (m_l + n_l) parameters. Because σ is sorted, a layer's gains decrease
    with r (E_l is convex), so taking increments in order of gain per parameter while they fit is
    exact whenever all layers have the same m + n (the usual case: q and k of one model, no GQA);
    with unequal sizes it is the standard greedy, optimal up to the one increment that did not fit.
    """
    L = len(spectra)
    if L == 0:
        raise LowRankError("adaptive_ranks needs at least one layer")
    if len(shapes) != L or len(densities) != L:
        raise LowRankError(f"got {L} spectra, {len(shapes)} shapes and {len(densities)} densities; need one per layer")
    weights = [float(w) for w in weight_fn(densities)]
    if len(weights) != L or any(not (w >= 0 and w < float("inf")) for w in weights):
        raise LowRankError(f"weight_fn must return {L} finite non-negative weights, got {weights}")
    costs = [int(m) + int(n) for m, n in shapes]
    caps = []
    for spec, (m, n) in zip(spectra, shapes):
        if spec.dim() != 1 or not torch.isfinite(spec).all() or (spec < 0).any():
            raise LowRankError("each spectrum must be a 1-D tensor of finite, non-negative squared singular values")
        caps.append(min(spec.numel(), max_useful_rank(int(m), int(n))))
    if min_rank < 1 or any(min_rank > c for c in caps):
        raise LowRankError(f"min_rank must be in [1, {min(caps)}] (the smallest layer's rank limit), got {min_rank}")
    if budget_params is None:
        budget_params = sum(fixed_rank(int(m), int(n), ratio) * c for (m, n), c in zip(shapes, costs))
    base = min_rank * sum(costs)
    if budget_params < base:
        raise LowRankError(
            f"parameter budget {budget_params} is below the minimum {base} (rank {min_rank} in every layer); "
            "raise the rank ratio or the budget"
        )

    # Every increment (layer l, r -> r+1) with its gain per parameter; in-layer order is preserved by
    # the stable sort because gains decrease with r.
    gains, layer_ids = [], []
    for li, spec in enumerate(spectra):
        err = normalized_errors(spec)
        gain = (err[min_rank : caps[li]] - err[min_rank + 1 : caps[li] + 1]) * (weights[li] / costs[li])
        gains.append(gain)
        layer_ids.append(torch.full_like(gain, li, dtype=torch.long))
    all_gains, all_ids = torch.cat(gains), torch.cat(layer_ids)
    order = torch.sort(all_gains, descending=True, stable=True).indices
    ranks = [min_rank] * L
    left = budget_params - base
    for li, g in zip(all_ids[order].tolist(), all_gains[order].tolist()):
        if g <= 0:  # the rest drop no energy: spending parameters on them buys nothing
            break
        if costs[li] <= left:  # a layer that no longer fits never fits again (its cost is constant)
            ranks[li] += 1
            left -= costs[li]
        if left < min(costs):
            break
    return ranks
