"""Optimal bit allocation as a multiple-choice knapsack (CASP section 3.4).

Each layer l picks one option j_l (a bit-width / quantizer config) with error e_{l,j} and storage cost
c_{l,j} (bits, overheads included):

    minimize  sum_l e_{l, j_l}   subject to  sum_l c_{l, j_l} <= budget.

Exact solver: dynamic programming over the budget axis. Only the cost above each layer's cheapest
option matters (c'_{l,j} = c_{l,j} - min_j c_{l,j}, budget' = budget - sum_l min_j c_{l,j}). When every
c' is an integer and budget' / gcd(c') fits the table, the grid step is that gcd and the DP is exact.
Otherwise the step is budget' / cells, costs are rounded UP and the budget DOWN to the grid, so a
solution found on the grid never exceeds the real budget (it may miss an optimum by up to one grid
step per layer; the real slack left is then spent greedily). The DP is vectorized over the budget
axis: O(layers x options x cells).

Lagrangian relaxation (fallback for tables too large, and a second opinion in "auto"): for a
multiplier λ each layer picks argmin_j e_{l,j} + λ c_{l,j}; the total cost falls as λ grows, so λ is
bisected to the smallest feasible value, and the slack left is spent greedily on the single-layer
upgrades with the best error drop per bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from casp.errors import CaspError


class AllocationError(CaspError, ValueError):
    """Bad allocation input or an infeasible budget: the message names the fix."""


MAX_GRID_CELLS = 1 << 20  # most budget cells of the exact integer grid (else the `resolution` grid)
MAX_DP_TABLE = 50_000_000  # layers x cells of the choice table before falling back to Lagrangian


def _validate(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[float]]) -> None:
    if len(errors) == 0:
        raise AllocationError("allocate needs at least one layer")
    if len(errors) != len(costs):
        raise AllocationError(f"got errors for {len(errors)} layers but costs for {len(costs)}")
    for li, (e, c) in enumerate(zip(errors, costs)):
        if len(e) == 0 or len(e) != len(c):
            raise AllocationError(
                f"layer {li}: needs at least one option and as many costs as errors ({len(e)} vs {len(c)})"
            )
        if not all(math.isfinite(x) for x in e) or not all(math.isfinite(x) and x >= 0 for x in c):
            raise AllocationError(f"layer {li}: errors must be finite and costs finite and >= 0")


def min_budget(costs: Sequence[Sequence[float]]) -> float:
    """The smallest achievable total cost: every layer at its cheapest option."""
    return float(sum(min(c) for c in costs))


def total_cost(costs: Sequence[Sequence[float]], choice: Sequence[int]) -> float:
    return float(sum(costs[li][j] for li, j in enumerate(choice)))


def total_error(errors: Sequence[Sequence[float]], choice: Sequence[int]) -> float:
    return float(sum(errors[li][j] for li, j in enumerate(choice)))


def allocate(
    errors: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    budget: float,
    resolution: int | None = None,
    method: str = "auto",
) -> list[int]:
    """One option index per layer minimizing sum of errors with sum of costs <= budget.

    ``resolution``: budget cells of the DP grid when the costs are not integers on a small enough grid
    (default: as many as the table allows, MAX_DP_TABLE / layers, at most 2^15).
    ``method``: "dp" (exact on the grid), "lagrange", or "auto" (the better of both; Lagrangian only
    when the table would exceed MAX_DP_TABLE entries). Ties prefer the cheaper option.
    Raises AllocationError (a ValueError) when even the cheapest choice exceeds the budget.
    """
    _validate(errors, costs)
    if method not in ("auto", "dp", "lagrange"):
        raise AllocationError(f"method must be 'auto', 'dp' or 'lagrange', got {method!r}")
    if resolution is not None and resolution < 1:
        raise AllocationError(f"resolution must be >= 1 grid cell, got {resolution}")
    need = min_budget(costs)
    if budget < need:
        raise AllocationError(
            f"budget {budget:.6g} bits is infeasible: the minimum achievable is {need:.6g} bits "
            f"(every layer at its cheapest option); raise the target bits"
        )
    table_cells = max(1, MAX_DP_TABLE // len(costs) - 1)
    if resolution is None:
        resolution = min(table_cells, 1 << 15)
    step, cells = _grid(costs, budget - need, resolution, max_cells=min(MAX_GRID_CELLS, table_cells))
    if method == "lagrange" or (method == "auto" and len(errors) * (cells + 1) > MAX_DP_TABLE):
        return _lagrange(errors, costs, budget)
    choice = _fill_greedy(errors, costs, budget, _dp(errors, costs, step, cells))
    if method == "auto":
        other = _lagrange(errors, costs, budget)
        if total_error(errors, other) < total_error(errors, choice):
            choice = other
    return choice


def _grid(costs: Sequence[Sequence[float]], slack: float, resolution: int, max_cells: int) -> tuple[float, int]:
    """Grid step and number of budget cells for the extra costs c' (see module docstring)."""
    extra = [c - min(cs) for cs in costs for c in cs]
    if all(float(x).is_integer() for x in extra) and float(slack) >= 0:
        g = 0
        for x in extra:
            g = math.gcd(g, int(x))
        if g == 0:  # every layer has a single cost: nothing to decide on the budget axis
            return 1.0, 0
        cells = int(slack // g)
        if cells <= max_cells:
            return float(g), cells
    if slack <= 0:
        return 1.0, 0
    return slack / resolution, resolution


def _dp(errors, costs, step: float, cells: int) -> list[int]:
    """dp[c] = min total error of the layers so far with grid cost <= c; choice[li, c] for backtracking."""
    L = len(errors)
    dp = np.zeros(cells + 1)
    choice = np.zeros((L, cells + 1), dtype=np.int16)
    weights = []
    for li in range(L):
        e = np.asarray(errors[li], dtype=np.float64)
        c = np.asarray(costs[li], dtype=np.float64)
        w = np.ceil((c - c.min()) / step).astype(np.int64)  # round UP: grid cost is never below the real one
        weights.append(w)
        best = np.full(cells + 1, np.inf)
        arg = np.zeros(cells + 1, dtype=np.int16)
        for j in np.lexsort((e, w)):  # cheaper first, so strict '<' keeps the cheaper option on ties
            if w[j] > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[w[j] :] = dp[: cells + 1 - w[j]] + e[j]
            better = cand < best
            best[better] = cand[better]
            arg[better] = j
        dp, choice[li] = best, arg
    out, c = [0] * L, cells
    for li in range(L - 1, -1, -1):
        j = int(choice[li, c])
        out[li] = j
        c -= int(weights[li][j])
    return out


def _pick(errors, costs, lam: float) -> list[int]:
    """argmin_j e + λ c per layer; ties go to the cheaper option."""
    return [min(range(len(e)), key=lambda j: (e[j] + lam * c[j], c[j])) for e, c in zip(errors, costs)]


def _lagrange(errors, costs, budget: float, iters: int = 100) -> list[int]:
    cheapest = [min(range(len(c)), key=lambda j: (c[j], e[j])) for e, c in zip(errors, costs)]
    best = _pick(errors, costs, 0.0)
    if total_cost(costs, best) > budget:
        lo, hi = 0.0, 1.0
        while total_cost(costs, _pick(errors, costs, hi)) > budget:
            hi *= 2
            # λ so large that only cost counts: the cheapest choice (feasible, checked earlier)
            if hi > 1e300:
                break
        best = _pick(errors, costs, hi) if hi <= 1e300 else cheapest
        for _ in range(iters):
            mid = (lo + hi) / 2
            pick = _pick(errors, costs, mid)
            if total_cost(costs, pick) <= budget:
                hi, best = mid, pick
            else:
                lo = mid
            if hi - lo <= 1e-12 * hi:
                break
    return _fill_greedy(errors, costs, budget, best)


def _fill_greedy(errors, costs, budget: float, choice: list[int]) -> list[int]:
    """Spend the slack on the single-layer switch with the best error drop per extra bit, while any fits."""
    choice = list(choice)
    while True:
        slack = budget - total_cost(costs, choice)  # recomputed, so float drift never lets a move overshoot
        best_gain, best_move = 0.0, None
        for li, (e, c) in enumerate(zip(errors, costs)):
            j0 = choice[li]
            for j in range(len(e)):
                drop, extra = e[j0] - e[j], c[j] - c[j0]
                if drop <= 0 or extra > slack:
                    continue
                gain = math.inf if extra <= 0 else drop / extra
                if gain > best_gain:
                    best_gain, best_move = gain, (li, j)
        if best_move is None:
            return choice
        li, j = best_move
        choice[li] = j
