"""QuantLinear: an nn.Linear replacement holding a packed weight (any registered format).

The packed tensors of ``QuantizedWeight.state()`` are buffers (so state_dict, .to(device) and
load_state_dict(assign=True) just work), ``meta`` is a plain attribute (it goes to the checkpoint's
JSON, not to safetensors), and forward is one call into casp.kernels, which picks a fused kernel
for the format where one exists.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from casp import kernels
from casp.quant import weight_from_state
from casp.quant.base import QuantizedWeight


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored packed.

    Packed buffers keep their stored dtypes (int32 codes, fp16 scales, ...) under ``.to(dtype)``,
    ``.half()`` and the like: the stored format is fixed; only the bias follows the model's dtype.
    ``batch1_kernel`` (None: the default) picks the GPU kernel of one-row calls, see
    casp.kernels.set_batch1_kernel.
    """

    batch1_kernel: str | None = None

    def __init__(self, state: dict[str, torch.Tensor], meta: dict[str, Any], bias: torch.Tensor | None = None):
        super().__init__()
        self.meta = dict(meta)
        self.out_features, self.in_features = (int(s) for s in meta["shape"])
        self._packed = tuple(state)
        for name, t in state.items():
            self.register_buffer(name, t)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.quantized_weight()  # validate the packed tensors against meta once, at construction

    @classmethod
    def from_weight(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        return cls(qw.state(), qw.meta(), bias)

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], meta: dict[str, Any], bias: torch.Tensor | None = None
    ) -> QuantLinear:
        return cls(state, meta, bias)

    def quantized_weight(self) -> QuantizedWeight:
        """The QuantizedWeight view of the current buffers (no copy)."""
        return weight_from_state({name: getattr(self, name) for name in self._packed}, self.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.__dict__.get("_dense")
        if dense is not None and dense.device == x.device and dense.dtype == x.dtype:
            y = torch.nn.functional.linear(x, dense)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.__dict__.get("_keep_dense"):
            self.__dict__["_dense"] = self.quantized_weight().dequantize(x.dtype).to(x.device)
            return self.forward(x)
        return kernels.linear(x, self.quantized_weight(), self.bias, self.batch1_kernel)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) casts every floating tensor; the packed format fixes its own dtypes.
        dtypes = {name: getattr(self, name).dtype for name in self._packed}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            t = getattr(self, name)
            if t.dtype != dtype:
                setattr(self, name, t.to(dtype))
        return self

    def extra_repr(self) -> str:
        bits = self.meta.get("bits")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.meta.get('format')}" + (f", bits={bits}" if bits is not None else "")
        )


@contextlib.contextmanager
def dense_weights(model: nn.Module):
    """Inside this block every QuantLinear keeps its dequantized weight after the first call.

    For repeated forwards of the same layers on the torch path (calibration passes over a block,
    evaluation on CPU), where unpacking the codes again at every call dominates the time. Costs one dense
    copy per layer while active; the copies are dropped on exit, so a model kept compressed stays small.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.__dict__["_keep_dense"] = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("_keep_dense", None)
            layer.__dict__.pop("_dense", None)
