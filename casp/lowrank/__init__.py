"""Whitened low-rank factorization of Q/K projections and rank selection (pure tensor functions).

The algorithms live in whiten.py, ranks.py and balance.py; module.py holds the thin two-linear module.
"""

from casp.lowrank.balance import balance_factors, condition_factors, hadamard_ranges, official_rescale, rotate_rank
from casp.lowrank.module import LowRankLinear
from casp.lowrank.ranks import adaptive_ranks, density_weights, fixed_rank, max_useful_rank, normalized_errors
from casp.lowrank.whiten import (
    LowRankError,
    LowRankFactors,
    Whitening,
    plain_lowrank,
    whitened_lowrank,
    whitened_spectrum,
    whitening_factor,
)

__all__ = [
    "LowRankError",
    "LowRankFactors",
    "LowRankLinear",
    "Whitening",
    "adaptive_ranks",
    "balance_factors",
    "condition_factors",
    "density_weights",
    "fixed_rank",
    "max_useful_rank",
    "normalized_errors",
    "official_rescale",
    "plain_lowrank",
    "hadamard_ranges",
    "rotate_rank",
    "whitened_lowrank",
    "whitened_spectrum",
    "whitening_factor",
]
