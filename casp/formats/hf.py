"""Load casp checkpoints with plain transformers: ``from_pretrained`` on a casp output directory.

    import casp
    casp.register_transformers()          # once per process
    model = AutoModelForCausalLM.from_pretrained("llama-casp")           # or LlavaForConditionalGeneration, ...

transformers reads ``quantization_config`` from config.json and looks its ``quant_method`` up in its registry of
quantizers; :func:`register` adds "casp" there. The quantizer swaps each compressed linear of the table for its
casp module (shapes and dtypes of the buffers come from the safetensors headers; nothing is read twice) while the
model is still on the meta device; transformers then loads every tensor as it does for any checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from casp.errors import CheckpointError
from casp.formats import modules as table
from casp.formats.checkpoint import FORMAT_VERSION

QUANT_METHOD = "casp"
# safetensors header dtype names (the format's spec) -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CaspQuantizationConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a casp checkpoint: the recipe and the compressed-layer table."""

    def __init__(self, layers: dict[str, Any] | None = None, format_version: int = FORMAT_VERSION, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.layers = layers or {}
        self.format_version = format_version
        for key, value in kwargs.items():
            setattr(self, key, value)


class CaspHfQuantizer(HfQuantizer):
    """Loads pre-compressed casp checkpoints (casp compresses with its own pipeline, not at load time)."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.quantization_config.format_version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format {self.quantization_config.format_version} is newer than this casp reads "
                f"({FORMAT_VERSION}); upgrade casp"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs: Any):
        if not checkpoint_files:
            raise CheckpointError(
                "this transformers version does not tell quantizers the checkpoint files; load with casp.load(dir)"
            )
        meta = tensors_on_meta(checkpoint_files)
        for name, entry in self.quantization_config.layers.items():
            prefix = name + "."
            layer = {key: t for key, t in meta.items() if key.startswith(prefix)}
            table.set_module(model, name, table.build(name, entry, layer))
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return False  # save with casp (casp.formats.checkpoint), which writes the layer table


def tensors_on_meta(files: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files`` as an empty meta tensor of its stored shape and dtype."""
    out = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                dtype = SAFETENSORS_DTYPES.get(tensor.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor {key} has dtype {tensor.get_dtype()}, unknown to casp")
                out[key] = torch.empty(tensor.get_shape(), dtype=dtype, device="meta")
    return out


def register() -> None:
    """Make ``from_pretrained`` of transformers load casp checkpoints (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CaspQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(CaspHfQuantizer)
