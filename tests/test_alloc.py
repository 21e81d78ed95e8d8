"""Bit allocation: knapsack solver vs brute force, budget safety, sensitivities with a toy quantizer."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, ClassVar

import pytest
import torch

from casp.alloc import (
    Candidate,
    allocate,
    apply_importance,
    budget_bits,
    candidate_table,
    factor_sensitivity,
    layer_sensitivity,
    min_budget,
    total_cost,
    total_error,
)
from casp.alloc.knapsack import AllocationError
from casp.errors import CaspError
from casp.lowrank import whitened_lowrank
from casp.quant.base import QuantConfig, QuantizedWeight


def brute_force(errors, costs, budget):
    best, best_val = None, float("inf")
    for choice in itertools.product(*[range(len(e)) for e in errors]):
        if total_cost(costs, choice) <= budget:
            val = total_error(errors, choice)
            if val < best_val:
                best, best_val = list(choice), val
    return best, best_val


def random_instance(g: torch.Generator, layers: int, options: int, integer: bool):
    errors, costs = [], []
    for _ in range(layers):
        c = torch.randint(1, 40, (options,), generator=g).double() if integer else torch.rand(options, generator=g) * 40
        e = torch.rand(options, generator=g)
        errors.append(e.tolist())
        costs.append(c.tolist())
    lo, hi = min_budget(costs), sum(max(c) for c in costs)
    budget = lo + float(torch.rand(1, generator=g)) * (hi - lo)
    return errors, costs, budget


@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force_on_integer_costs(seed):
    g = torch.Generator().manual_seed(seed)
    errors, costs, budget = random_instance(
        g, layers=int(torch.randint(1, 6, (1,), generator=g)), options=3, integer=True
    )
    choice = allocate(errors, costs, budget, method="dp")
    _, best_val = brute_force(errors, costs, budget)
    assert total_cost(costs, choice) <= budget
    assert total_error(errors, choice) == pytest.approx(best_val, abs=1e-12)


@pytest.mark.parametrize("seed", range(30))
def test_float_costs_never_exceed_budget_and_are_near_optimal(seed):
    g = torch.Generator().manual_seed(100 + seed)
    errors, costs, budget = random_instance(g, layers=5, options=4, integer=False)
    _, best_val = brute_force(errors, costs, budget)
    for method in ("dp", "lagrange", "auto"):
        choice = allocate(errors, costs, budget, method=method)
        assert total_cost(costs, choice) <= budget, method
        assert total_error(errors, choice) >= best_val - 1e-12
    # At a fine grid, the DP finds the optimum on these small instances.
    fine = allocate(errors, costs, budget, resolution=200_000)
    assert total_error(errors, fine) == pytest.approx(best_val, abs=1e-9)


def test_lagrange_reaches_the_optimum_on_convex_instances():
    # Errors convex in cost (halving per extra bit), equal costs across layers: the Lagrangian is exact.
    errors = [[s * 0.5**b for b in (2, 3, 4)] for s in (1.0, 3.0, 0.2, 5.0, 0.7)]
    costs = [[2.0, 3.0, 4.0]] * 5
    for budget in (10.0, 13.0, 15.0, 17.0, 20.0):
        _, best = brute_force(errors, costs, budget)
        assert total_error(errors, allocate(errors, costs, budget, method="lagrange")) == pytest.approx(best)


def test_sensitivity_change_changes_allocation():
    costs = [[2.0, 3.0]] * 3
    budget = 7.0  # exactly one layer gets 3 bits
    a = allocate([[1.0, 0.1], [0.5, 0.4], [0.5, 0.4]], costs, budget)
    b = allocate([[0.5, 0.4], [0.5, 0.4], [1.0, 0.1]], costs, budget)
    assert a == [1, 0, 0] and b == [0, 0, 1]
    weighted = apply_importance([[0.5, 0.4], [0.5, 0.4], [0.5, 0.3]], [1.0, 10.0, 1.0])
    assert allocate(weighted, costs, budget) == [0, 1, 0]


def test_infeasible_budget_names_the_minimum():
    with pytest.raises(AllocationError, match=r"minimum achievable is 7 bits"):
        allocate([[1.0, 0.5], [1.0, 0.5]], [[3.0, 5.0], [4.0, 6.0]], 6.5)
    assert issubclass(AllocationError, CaspError) and issubclass(AllocationError, ValueError)
    with pytest.raises(AllocationError, match="as many costs"):
        allocate([[1.0, 0.5]], [[3.0]], 10.0)


def test_ties_and_single_options():
    assert allocate([[1.0], [2.0]], [[3.0], [4.0]], 7.0) == [0, 0]
    assert allocate([[1.0, 1.0]], [[5.0, 2.0]], 10.0) == [1]  # same error: the cheaper one


def test_large_instance_is_fast():
    g = torch.Generator().manual_seed(0)
    L = 400
    bits = torch.tensor([2.0, 2.5, 3.0, 3.5, 4.0])
    sizes = torch.randint(1, 50, (L,), generator=g).double() * 4096 * 128
    costs = [(n * (bits + 0.25)).tolist() for n in sizes]  # storage bits with overheads
    errors = [(torch.rand(1, generator=g) * 4.0 ** (-bits)).tolist() for _ in range(L)]
    budget = float(sizes.sum()) * 2.5
    t0 = time.perf_counter()
    choice = allocate(errors, costs, budget)
    dp_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    lag = allocate(errors, costs, budget, method="lagrange")
    lag_time = time.perf_counter() - t0
    assert total_cost(costs, choice) <= budget and total_cost(costs, lag) <= budget
    assert total_error(errors, choice) <= total_error(errors, lag) * (1 + 1e-6)
    assert dp_time < 2.0 and lag_time < 2.0


# --- sensitivities with a toy per-row min-max quantizer -------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyConfig(QuantConfig):
    method: ClassVar[str] = "toy"


class ToyWeight(QuantizedWeight):
    format: ClassVar[str] = "toy"

    def __init__(self, W_hat: torch.Tensor, bits: int):
        self.W_hat, self.bits = W_hat, bits

    @property
    def shape(self):
        return tuple(self.W_hat.shape)

    def dequantize(self, dtype=torch.float32):
        return self.W_hat.to(dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"w": self.W_hat}

    def meta(self) -> dict[str, Any]:
        return {"format": "toy"}

    @classmethod
    def from_state(cls, state, meta):
        raise NotImplementedError

    def storage_bits(self) -> int:
        n, k = self.shape
        return n * k * self.bits + n * 32  # codes + fp16 scale and zero per row


def toy_quantize(W: torch.Tensor, G, cfg: ToyConfig) -> ToyWeight:
    lo, hi = W.min(dim=1, keepdim=True).values, W.max(dim=1, keepdim=True).values
    scale = (hi - lo).clamp_min(1e-12) / (2**cfg.bits - 1)
    return ToyWeight(torch.round((W - lo) / scale) * scale + lo, cfg.bits)


def test_layer_sensitivity_decreases_with_bits_and_counts_storage():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    X = torch.randn(100, 32, generator=g)
    G = X.T @ X
    cands = layer_sensitivity(W, G, ToyConfig().candidates((2, 3, 4, 8)), toy_quantize)
    errs = [c.error for c in cands]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert cands[0].storage_bits == 16 * 32 * 2 + 16 * 32
    assert isinstance(cands[0], Candidate) and cands[2].config.bits == 4
    # Reference: the relative output error computed directly from the outputs.
    W2 = toy_quantize(W, G, ToyConfig(bits=2)).dequantize()
    ref = float(((W - W2) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum())
    assert errs[0] == pytest.approx(ref, rel=1e-4)
    errors, costs = candidate_table([cands])
    assert errors == [errs] and costs[0][0] == float(cands[0].storage_bits)


def test_factor_sensitivity_product_error_and_storage():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 32, generator=g)
    X = torch.randn(80, 32, generator=g)
    G = X.T @ X
    f = whitened_lowrank(W, G, 8)
    cands = factor_sensitivity(f.A, f.B, G, ToyConfig().candidates((2, 4, 8)), toy_quantize)
    errs = [c.error for c in cands]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert cands[1].storage_bits == (24 * 8 + 8 * 32) * 4 + (24 + 8) * 32
    P = f.A @ f.B
    Ph = toy_quantize(f.A, None, ToyConfig(bits=2)).dequantize() @ toy_quantize(f.B, G, ToyConfig(bits=2)).dequantize()
    ref = float(((P - Ph) @ X.T).pow(2).sum() / (P @ X.T).pow(2).sum())
    assert errs[0] == pytest.approx(ref, rel=1e-4)


def test_budget_bits():
    assert budget_bits(1000, 2.25) == 2250.0
    with pytest.raises(AllocationError):
        budget_bits(0, 2.0)
    with pytest.raises(AllocationError):
        apply_importance([[1.0]], [-1.0])


def test_sensitivity_with_the_real_rtn_quantizer_and_allocation_end_to_end():
    from casp.quant.rtn import RTNConfig, quantize_rtn

    g = torch.Generator().manual_seed(2)
    X = torch.randn(64, 32, generator=g)
    G = X.T @ X
    layers = [torch.randn(16, 32, generator=g) * s for s in (1.0, 1.0, 1.0)]
    per_layer = [layer_sensitivity(W, G, RTNConfig(group_size=32).candidates((2, 3, 4)), quantize_rtn) for W in layers]
    for cands in per_layer:
        errs = [c.error for c in cands]
        assert errs[0] > errs[1] > errs[2]
        assert cands[0].storage_bits < cands[1].storage_bits < cands[2].storage_bits
    errors, costs = candidate_table(per_layer)
    budget = costs[0][0] + costs[1][1] + costs[2][0]  # room for exactly one layer at 3 bits
    choice = allocate(errors, costs, budget)
    assert total_cost(costs, choice) <= budget
    assert sorted(choice) == [0, 0, 1]
    assert choice == brute_force(errors, costs, budget)[0]
