"""``casp analyze``: calibration only; attention density per layer and head, written as JSON + a plot."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from casp.calib.attention import LayerAttentionStats
from casp.calib.data import load_calibration
from casp.calib.inputs import encode_samples
from casp.calib.runner import BlockContext, capture_block_inputs, run_layerwise
from casp.formats.atomic import atomic_write_json
from casp.models import load_model
from casp.models.base import ModelAdapter


@dataclasses.dataclass(frozen=True)
class AnalyzeConfig:
    samples: int = 32
    max_length: int = 512
    seed: int = 0
    mass: float = 0.95
    device: str = "cpu"

    def __post_init__(self):
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass}")


def attention_stats_callback(adapter: ModelAdapter, stats: list[LayerAttentionStats], mass: float = 0.95):
    """A block callback that accumulates attention statistics (needs eager attention)."""

    def on_block(ctx: BlockContext) -> None:
        layer = LayerAttentionStats()
        sample = iter(ctx.inputs)

        def hook(module, args, output):
            attn = output[1]
            item = next(sample)
            if attn is None:
                raise RuntimeError("attention weights unavailable: load the model with attn_implementation='eager'")
            for b in range(attn.shape[0]):
                layer.add(attn[b], item.image_mask, mass)

        name = next(n for n, m in ctx.block.named_modules() if m is ctx.adapter.attention(ctx.block))
        ctx.forward_all({name: hook})
        stats.append(layer)

    return on_block


def analyze_layers(model, adapter: ModelAdapter, block_inputs, device="cpu", mass: float = 0.95) -> list[dict]:
    """Per-layer attention statistics of ``model`` on captured block inputs."""
    stats: list[LayerAttentionStats] = []
    run_layerwise(model, adapter, block_inputs, attention_stats_callback(adapter, stats, mass), device=device,
                  desc="analyze")
    return [{"layer": i, **s.summary()} for i, s in enumerate(stats)]


def analyze(model_dir: str | Path, calib: str | Path, out_dir: str | Path, config: AnalyzeConfig) -> dict:
    start = time.time()
    data = load_calibration(calib, config.samples, config.seed)  # fail fast, before loading a large model
    model, processor, adapter = load_model(model_dir, attn_implementation="eager")
    inputs = encode_samples(data.samples, processor, adapter, config.max_length)
    with torch.no_grad():
        block_inputs = capture_block_inputs(model, adapter, inputs, config.device)
    layers = analyze_layers(model, adapter, block_inputs, config.device, config.mass)
    image_tokens = sum(int(b.image_mask.sum()) for b in block_inputs)
    tokens = sum(int(b.image_mask.numel()) for b in block_inputs)
    result = {
        "model": str(model_dir),
        "family": adapter.family,
        "calibration": {"path": str(calib), "samples": len(inputs), "skipped_rows": data.skipped,
                        "tokens": tokens, "image_tokens": image_tokens},
        "mass": config.mass,
        "layers": layers,
        "seconds": round(time.time() - start, 2),
    }
    out = Path(out_dir)
    atomic_write_json(out / "analysis.json", result)
    plot_density(layers, out / "attention_density.png")
    return result


def plot_density(layers: list[dict], path: Path) -> None:
    from casp.formats.atomic import atomic_write_bytes
    from casp.report.plots import attention_density

    atomic_write_bytes(path, attention_density(layers) or b"")
