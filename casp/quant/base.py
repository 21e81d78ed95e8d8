"""The one interface every weight quantizer implements.

A quantizer is a pure function on tensors:

    quantize(W, G, config) -> QuantizedWeight

* ``W``  [out_features, in_features] float weight of one linear layer.
* ``G``  [in_features, in_features] fp32 Gram matrix X^T X of that layer's calibration inputs
         (None for data-free methods such as RTN).
* ``config`` a frozen dataclass (subclass of :class:`QuantConfig`) holding bits, group size and
  method options; it validates itself in ``__post_init__`` and serializes to JSON.

A :class:`QuantizedWeight` holds the packed tensors (what is stored on disk and read by the
kernels), can reconstruct the dense weight, and reports its true storage cost with scales,
zeros, codebooks and signs counted. Quantizers never see an ``nn.Module``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from casp.errors import CaspError


class QuantizationError(CaspError, ValueError):
    """Bad quantizer input (shape, bits, group size, NaNs): the message names the fix."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Base of every quantizer config. Subclasses set ``method`` and add their own fields."""

    method: ClassVar[str] = ""
    bits: int = 4

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    def candidates(self, bits: tuple[int, ...] = (2, 3, 4)) -> list[QuantConfig]:
        """Variants of this config that the bit allocator may choose between."""
        return [self.replace(bits=b) for b in bits]

    def label(self) -> str:
        return f"{self.method}-{self.bits}b"


class QuantizedWeight(ABC):
    """A quantized [out_features, in_features] weight in its packed, storable form."""

    format: ClassVar[str] = ""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the dense weight it stands for."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense reconstruction [out_features, in_features]."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Packed tensors, exactly what is saved to safetensors and read by kernels."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """JSON-serializable description (format, shape, config) needed to rebuild from ``state``."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> QuantizedWeight:
        """Inverse of (state, meta). Must check shapes and raise QuantizationError on mismatch."""

    def storage_bits(self) -> int:
        """Bits actually stored: every packed tensor counted (codes, scales, zeros, codebooks...)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.state().values())

    def bits_per_weight(self) -> float:
        out_features, in_features = self.shape
        return self.storage_bits() / (out_features * in_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T, reference path (dequantize then matmul). Kernels override per format."""
        return torch.nn.functional.linear(x, self.dequantize(x.dtype).to(x.device))


def check_weight(W: torch.Tensor, G: torch.Tensor | None = None) -> None:
    """Shared input validation for quantizers: one clear message per problem."""
    if W.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise QuantizationError("weight contains NaN or Inf values; check the checkpoint before quantizing")
    if G is not None:
        n = W.shape[1]
        if G.shape != (n, n):
            raise QuantizationError(
                f"Gram matrix has shape {tuple(G.shape)} but the weight has {n} input features; "
                "it must be [in_features, in_features]"
            )
        if not torch.isfinite(G).all():
            raise QuantizationError(
                "Gram matrix contains NaN or Inf (NaN activations in calibration?); "
                "check the calibration data and the model's dtype"
            )


def output_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor | None) -> float:
    """Relative G-weighted output error tr(dW G dW^T) / tr(W G W^T) (plain Frobenius if G is None)."""
    dW = (W.float() - W_hat.float())
    if G is None:
        return float(dW.pow(2).sum() / W.float().pow(2).sum().clamp_min(1e-30))
    G = G.float().to(W.device)
    num = torch.einsum("oi,ij,oj->", dW, G, dW)
    den = torch.einsum("oi,ij,oj->", W.float(), G, W.float())
    return float(num / den.clamp_min(1e-30))
