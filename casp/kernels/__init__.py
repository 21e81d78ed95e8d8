"""Matmul with packed weights: a fused GPU kernel where one exists for the format, else the torch path."""

from __future__ import annotations

import torch

from casp.quant.base import QuantizedWeight


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a packed weight ``qw`` (reference torch path: dequantize, then matmul)."""
    y = qw.matmul(x)
    return y if bias is None else y + bias.to(y.dtype)
