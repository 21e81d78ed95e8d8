"""casp: extreme compression of large multimodal models.

CASP weight compression (whitened low-rank Q/K + optimal bit allocation on any quantizer) and the
AKVQ-VL 2-bit KV cache, with calibration, packed checkpoints, kernels and evaluation.

    import casp
    report = casp.compress("llava-dir", "llava-2bit", casp.CompressionConfig(method="casp", bits=2.25,
                           alloc="optimal"), calib="calib.jsonl")
    model = casp.load("llava-2bit")
    casp.register_transformers()   # then transformers' from_pretrained("llava-2bit") loads it too
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public API, imported on first use so that `import casp` stays cheap.
_LAZY = {
    "compress": ("casp.compress", "compress"),
    "CompressionConfig": ("casp.config", "CompressionConfig"),
    "load": ("casp.formats.load", "load"),
    "load_model": ("casp.models", "load_model"),
    "generate": ("casp.generate", "generate"),
    "register_transformers": ("casp.formats.hf", "register"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'casp' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
