"""Writing compressed checkpoints (DESIGN 3.6) and the per-block files that make runs resumable.

Output directory:
  config.json        the original config + "quantization_config" (quant_method "casp", format version,
                     the compression recipe, the per-layer table); written LAST, so a directory without it
                     is never mistaken for a finished checkpoint
  model-0000x-of-0000n.safetensors (+ model.safetensors.index.json when sharded): packed tensors
  processor / tokenizer files, casp_report.json
  .casp_partial/     plan.json + block_XXXX.safetensors of finished blocks (removed when complete)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import casp
from casp.errors import CheckpointError
from casp.formats import modules as table
from casp.formats.atomic import atomic_save_tensors, atomic_write_json
from casp.models.base import ModelAdapter

FORMAT_VERSION = 1
SHARD_BYTES = 2 * 1024**3


def save_block(partial: Path, index: int, block: nn.Module, records: dict[str, dict], adapter: ModelAdapter) -> None:
    """Persist one finished block (its compressed modules' tensors + their table entries)."""
    prefix = adapter.block_prefix(index) + "."
    tensors, entries = {}, {}
    for full in records:
        name = full[len(prefix):]
        module = block.get_submodule(name)
        entries[full] = table.describe(module)
        for key, t in module.state_dict().items():
            tensors[f"{full}.{key}"] = t.detach().cpu()
    meta = {"entries": json.dumps(entries), "records": json.dumps(records)}
    atomic_save_tensors(partial / f"block_{index:04d}.safetensors", tensors, metadata=meta)


def load_block(partial: Path, index: int, block: nn.Module, adapter: ModelAdapter) -> dict[str, dict]:
    """Restore a finished block's compressed modules from its file; returns its records."""
    path = partial / f"block_{index:04d}.safetensors"
    tensors = _read_safetensors(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    entries, records = json.loads(meta["entries"]), json.loads(meta["records"])
    prefix = adapter.block_prefix(index) + "."
    for full, entry in entries.items():
        table.set_module(block, full[len(prefix):], table.build(full, entry, tensors))
    return records


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing weight file {path}; the checkpoint is incomplete: re-run casp compress")
    # safetensors reports corrupt/truncated files only by raising; translate at this boundary.
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001  (SafetensorError, OSError, ...)
        raise CheckpointError(f"weight file {path} is corrupt or truncated ({err}); re-run casp compress "
                              "(with --resume if its .casp_partial folder is still there)") from None


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied embeddings); safetensors forbids aliases."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.device.type != "meta" else k
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def save_compressed(model: nn.Module, processor, adapter: ModelAdapter, out_dir: Path, cfg, report: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = {name: table.describe(m) for name, m in compressed_modules(model).items()}
    state = _dedupe(model.state_dict())
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_save_tensors(out_dir / name, shard, metadata={"format": "pt", "casp_format": str(FORMAT_VERSION)})
    if len(shards) > 1:
        atomic_write_json(out_dir / "model.safetensors.index.json",
                          {"metadata": {}, "weight_map": {k: n for n, s in zip(names, shards) for k in s}})
    if processor is not None:
        processor.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None:  # e.g. suppress_tokens that keep a VLM from emitting its <image> id
        atomic_write_json(out_dir / "generation_config.json", generation.to_diff_dict())
    atomic_write_json(out_dir / "casp_report.json", report)
    if report.get("attention"):  # measured during CASP calibration: the report's density plot reads it
        atomic_write_json(out_dir / "analysis.json", {"model": report.get("model"), "layers": report["attention"]})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "casp",
        "format_version": FORMAT_VERSION,
        "casp_version": casp.__version__,
        "family": adapter.family,
        "method": cfg.method,
        "quantizer": cfg.quantizer,
        "group_size": cfg.group_size,
        "avg_bits": report.get("avg_bits_per_original_param"),
        "recipe": cfg.to_dict(),
        "layers": layers,
    }
    atomic_write_json(out_dir / "config.json", config)  # last: marks the checkpoint complete
    shutil.rmtree(out_dir / ".casp_partial", ignore_errors=True)


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every QuantLinear / LowRankLinear by name (the factors inside a LowRankLinear are not listed)."""
    from casp.lowrank.module import LowRankLinear
    from casp.quant.linear import QuantLinear

    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        if isinstance(module, LowRankLinear) or (isinstance(module, QuantLinear) and parent not in found):
            found[name] = module
    return found
