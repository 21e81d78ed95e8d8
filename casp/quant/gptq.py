"""GPTQ (Frantar et al., arXiv 2210.17323): column-by-column rounding with optimal error feedback.

Quantizing column j of W to Q_j changes the layer output by (W_j - Q_j) x_j; the Optimal Brain
Surgeon update spreads that error over the not-yet-quantized columns F so the output error
||(W - Q) X^T||^2 stays smallest:

    W_F <- W_F - (W_j - Q_j) / [H_F^-1]_jj * [H_F^-1]_{j,F},      H = X^T X (+ damping)

GPTQ gets every [H_F^-1] row at once from the upper Cholesky factor U of H^-1 (H^-1 = U^T U):
row j of U, divided by U_jj, is exactly that update direction. Columns are processed in blocks of
``block_size``; inside a block updates are applied immediately, to later columns lazily once per
block (Err @ Hinv[block, rest]), which turns rank-1 updates into one matmul.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from casp.quant.base import QuantConfig, QuantizationError, check_weight
from casp.quant.rtn import (
    clip_ratios,
    compute_dtype,
    dequantize_codes,
    fit_minmax,
    quantize_to_codes,
    resolve_group_size,
    search_clip,
    validate_uniform_config,
)
from casp.quant.uniform import UniformWeight

_DAMP_TRIES = 8  # damping grows x10 per failed Cholesky: 0.01 -> 1e5 * mean(diag H) at most


@dataclasses.dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ.

    bits: 2, 3, 4 or 8.  group_size: input columns per scale/zero (-1 or 0: per output channel).
    damp: relative dampening, lambda = damp * mean(diag H).  block_size: columns per lazy-update block.
    act_order: quantize columns in order of decreasing diag(H) (groups follow that order; the
    permutation is stored).  clip_search: choose each group's clipping ratio (as RTN) on the
    error-updated weights, weighted by diag(H).
    """

    method: ClassVar[str] = "gptq"
    bits: int = 4
    group_size: int = 128
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    clip_search: bool = False
    clip_min_ratio: float = 0.2
    clip_steps: int = 41

    def __post_init__(self):
        validate_uniform_config(self)
        if not self.damp >= 0:
            raise ValueError(f"GPTQConfig.damp must be >= 0 (typical 0.01), got {self.damp}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"GPTQConfig.block_size must be a positive int (typical 128), got {self.block_size}")

    def label(self) -> str:
        return f"{self.method}-{self.bits}b-g{self.group_size}"


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + lambda I)^-1, lambda = damp * mean(diag H).

    If a factorization fails (H not positive definite in floating point), damp is raised x10 and
    retried. Returns (U, damp actually used).
    """
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = H.diagonal().mean()
    for _ in range(_DAMP_TRIES):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        damp = max(damp * 10, 1e-4)
    raise QuantizationError(
        f"Cholesky of the damped Hessian failed even with damp={damp / 10:g}; the Gram matrix is not a valid "
        "X^T X (check the calibration statistics)"
    )


def quantize_gptq(W: torch.Tensor, G: torch.Tensor, cfg: GPTQConfig | None = None) -> UniformWeight:
    """GPTQ of W [N, K] given the input Gram matrix G = X^T X [K, K] (see the module docstring).

    Computes in fp32 (fp64 if W is fp64) on W's device. The paper's H = 2 G / n differs from G by a
    constant that the relative damping cancels, so H = G here.
    """
    cfg = cfg or GPTQConfig()
    if not isinstance(cfg, GPTQConfig):
        raise QuantizationError(f"quantize_gptq needs a GPTQConfig, got {type(cfg).__name__}")
    return quantize_gptq_candidates(W, G, [cfg])[0]


def quantize_gptq_candidates(W: torch.Tensor, G: torch.Tensor, cfgs: Sequence[GPTQConfig]) -> list[UniformWeight]:
    """GPTQ of W at several bit widths in one pass: equal to ``[quantize_gptq(W, G, c) for c in cfgs]``.

    GPTQ's error feedback never mixes output rows, and H^-1 depends only on G, so the copies of W (one per
    config) are stacked as rows of one [len(cfgs) * N, K] problem with a bit width per row: the sensitivity
    pass of the bit allocator gets all its candidates for the cost of one column loop. The configs may
    differ only in ``bits``.
    """
    if len(cfgs) == 0:
        raise QuantizationError("quantize_gptq_candidates needs at least one GPTQConfig")
    for c in cfgs:
        if not isinstance(c, GPTQConfig):
            raise QuantizationError(f"quantize_gptq needs a GPTQConfig, got {type(c).__name__}")
        if c.replace(bits=cfgs[0].bits) != cfgs[0]:
            raise QuantizationError(f"GPTQ candidates may differ only in bits; got {cfgs[0]} and {c}")
    if G is None:
        raise QuantizationError("GPTQ needs the Gram matrix G = X^T X of the layer inputs; use 'rtn' without data")
    check_weight(W, G)
    N = W.shape[0]
    widths = [c.bits for c in cfgs]
    # one width: a plain int (cheapest per column); several: an integer tensor, one width per stacked row
    bits = widths[0] if len(set(widths)) == 1 else torch.tensor(widths, device=W.device).repeat_interleave(N)
    codes, scales, zeros, perm, damp_used = _gptq(W.repeat(len(cfgs), 1), G, bits, cfgs[0])
    gs = resolve_group_size(cfgs[0].group_size, W.shape[1])
    if perm is not None and gs >= W.shape[1]:  # one group per row: the order only mattered while quantizing
        codes, perm = codes[:, torch.argsort(perm)], None
    return [
        UniformWeight.from_codes(codes[i * N : (i + 1) * N], scales[i * N : (i + 1) * N],
                                 zeros[i * N : (i + 1) * N], c.bits, gs, perm, info={"damp_used": damp_used})
        for i, c in enumerate(cfgs)
    ]


def _gptq(W: torch.Tensor, G: torch.Tensor, bits: int | torch.Tensor, cfg: GPTQConfig, use_graph: bool = True):
    """The column loop on W [N, K] at ``bits`` (an int, or a width per row [N]); ``use_graph``: allow the
    CUDA-graph replay of blocks (same results; off only to compare).

    Returns (codes, scales, zeros, perm, damp used)."""
    N, K = W.shape
    gs, B = resolve_group_size(cfg.group_size, K), cfg.block_size
    W = W.to(compute_dtype(W)).clone()  # [N, K], updated in place as errors are fed back
    H = G.to(device=W.device, dtype=W.dtype).clone()  # [K, K]

    dead = H.diagonal() == 0  # inputs that are always 0: their weights never matter
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = None
    if cfg.act_order:  # columns with the most input energy first, while many columns remain to absorb errors
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    d = H.diagonal().clone()  # weights of the clipping search
    Hinv, damp_used = inverse_cholesky(H, cfg.damp)  # [K, K] upper
    del H

    def fit(w: torch.Tensor, d_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return search_clip(w, bits, clip_ratios(cfg), d_cols) if cfg.clip_search else fit_minmax(w, bits)

    n_groups = -(-K // gs)
    scales, zeros = W.new_zeros(N, n_groups), W.new_zeros(N, n_groups)
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    # On a GPU the loop is bound by kernel launches (~15 small ones per column): when every block holds whole
    # groups, all blocks run the same kernels, so one block is captured in a CUDA graph and replayed.
    graphed = use_graph and W.is_cuda and B % gs == 0 and K % B == 0 and K // B > 1
    block_graph = _BlockGraph(N, B, gs, bits, fit, W.dtype, W.device) if graphed else None
    s = z = None  # the grid of the current group
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        if block_graph is not None:
            Q1, Err1, S, Z = block_graph(W[:, i1:i2], Hinv[i1:i2, i1:i2], d[i1:i2])
        else:
            W1 = W[:, i1:i2].clone()  # [N, b] current block

            def group_weights(i: int, W1: torch.Tensor, Err1: torch.Tensor, i1=i1, i2=i2):
                j, g_end = i1 + i, min(i1 + i + gs, K)
                cur = W1[:, i : g_end - i1]
                if g_end > i2:  # the group runs past this block: apply the block's pending updates there
                    cur = torch.cat([cur, W[:, i2:g_end] - Err1[:, :i] @ Hinv[i1:j, i2:g_end]], 1)
                return fit(cur, d[j:g_end])

            starts = [i for i in range(i2 - i1) if (i1 + i) % gs == 0]
            Q1, Err1, S, Z = _quantize_block(W1, Hinv[i1:i2, i1:i2], bits, starts, group_weights, s, z)
        for k, (s, z) in enumerate(zip(S, Z)):
            g = -(-i1 // gs) + k
            scales[:, g], zeros[:, g] = s, z
        codes[:, i1:i2] = Q1.to(torch.uint8)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of all later columns

    return codes, scales, zeros, perm, damp_used


def _quantize_block(W1, Hinv1, bits, starts, fit_group, s=None, z=None):
    """GPTQ's inner loop over the b columns of one block, in place on W1 [N, b].

    ``starts``: columns where a group starts; there ``fit_group(i, W1, Err1)`` fits its grid on the current,
    error-updated weights. (s, z): the grid of a group begun in an earlier block. Returns the codes Q1 [N, b],
    Err1 [N, b] = (W_j - Q_j) / [H^-1]_jj for the lazy update of later columns, and the grids fitted here.
    """
    Q1, Err1 = torch.empty_like(W1), torch.zeros_like(W1)
    S, Z = [], []
    for i in range(W1.shape[1]):
        if i in starts:
            s, z = fit_group(i, W1, Err1)
            S.append(s)
            Z.append(z)
        w = W1[:, i]
        q = quantize_to_codes(w, s, z, bits)
        Q1[:, i] = q
        err = (w - dequantize_codes(q, s, z)) / Hinv1[i, i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # OBS update inside the block
        Err1[:, i] = err
    return Q1, Err1, S, Z


class _BlockGraph:
    """:func:`_quantize_block` on a [N, B] block of whole groups, captured once as a CUDA graph.

    Calling it copies a block, its H^-1 block and clip weights into the captured buffers and replays; the
    returned tensors are the graph's own buffers, valid until the next call.
    """

    def __init__(self, N: int, B: int, gs: int, bits, fit, dtype: torch.dtype, device: torch.device):
        self.W1 = torch.zeros(N, B, dtype=dtype, device=device)
        self.Hinv1 = torch.eye(B, dtype=dtype, device=device)
        self.d1 = torch.ones(B, dtype=dtype, device=device)
        starts = list(range(0, B, gs))

        def run():
            return _quantize_block(self.W1, self.Hinv1, bits, starts,
                                   lambda i, W1, Err1: fit(W1[:, i : i + gs], self.d1[i : i + gs]))

        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy kernel loading)
                run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the sensitivity pass may capture on several GPUs at once, one worker thread each
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.out = run()

    def __call__(self, W1: torch.Tensor, Hinv1: torch.Tensor, d1: torch.Tensor):
        self.W1.copy_(W1)
        self.Hinv1.copy_(Hinv1)
        self.d1.copy_(d1)
        self.graph.replay()
        return self.out
