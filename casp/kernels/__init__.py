"""Matmul with packed weights: a fused GPU kernel where one exists for the format, else the torch path.

``linear(x, qw, bias)`` is what ``QuantLinear.forward`` calls. Dispatch:

* format "uniform", x on CUDA in fp16/bf16, Triton importable -> casp.kernels.triton_uniform
  (at batch 1 the K-major GEMV of casp.kernels.triton_kmajor for fp16 at 2 or 4 bits, else the stored-layout
  gemv; tensor-core dot for small batches; dequantize + cuBLAS for prefill). The batch-1 kernel is
  ``uniform_config.GEMV_M1`` unless :func:`set_batch1_kernel` chose another for a model; the repacked layouts
  it may use are made once, on first use, and kept on the weight's ``qweight`` tensor (one more copy of the
  packed codes, scales and zeros; ``set_batch1_kernel(model, "gemv")`` avoids it);
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


def linear(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, m1: str | None = None
) -> torch.Tensor:
    """y = x W^T + b for a packed weight ``qw``; y has x's dtype. ``m1``: the kernel at batch 1 (see above)."""
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
            m1=m1,
        )
    y = qw.matmul(x)
    return y if bias is None else y + bias.to(y.dtype)


BATCH1_KERNELS = {
    "kmajor": "the fastest at batch 1 (fp16, 2 and 4 bits); keeps a K-major copy of each weight's codes",
    "gemv": "reads the stored layout: no second copy, 7-43% slower per layer at batch 1 (kernels_kmajor_h200.txt)",
}


def set_batch1_kernel(model: torch.nn.Module, kernel: str) -> int:
    """Use ``kernel`` (a key of BATCH1_KERNELS) for the one-row matmuls of every QuantLinear in ``model``.

    Choosing "gemv" also frees the repacked copies the K-major kernel made. Returns the layers set.
    """
    from casp.kernels.slab_layout import drop_kernel_copies
    from casp.quant.linear import QuantLinear

    if kernel not in BATCH1_KERNELS:
        raise ValueError(f"unknown batch-1 kernel {kernel!r}; choose one of {', '.join(BATCH1_KERNELS)}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.batch1_kernel = kernel
    if kernel == "gemv":
        drop_kernel_copies(model)
    return len(layers)
