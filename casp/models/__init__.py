"""Per-family model adapters. Adding an architecture means adding one adapter file here."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from casp.errors import ModelLoadError
from casp.models import idefics3, llama, llava, llava_next, qwen2_vl, realvlm
from casp.models.base import LLAMA_LINEAR_GROUPS, ModelAdapter, cache_argument

ADAPTERS: tuple[ModelAdapter, ...] = (
    llama.ADAPTER,
    llava.ADAPTER,
    llava_next.ADAPTER,
    qwen2_vl.ADAPTER,
    idefics3.ADAPTER,
    realvlm.ADAPTER,
)


def supported_model_types() -> list[str]:
    return [t for adapter in ADAPTERS for t in adapter.model_types]


def adapter_for_model_type(model_type: str | None) -> ModelAdapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ModelLoadError(
        f"unsupported model_type {model_type!r}; casp supports: {', '.join(supported_model_types())} "
        f"(families {', '.join(a.family for a in ADAPTERS)})"
    )


def get_adapter(model_or_config) -> ModelAdapter:
    """The adapter for a model, its config, or a model directory."""
    if isinstance(model_or_config, (str, Path)):
        return adapter_for_model_type(read_config(model_or_config).get("model_type"))
    config = getattr(model_or_config, "config", model_or_config)
    return adapter_for_model_type(getattr(config, "model_type", None))


def read_config(model_dir: str | Path) -> dict:
    """config.json of a local model directory, with a clear error when it is missing or unreadable."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist; pass a local model directory")
    config_file = path / "config.json"
    if not config_file.is_file() and (path / ".casp_partial").is_dir():
        raise ModelLoadError(f"{str(path)!r} holds an unfinished casp compression (no config.json yet); finish it "
                             "with the same 'casp compress ... --out DIR --resume' command")
    if not config_file.is_file():
        raise ModelLoadError(
            f"{str(path)!r} has no config.json; pass a Hugging Face model directory "
            "(saved with save_pretrained) or a casp output directory"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_file} is not valid JSON ({err}); re-save the model") from None


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None):
    """(model, processor, adapter) for a local model directory (original or casp-compressed)."""
    config = read_config(path)
    if config.get("quantization_config", {}).get("quant_method") == "casp":
        from casp.formats.load import load_compressed

        return load_compressed(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    adapter = adapter_for_model_type(config.get("model_type"))
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = adapter.load_model(path, dtype=dtype, **kwargs).to(device).eval()
    return model, adapter.load_processor(path), adapter


__all__ = [
    "ADAPTERS",
    "LLAMA_LINEAR_GROUPS",
    "ModelAdapter",
    "adapter_for_model_type",
    "cache_argument",
    "get_adapter",
    "load_model",
    "read_config",
    "supported_model_types",
]
