"""Matmul with packed weights: a fused GPU kernel where one exists for the format, else the torch path.

``linear(x, qw, bias)`` is what ``QuantLinear.forward`` calls. Dispatch:

* format "uniform", x on CUDA in fp16/bf16, Triton importable -> casp.kernels.triton_uniform
  (at batch 1 the K-major GEMV of casp.kernels.triton_kmajor for fp16 at 2 or 4 bits, else the stored-layout
  gemv; tensor-core dot for small batches; dequantize + cuBLAS for prefill). The batch-1 kernel is
  ``uniform_config.GEMV_M1`` unless :func:`set_batch1_kernel` chose another for a model; the repacked layouts
  it may use are made once, on first use, and kept on the weight's ``qweight`` tensor (one more copy of the
  packed codes, scales and zeros; ``set_batch1_kernel(model, "gemv")`` avoids it, and
  ``set_batch1_kernel(model, "kmajor-only")`` keeps the K-major copy *instead* of the stored one on the GPU and
  runs every batch size on it, casp.kernels.triton_kmajor_mm);
* format "aqlm" on CUDA -> casp.kernels.triton_aqlm: its GEMV for one activation row (decode) with codebooks of
  at most 256 codewords, else the weight dequantized into x's dtype by Triton, then cuBLAS;
* format "quip" on CUDA -> casp.kernels.triton_quip.quip_dense: the Hadamard transforms of x and y around cuBLAS
  on the rotated weight, decoded into x's dtype by Triton. (The codebook formats' torch path builds the dense
  weight in fp32 at every call: these move at most half its bytes. Not yet timed on a GPU;
  benchmarks/kernels.py --aqlm --quip times both.)
* anything else (CPU, fp32 activations, other formats, no Triton) -> ``qw.matmul(x)`` (+ bias), the
  dequantize-then-matmul reference path.

Triton is imported only when a GPU call needs it, so CPU-only installs without Triton work.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from casp.quant.base import QuantizedWeight

if TYPE_CHECKING:
    from casp.kernels.slab_layout import KMajorWeight

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    """True if the triton package can be imported (it is not needed on CPU)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Under Triton's CPU interpreter (TRITON_INTERPRET=1): CPU tensors allowed, no inline PTX."""
    return os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")


def aqlm_gemv_applies(x: torch.Tensor, qw: QuantizedWeight) -> bool:
    """The AQLM GEMV (casp.kernels.triton_aqlm) takes one activation row and codebooks of at most 2^8 codewords
    (they stay in L1) whose group is a power of two. It reads the packed codes only, where the torch path builds
    the dense weight in fp32 at every call; on an H100 it is 1.01-1.11x faster than an fp16 matmul of the same
    shape (benchmarks/results/kernels_h100_paths.txt)."""
    if qw.format != "aqlm" or x.numel() != x.shape[-1]:
        return False
    return qw.codebook_bits <= 8 and _power_of_two(qw.codebooks.shape[-1])


def kernel_for(x: torch.Tensor, qw: QuantizedWeight) -> str | None:
    """Name of the fused kernel ``linear`` would use for (x, qw), or None for the torch path."""
    if not (x.is_cuda and x.dtype in _KERNEL_DTYPES and triton_available()):
        return None
    if qw.format == "uniform":
        return "triton_uniform"
    if aqlm_gemv_applies(x, qw):
        return "triton_aqlm"
    if qw.format == "aqlm" and _power_of_two(qw.codebooks.shape[-1]):
        return "triton_aqlm_dense"
    if qw.format == "quip":
        return "triton_quip_dense"
    return None


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def linear(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, m1: str | None = None
) -> torch.Tensor:
    """y = x W^T + b for a packed weight ``qw``; y has x's dtype. ``m1``: the kernel at batch 1 (see above)."""
    kind = kernel_for(x, qw)
    if kind == "triton_uniform":
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
    if kind == "triton_aqlm":
        from casp.kernels.triton_aqlm import aqlm_gemv

        y = aqlm_gemv(x.reshape(1, -1), qw.codes, qw.codebooks, qw.scales).reshape(*x.shape[:-1], -1)
    elif kind == "triton_aqlm_dense":
        from casp.kernels.triton_aqlm import aqlm_dense

        y = aqlm_dense(x, qw.codes, qw.codebooks, qw.scales)
    elif kind == "triton_quip_dense":
        from casp.kernels.triton_quip import quip_dense

        y = quip_dense(x, qw)
    else:
        y = qw.matmul(x)
    return y if bias is None else y + bias.to(y.dtype)


def _kmajor_layout_takes(qw: QuantizedWeight) -> bool:
    """A "uniform" weight of 2 or 4 bits with groups of whole words (uniform_config.kmajor_ok)."""
    from casp.kernels.uniform_config import kmajor_ok

    return qw.format == "uniform" and kmajor_ok(qw.bits, qw.group_size, qw.n_groups)


def kmajor_only_weight(qw: QuantizedWeight) -> KMajorWeight | None:
    """The K-major copy of ``qw`` on its device if "kmajor-only" mode applies to it, else None.

    It applies to "uniform" weights of 2 or 4 bits with groups of whole words, on a CUDA device with Triton
    (or under Triton's CPU interpreter, which the tests use).
    """
    from casp.kernels.slab_layout import make_kmajor_weight

    on_gpu = qw.qweight.is_cuda and triton_available()
    if not (_kmajor_layout_takes(qw) and (on_gpu or triton_interpreting())):
        return None
    return make_kmajor_weight(qw.qweight, qw.scales, qw.zeros, qw.perm, qw.bits, qw.group_size, qw.shape[1])


def linear_kmajor(x: torch.Tensor, kw: KMajorWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a weight held in the K-major layout alone (x on its device): the K-major kernels for
    fp16/bf16, else W dequantized from the K-major copy (torch)."""
    if x.dtype in _KERNEL_DTYPES and (x.is_cuda or triton_interpreting()):
        from casp.kernels.triton_kmajor_mm import kmajor_linear

        return kmajor_linear(x, kw, None if bias is None else bias.to(x.dtype))
    xs = x if kw.perm is None else x.index_select(-1, kw.perm)
    return torch.nn.functional.linear(xs, kw.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


BATCH1_KERNELS = {
    "auto": "kmajor where its second copy fits in the GPU's free memory with a fifth of the GPU to spare, else "
    "kmajor-only",
    "kmajor": "the fastest at batch 1 (fp16, 2 and 4 bits); keeps a K-major copy of each weight's codes",
    "gemv": "reads the stored layout: no second copy, 7-43% slower per layer at batch 1 (kernels_kmajor_h200.txt)",
    "kmajor-only": "kmajor's batch-1 kernel and gemv's footprint: the K-major copy replaces the stored codes on the "
    "GPU (they wait in CPU memory) and serves every batch size (its prefill kernels are not yet timed on a GPU)",
}


def kmajor_copy_bytes(model: torch.nn.Module, device: torch.device | None = None) -> int:
    """GPU bytes the "kmajor" mode's K-major copies would add: the codes, scales and zeros of each QuantLinear whose
    weight the K-major kernel takes (2 or 4 bits, groups of whole words) and that sits on ``device`` (default: any
    GPU)."""
    from casp.quant.linear import QuantLinear

    total = 0
    for layer in model.modules():
        if not isinstance(layer, QuantLinear):
            continue
        qw = layer.quantized_weight()
        if _kmajor_layout_takes(qw) and (qw.qweight.is_cuda if device is None else qw.qweight.device == device):
            total += sum(t.numel() * t.element_size() for t in (qw.qweight, qw.scales, qw.zeros))
    return total


def choose_batch1_kernel(copy_bytes: int, free_bytes: int, total_bytes: int) -> str:
    """"kmajor" if its copies (``copy_bytes``) leave a fifth of the GPU's memory free (for activations, the KV
    cache and CUDA graphs), else "kmajor-only", which needs no second copy."""
    return "kmajor" if copy_bytes + total_bytes // 5 <= free_bytes else "kmajor-only"


def resolve_batch1_kernel(model: torch.nn.Module, kernel: str) -> str:
    """``kernel``, with "auto" decided for ``model`` on its GPU (see BATCH1_KERNELS; "kmajor" off the GPU)."""
    if kernel != "auto":
        return kernel
    need = kmajor_copy_bytes(model)
    if need == 0:
        return "kmajor"
    device = next(b.device for b in model.buffers() if b.is_cuda)
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's to reuse
    return choose_batch1_kernel(need, free + cached, total)


def set_batch1_kernel(model: torch.nn.Module, kernel: str) -> int:
    """Use ``kernel`` (a key of BATCH1_KERNELS) for the one-row matmuls of every QuantLinear in ``model``.

    Choosing "gemv" also frees the repacked copies the K-major kernel made. "auto" picks "kmajor" or
    "kmajor-only" by the GPU's free memory (:func:`resolve_batch1_kernel`). "kmajor-only" puts each layer where
    it applies (see :func:`kmajor_only_weight`; call it once the model is on its GPU) in the K-major layout alone:
    the stored buffers move to CPU memory (state_dict and saving still read them) and come back when another
    kernel is chosen or the model moves to another device. Returns the layers set.
    """
    from casp.kernels.slab_layout import drop_kernel_copies
    from casp.quant.linear import QuantLinear

    if kernel not in BATCH1_KERNELS:
        raise ValueError(f"unknown batch-1 kernel {kernel!r}; choose one of {', '.join(BATCH1_KERNELS)}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.stored_layout()
    if kernel != "kmajor":
        drop_kernel_copies(model)  # (before "auto" weighs the copies against the memory they would take)
    kernel = resolve_batch1_kernel(model, kernel)
    for layer in layers:
        layer.batch1_kernel = "kmajor" if kernel == "kmajor-only" else kernel
    if kernel == "kmajor-only":
        for layer in layers:
            layer.kmajor_layout_only()
    return len(layers)
