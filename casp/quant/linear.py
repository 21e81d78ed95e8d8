"""QuantLinear: an nn.Linear replacement holding a packed weight (any registered format).

The packed tensors of ``QuantizedWeight.state()`` are buffers (so state_dict, .to(device) and
load_state_dict(assign=True) just work), ``meta`` is a plain attribute (it goes to the checkpoint's
JSON, not to safetensors), and forward is one call into casp.kernels, which picks a fused kernel
for the format where one exists.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from casp import kernels
from casp.quant import weight_from_state
from casp.quant.base import QuantizedWeight

if TYPE_CHECKING:
    from casp.kernels.slab_layout import KMajorWeight


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

    def kmajor_layout_only(self, park: str | torch.device = "cpu") -> bool:
        """Keep this layer's weight on its GPU in the K-major layout alone (casp.kernels.set_batch1_kernel's
        "kmajor-only"): the stored buffers move to ``park`` (CPU memory), where state_dict and saving read them.

        Returns False, changing nothing, where the layout does not apply (casp.kernels.kmajor_only_weight).
        """
        if "_kmajor_only" in self.__dict__:
            return True
        kw = kernels.kmajor_only_weight(self.quantized_weight())
        if kw is None:
            return False
        for name in self._packed:
            setattr(self, name, getattr(self, name).to(park))
        self.__dict__["_kmajor_only"] = (self._stored_key(), kw)
        return True

    @property
    def kmajor_only(self) -> KMajorWeight | None:
        """The K-major weight this layer runs on in "kmajor-only" mode, else None."""
        held = self.__dict__.get("_kmajor_only")
        return None if held is None else held[1]

    def stored_layout(self) -> None:
        """Leave "kmajor-only" mode: the stored buffers come back to the K-major copy's device, which is dropped."""
        held = self.__dict__.pop("_kmajor_only", None)
        if held is not None:
            for name in self._packed:
                setattr(self, name, getattr(self, name).to(held[1].device))

    def _stored_key(self) -> tuple:
        """Identity and version of the stored buffers: a load_state_dict into them makes the K-major copy stale."""
        return tuple((getattr(self, n).data_ptr(), getattr(self, n)._version) for n in self._packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        held = self.__dict__.get("_kmajor_only")
        if held is not None and x.device == held[1].device:
            if held[0] != self._stored_key():  # the stored codes were reloaded (load_state_dict): repack them
                park = getattr(self, self._packed[0]).device
                self.stored_layout()
                if not self.kmajor_layout_only(park):
                    return self.forward(x)
                held = self.__dict__["_kmajor_only"]
            return kernels.linear_kmajor(x, held[1], self.bias)
        dense = self.__dict__.get("_dense")
        if dense is not None and dense.device == x.device and dense.dtype == x.dtype:
            y = torch.nn.functional.linear(x, dense)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.__dict__.get("_keep_dense"):
            self.__dict__["_dense"] = self.quantized_weight().dequantize(x.dtype).to(x.device)
            return self.forward(x)
        return kernels.linear(x, self.quantized_weight(), self.bias, self.batch1_kernel)

    def _apply(self, fn, recurse=True):
        held = self.__dict__.get("_kmajor_only")
        if held is not None:
            if fn(held[1].words[:0]).device == held[1].device:
                # kmajor-only on the same device (e.g. .half(), .to(its GPU)): the stored buffers stay parked
                parked = {name: self._buffers.pop(name) for name in self._packed}
                try:
                    return super()._apply(fn, recurse)
                finally:
                    self._buffers.update(parked)
            del self.__dict__["_kmajor_only"]  # moved away: the stored buffers follow, in the stored layout
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
