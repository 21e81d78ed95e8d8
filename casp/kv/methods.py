"""One entry point per KV-cache method, for the CLI (`casp generate --kv ...`, `casp kv-analyze`).

cache = make_cache("akvq", model, model_dir=path)     # None for "fp16": generate's own DynamicCache
model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from casp.kv.cache import AKVQCache, AKVQConfig
from casp.kv.kivi import KIVICache, KIVIConfig, UniformKVCache
from casp.kv.saliency import PROFILE_FILE, KVSaliencyProfile, measure_saliency

KV_METHODS = ("fp16", "akvq", "kivi", "uniform")


def load_profile(model_dir: str | Path | None) -> KVSaliencyProfile | None:
    """The KV saliency profile stored in a model directory, or None when there is none."""
    if model_dir is None:
        return None
    path = Path(model_dir) / PROFILE_FILE
    return KVSaliencyProfile.load(path) if path.is_file() else None


def make_cache(
    method: str,
    model: nn.Module,
    adapter=None,
    model_dir: str | Path | None = None,
    bits: int = 2,
    residual: int = 128,
):
    """A fresh cache of ``method`` for one generate call (None for "fp16").

    "akvq" reads the saliency profile from ``model_dir`` when `casp kv-analyze` stored one there, and
    otherwise uses the default layer patterns (first 2 layers TSA, the rest PSA).
    """
    if method not in KV_METHODS:
        raise ValueError(f"unknown KV cache method {method!r}; choose one of {', '.join(KV_METHODS)}")
    if method == "fp16":
        return None
    if method == "kivi":
        return KIVICache(model, KIVIConfig(bits=bits, residual=residual), adapter)
    if method == "uniform":
        return UniformKVCache(model, bits=bits, residual=residual, adapter=adapter)
    config = AKVQConfig(bits=bits, residual=residual, profile=load_profile(model_dir))
    return AKVQCache(model, config, adapter)


def analyze(
    model: nn.Module, adapter, calib_inputs: Iterable[dict], model_dir: str | Path | None = None, **kwargs
) -> KVSaliencyProfile:
    """Measure the per-layer TSA/PSA patterns on calibration inputs; store them in ``model_dir`` if given.

    ``kwargs`` go to :func:`casp.kv.saliency.measure_saliency` (skip_first, pivots, pivot_ratio).
    """
    profile = measure_saliency(model, adapter, calib_inputs, **kwargs)
    if model_dir is not None:
        profile.save(Path(model_dir) / PROFILE_FILE)
    return profile
