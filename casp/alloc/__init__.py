"""Bit allocation: per-layer sensitivities and the multiple-choice knapsack solver."""

from casp.alloc.knapsack import allocate, min_budget, total_cost, total_error
from casp.alloc.sensitivity import (
    Candidate,
    apply_importance,
    budget_bits,
    candidate_table,
    factor_sensitivity,
    layer_sensitivity,
)

__all__ = [
    "Candidate",
    "allocate",
    "apply_importance",
    "budget_bits",
    "candidate_table",
    "factor_sensitivity",
    "layer_sensitivity",
    "min_budget",
    "total_cost",
    "total_error",
]
