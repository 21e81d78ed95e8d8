"""Matmul with packed weights: a fused GPU kernel where one exists for the format, else the torch path.

``linear(x, qw, bias)`` is what ``QuantLinear.forward`` calls. Dispatch:

* format "uniform", x on CUDA in fp16/bf16, Triton importable -> casp.kernels.triton_uniform
  (at batch 1 the K-major GEMV of casp.kernels.triton_kmajor for fp16 at 2 or 4 bits, else the stored-layout
  gemv; tensor-core dot for small batches; dequantize + cuBLAS for prefill). The batch-1 kernel is
  ``uniform_config.GEMV_M1``; the repacked layouts it may use are made once, on first use, and kept on the
  weight's ``qweight`` tensor (one more copy of the packed codes, scales and zeros);
* anything else (CPU, fp32 activations, other formats, no Triton) -> ``qw.matmul(x)`` (+ bias), the
  dequantize-then-matmul reference path.

Triton is imported only when a GPU call needs it, so CPU-only installs without Triton work.
"""

from __future__ import annotations

import importlib.util

import torch

from casp.quant.base import QuantizedWeight

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def triton_available() -> bool:
    """True if the triton package can be imported (it is not needed on CPU)."""
    return importlib.util.find_spec("triton") is not None


def kernel_for(x: torch.Tensor, qw: QuantizedWeight) -> str | None:
    """Name of the fused kernel ``linear`` would use for (x, qw), or None for the torch path."""
    if qw.format == "uniform" and x.is_cuda and x.dtype in _KERNEL_DTYPES and triton_available():
        return "triton_uniform"
    return None


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a packed weight ``qw``; y has x's dtype."""
    if kernel_for(x, qw) == "triton_uniform":
        from casp.kernels.triton_uniform import uniform_linear

        return uniform_linear(
            x,
            qw.qweight,
            qw.scales,
            qw.zeros,
            qw.perm,
            qw.bits,
            qw.group_size,
            None if bias is None else bias.to(x.dtype),
        )
    y = qw.matmul(x)
    return y if bias is None else y + bias.to(y.dtype)
