"""LowRankLinear: y = A(B(x)), the two-linear replacement of a factorized q_proj / k_proj."""

from __future__ import annotations

import torch
from torch import nn

from casp.lowrank.whiten import LowRankError


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear, a QuantLinear or anything with that shape."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if hasattr(module, "quantized_weight"):
        return tuple(module.quantized_weight().shape)
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    raise LowRankError(f"cannot tell the shape of {type(module).__name__}; give it in_features/out_features")


class LowRankLinear(nn.Module):
    """y = A(B(x)): ``B`` maps in_features -> rank (no bias), ``A`` maps rank -> out_features (with bias).

    ``A`` and ``B`` are any modules (nn.Linear, or QuantLinear once quantized), so quantizing the factors
    is a module swap of ``.A`` / ``.B``.
    """

    def __init__(self, A: nn.Module, B: nn.Module):
        super().__init__()
        out_a, in_a = _weight_shape(A)
        out_b, in_b = _weight_shape(B)
        if in_a != out_b:
            raise LowRankError(f"factor shapes do not chain: B maps {in_b} -> {out_b} but A expects {in_a} inputs")
        self.in_features, self.rank, self.out_features = in_b, out_b, out_a
        self.B = B
        self.A = A

    @classmethod
    def from_factors(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankLinear:
        """Build from dense factors A [out, r], B [r, in] (e.g. whitened_lowrank) and the original bias."""
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise LowRankError(f"expected A [out, r] and B [r, in], got {tuple(A.shape)} and {tuple(B.shape)}")
        if bias is not None and bias.shape != (A.shape[0],):
            raise LowRankError(f"bias has shape {tuple(bias.shape)}, expected ({A.shape[0]},)")
        dtype = dtype or A.dtype
        (out_f, r), in_f = A.shape, B.shape[1]
        b_lin = nn.Linear(in_f, r, bias=False, device=B.device, dtype=dtype)
        a_lin = nn.Linear(r, out_f, bias=bias is not None, device=A.device, dtype=dtype)
        with torch.no_grad():
            b_lin.weight.copy_(B)
            a_lin.weight.copy_(A)
            if bias is not None:
                a_lin.bias.copy_(bias)
        return cls(a_lin, b_lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}"
