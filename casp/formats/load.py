"""Loading compressed checkpoints: build the model on the meta device, swap in the compressed modules
from the stored table, then load every tensor with assign=True (no double allocation; safetensors only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights

from casp.errors import CheckpointError
from casp.formats import modules as table
from casp.formats.checkpoint import FORMAT_VERSION, _read_safetensors
from casp.models import adapter_for_model_type, read_config


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    return [path / "model.safetensors"]


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str | None = None):
    """(model, processor, adapter) of a casp output directory, ready for ``generate``."""
    from transformers import AutoConfig, GenerationConfig

    path = Path(path)
    raw = read_config(path)
    qc = raw.get("quantization_config", {})
    if qc.get("quant_method") != "casp":
        raise CheckpointError(f"{path} is not a casp checkpoint (no quantization_config with quant_method 'casp')")
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses casp checkpoint format {qc.get('format_version')}, newer than this casp "
                              f"reads ({FORMAT_VERSION}); upgrade casp")
    adapter = adapter_for_model_type(raw.get("model_type"))
    tensors: dict[str, torch.Tensor] = {}
    for shard in _shard_files(path):
        tensors.update(_read_safetensors(shard))
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if attn_implementation:
        config._attn_implementation = attn_implementation
    import transformers

    cls = getattr(transformers, adapter.model_class)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") else cls._from_config(config)
    for name, entry in qc.get("layers", {}).items():
        table.set_module(model, name, table.build(name, entry, tensors))
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if not (k in tied or k.endswith("lm_head.weight"))]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match config.json (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); the checkpoint is inconsistent: "
            "re-run casp compress"
        )
    for key, t in tensors.items():
        if tuple(expected[key].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(t.shape)} but the config expects "
                                  f"{tuple(expected[key].shape)}; re-run casp compress")
    floating = {k: (t.to(dtype) if t.is_floating_point() and not _is_packed(model, k) else t)
                for k, t in tensors.items()}
    model.load_state_dict(floating, strict=False, assign=True)
    model.tie_weights()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    _check_no_meta(model, path)
    model.to(device).eval()
    return model, adapter.load_processor(path), adapter


def _is_packed(model, key: str) -> bool:
    from casp.quant.linear import QuantLinear

    owner = model.get_submodule(key.rpartition(".")[0])
    return isinstance(owner, QuantLinear) and key.rpartition(".")[2] != "bias"


def _check_no_meta(model, path) -> None:
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if left:
        raise CheckpointError(f"{path}: no stored values for {left[:3]}; the checkpoint is incomplete: re-run compress")


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """casp.load(dir): the transformers model with compressed modules swapped in (processor via load_model)."""
    return load_compressed(path, dtype=dtype, device=device)[0]
