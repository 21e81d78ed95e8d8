"""Weight quantizers behind one interface, and the registry that dispatches to them.

    from casp.quant import make_config, quantize
    qw = quantize(W, G, make_config("gptq", bits=2, group_size=128))   # -> QuantizedWeight
    state, meta = qw.state(), qw.meta()                                # what a checkpoint stores
    qw2 = weight_from_state(state, meta)                               # and how it comes back

Methods and formats are plain tables of (module, name) resolved on first use, so a new quantizer
is one new module plus one table row, and importing casp.quant stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from casp.quant.base import QuantConfig, QuantizationError, QuantizedWeight, check_weight, output_error

# method -> (module, config class, quantize function)
QUANTIZERS: dict[str, tuple[str, str, str]] = {
    "rtn": ("casp.quant.rtn", "RTNConfig", "quantize_rtn"),
    "gptq": ("casp.quant.gptq", "GPTQConfig", "quantize_gptq"),
    "aqlm": ("casp.quant.aqlm", "AQLMConfig", "quantize_aqlm"),
    "quip": ("casp.quant.quip", "QuIPConfig", "quantize_quip"),
}

# method -> (module, function quantizing W at several configs of that method in one pass), for methods
# where that is cheaper than one call per config (GPTQ: one column loop for every bit width)
CANDIDATE_QUANTIZERS: dict[str, tuple[str, str]] = {
    "gptq": ("casp.quant.gptq", "quantize_gptq_candidates"),
}

# format name (QuantizedWeight.format, stored in meta["format"]) -> (module, class)
FORMATS: dict[str, tuple[str, str]] = {
    "uniform": ("casp.quant.uniform", "UniformWeight"),
    "aqlm": ("casp.quant.aqlm", "AQLMWeight"),
    "quip": ("casp.quant.quip", "QuIPWeight"),
}

__all__ = [
    "FORMATS",
    "QUANTIZERS",
    "QuantConfig",
    "QuantizationError",
    "QuantizedWeight",
    "check_weight",
    "quantize_candidates",
    "config_class",
    "config_from_dict",
    "format_class",
    "make_config",
    "output_error",
    "quantize",
    "quantizer",
    "weight_from_state",
]


def _load(module: str, name: str, what: str) -> Any:
    if importlib.util.find_spec(module) is None:
        raise QuantizationError(f"{what} is registered, but its module {module} is not installed or not written yet")
    return getattr(importlib.import_module(module), name)


def _entry(method: str) -> tuple[str, str, str]:
    if method not in QUANTIZERS:
        raise QuantizationError(f"unknown quantization method {method!r}; known methods: {sorted(QUANTIZERS)}")
    return QUANTIZERS[method]


def config_class(method: str) -> type[QuantConfig]:
    """The config dataclass of a method name ("rtn", "gptq", "aqlm", "quip")."""
    module, cls, _ = _entry(method)
    return _load(module, cls, f"method {method!r}")


def quantizer(method: str):
    """The pure function quantize_<method>(W, G, cfg) -> QuantizedWeight."""
    module, _, fn = _entry(method)
    return _load(module, fn, f"method {method!r}")


def format_class(name: str) -> type[QuantizedWeight]:
    """The QuantizedWeight subclass that reads format ``name``."""
    if name not in FORMATS:
        raise QuantizationError(f"unknown packed weight format {name!r}; known formats: {sorted(FORMATS)}")
    module, cls = FORMATS[name]
    return _load(module, cls, f"format {name!r}")


def make_config(method: str, **kwargs: Any) -> QuantConfig:
    """Build and validate the config of ``method`` from keyword fields."""
    cls = config_class(method)
    fields = {f.name for f in cls.__dataclass_fields__.values() if f.init}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(fields)}")
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """Inverse of ``QuantConfig.to_dict()`` (the "method" key picks the class)."""
    if "method" not in d:
        raise ValueError(f"a quantizer config dict needs a 'method' key (one of {sorted(QUANTIZERS)}); got {sorted(d)}")
    fields = dict(d)
    return make_config(fields.pop("method"), **fields)


def quantize(W: torch.Tensor, G: torch.Tensor | None, cfg: QuantConfig) -> QuantizedWeight:
    """Quantize W [out, in] with the method named by ``cfg.method`` (G = X^T X, or None for data-free)."""
    cls = config_class(cfg.method)
    if not isinstance(cfg, cls):
        raise QuantizationError(f"config for method {cfg.method!r} must be a {cls.__name__}, got {type(cfg).__name__}")
    return quantizer(cfg.method)(W, G, cfg)


def quantize_candidates(
    W: torch.Tensor, G: torch.Tensor | None, cfgs: Sequence[QuantConfig]
) -> list[QuantizedWeight]:
    """``[quantize(W, G, c) for c in cfgs]``, in one pass where the method has one (CANDIDATE_QUANTIZERS) and
    the configs differ only in bits (what the bit allocator asks for)."""
    methods = {c.method for c in cfgs}
    if len(methods) == 1 and (method := methods.pop()) in CANDIDATE_QUANTIZERS:
        same_but_bits = all(c.replace(bits=cfgs[0].bits) == cfgs[0] for c in cfgs)
        if same_but_bits and all(isinstance(c, config_class(method)) for c in cfgs):
            module, fn = CANDIDATE_QUANTIZERS[method]
            return _load(module, fn, f"method {method!r}")(W, G, list(cfgs))
    return [quantize(W, G, c) for c in cfgs]


def weight_from_state(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> QuantizedWeight:
    """Rebuild a QuantizedWeight from its stored tensors and meta (meta["format"] picks the class)."""
    if "format" not in meta:
        raise QuantizationError(f"weight meta has no 'format' key (one of {sorted(FORMATS)}); got {sorted(meta)}")
    return format_class(meta["format"]).from_state(state, meta)
