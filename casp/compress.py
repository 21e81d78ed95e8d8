"""The model-agnostic compression driver: model -> calibration stats -> decisions -> compressed layers.

Passes over the decoder, each streaming the calibration set block by block (casp.calib.runner):
1. stats (method casp): attention density per layer and the whitened spectra of q_proj/k_proj, which
   decide the ranks (fixed ratio or adaptive);
2. sensitivity (alloc optimal): every linear (low-rank factors included) is quantized with every
   candidate setting, giving its G-weighted output error and true storage; a multiple-choice knapsack
   picks one setting per linear under the budget (bits per ORIGINAL parameter, overheads counted);
3. compress: true-sequential inside each block (q,k,v | o | gate,up | down), each group quantized with
   Gram matrices of inputs that already passed the compressed earlier groups; then the block's outputs
   are recomputed so the next block sees the errors.
After the decisions are made they are saved, and every finished block is saved, so ``resume=True``
continues an interrupted run without redoing finished blocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from casp.alloc.importance import fisher_importance
from casp.alloc.knapsack import allocate
from casp.alloc.sensitivity import (
    Candidate,
    apply_importance,
    budget_bits,
    candidate_table,
    factor_sensitivity,
    layer_sensitivity,
)
from casp.calib.analyze import attention_stats_callback
from casp.calib.attention import LayerAttentionStats
from casp.calib.data import load_calibration
from casp.calib.inputs import encode_samples
from casp.calib.runner import BlockContext, capture_block_inputs, run_layerwise
from casp.config import CompressionConfig
from casp.devices import map_on_devices, resolve_devices
from casp.formats import modules as table
from casp.formats.atomic import atomic_write_json
from casp.lowrank.balance import condition_factors
from casp.lowrank.module import LowRankLinear
from casp.lowrank.ranks import adaptive_ranks, fixed_rank
from casp.lowrank.whiten import whitened_lowrank, whitened_spectrum
from casp.models import load_model
from casp.models.base import ModelAdapter
from casp.quant import make_config, quantize, quantize_candidates
from casp.quant.base import QuantConfig, output_error
from casp.quant.linear import QuantLinear

PARTIAL = ".casp_partial"
LOWRANK_NAMES = ("self_attn.q_proj", "self_attn.k_proj")


# ---- decisions -----------------------------------------------------------------------------------
def base_quant_config(cfg: CompressionConfig, bits: int | None = None) -> QuantConfig:
    fields = dict(cfg.quant_options)
    if bits is None:
        bits = cfg.bits if cfg.alloc == "uniform" else min(cfg.candidate_bits)
    fields["bits"] = int(bits)
    if cfg.quantizer in ("rtn", "gptq"):
        fields.setdefault("group_size", cfg.group_size)
    return make_config(cfg.quantizer, **fields)


def candidate_configs(cfg: CompressionConfig) -> list[QuantConfig]:
    return base_quant_config(cfg).candidates(tuple(cfg.candidate_bits))


@dataclasses.dataclass
class Plan:
    """Decisions made before compressing: rank and quantizer setting of every linear (by full name)."""

    ranks: dict[str, int]
    configs: dict[str, dict]
    attention: list[dict]
    allocation: dict[str, Any]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # wall time of each planning pass

    def config_for(self, name: str) -> QuantConfig:
        from casp.quant import config_from_dict

        return config_from_dict(self.configs[name])


def _linear_weight(module: nn.Linear, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = None if module.bias is None else module.bias.detach().to(device)
    return module.weight.detach().to(device).float(), bias


def _svd_dtype(device) -> torch.dtype:
    # float64 on CPU (exactness, small models); float32 on GPUs, where float64 SVD is many times slower.
    return torch.float32 if torch.device(device).type == "cuda" else torch.float64


def _lowrank_factors(W: torch.Tensor, G: torch.Tensor, rank: int, cfg: CompressionConfig):
    """Whitened factors, conditioned for quantization (balanced + rotated by default; product unchanged)."""
    factors = whitened_lowrank(W, G, rank, dtype=_svd_dtype(W.device))
    A, B = condition_factors(factors.A.float(), factors.B.float(), balance=cfg.balance_factors,
                             rotate=cfg.rotate_factors, seed=cfg.seed)
    return A, B, factors


# ---- pass 1: attention stats + spectra (method casp) ---------------------------------------------
def stats_pass(model, adapter, block_inputs, cfg: CompressionConfig, device) -> tuple[dict[str, int], list[dict]]:
    stats: list[LayerAttentionStats] = []
    attention_cb = attention_stats_callback(adapter, stats)
    spectra, shapes, names = [], [], []

    def on_block(ctx: BlockContext) -> None:
        attention_cb(ctx)
        grams = ctx.grams(LOWRANK_NAMES[:1]) if cfg.ranks == "adaptive" else {}  # q and k read the same input
        for name in LOWRANK_NAMES:
            W, _ = _linear_weight(ctx.block.get_submodule(name), device)
            if cfg.ranks == "adaptive":  # fixed ranks need only the shapes
                spectra.append(whitened_spectrum(W, grams[LOWRANK_NAMES[0]], dtype=_svd_dtype(device)).cpu())
            shapes.append(tuple(W.shape))
            names.append(f"{adapter.block_prefix(ctx.index)}.{name}")

    run_layerwise(model, adapter, block_inputs, on_block, device=device, desc="stats")
    attention = [{"layer": i, **s.summary()} for i, s in enumerate(stats)]
    if cfg.ranks == "fixed":
        ranks = [fixed_rank(m, n, cfg.rank_ratio) for m, n in shapes]
    else:
        budget = sum(fixed_rank(m, n, cfg.rank_ratio) * (m + n) for m, n in shapes)
        densities = [attention[i // len(LOWRANK_NAMES)]["density"] or 1.0 for i in range(len(names))]
        ranks = adaptive_ranks(spectra, shapes, densities, budget)
    # Multiples of 8: codebook quantizers code 8 input features at a time, and kernels like aligned shapes.
    ranks = [max(8, int(r) // 8 * 8) for r in ranks]
    return dict(zip(names, ranks)), attention


# ---- pass 2: sensitivities and the allocation -----------------------------------------------------
def sensitivity_pass(model, adapter, block_inputs, cfg, ranks, device, extra: dict | None = None,
                     importance: dict[str, float] | None = None, devices: list[torch.device] | None = None,
                     cache: Path | None = None, key: str = ""):
    """Candidate errors/costs of every linear. ``extra``: name -> (W, G) of linears outside the blocks;
    ``importance``: name -> end-to-end weight s_l of that layer's error (1 when missing); ``devices``: where
    the candidate quantizations of a block's linears run (one linear per device at a time; default ``device``);
    ``cache``: a folder where each block's table is written under ``key`` (:func:`sensitivity_key`) and read
    back by later runs with the same key: a run stopped in this pass (the longest at 7B) redoes only the blocks
    it had not finished, and runs at other target bits measure nothing again."""
    candidates = candidate_configs(cfg)
    devices = devices or [torch.device(device)]
    names, per_layer, params = [], [], []

    def measure(job: tuple[str, torch.Tensor, torch.Tensor], dev: torch.device) -> list:
        full, W, G = job
        W, G = W.to(dev).float(), G.to(dev)
        if full in ranks:
            A, B, _ = _lowrank_factors(W, G, ranks[full], cfg)
            return factor_sensitivity(A, B, G, candidates, quantize, quantize_candidates)
        return layer_sensitivity(W, G, candidates, quantize, quantize_candidates)

    def measure_all(jobs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        per_layer.extend(map_on_devices(measure, jobs, devices))
        names.extend(full for full, _, _ in jobs)
        params.extend(W.numel() for _, W, _ in jobs)

    def on_block(ctx: BlockContext) -> None:
        full = [f"{adapter.block_prefix(ctx.index)}.{name}" for name in adapter.linear_names]
        weights = [ctx.block.get_submodule(name).weight.detach() for name in adapter.linear_names]
        stamp = {"ranks": {n: ranks[n] for n in full if n in ranks}, "weights": _weight_stamp(weights)}
        path = None if cache is None else cache / f"sensitivity_{key}_{ctx.index:04d}.json"
        saved = load_sensitivity(path, stamp) if path is not None and path.is_file() else None
        if saved is not None:
            per_layer.extend(saved["per_layer"])
            names.extend(saved["names"])
            params.extend(saved["params"])
            return
        grams = ctx.grams(adapter.linear_names)
        first = len(names)
        measure_all([(n, W, grams[name]) for n, W, name in zip(full, weights, adapter.linear_names)])
        if path is not None:
            save_sensitivity(path, stamp, names[first:], params[first:], per_layer[first:])

    measure_all([(full, W, G) for full, (W, G) in (extra or {}).items()])
    run_layerwise(model, adapter, block_inputs, on_block, device=device, desc="sensitivity")
    errors, costs = candidate_table(per_layer)
    if importance:
        errors = apply_importance(errors, [importance.get(n, 1.0) for n in names])
    budget = budget_bits(sum(params), cfg.bits)
    choice = allocate(errors, costs, budget)
    configs = {n: per_layer[i][c].config.to_dict() for i, (n, c) in enumerate(zip(names, choice))}
    spent = sum(costs[i][c] for i, c in enumerate(choice))
    summary = {"budget_bits": budget, "spent_bits": spent, "original_params": sum(params),
               "importance": importance or None,
               "avg_bits_per_original_param": spent / sum(params),
               "candidates": {n: [{"config": c.config.label(), "error": c.error, "bits": c.storage_bits}
                                  for c in per_layer[i]] for i, n in enumerate(names)}}
    return configs, summary


# ---- pass 3: compress ----------------------------------------------------------------------------
def sensitivity_key(cfg: CompressionConfig, source: str, inputs: list[dict]) -> str:
    """What a sensitivity table depends on: the settings except the target bits and the importance weighting
    (applied after the table), the model's path and the calibration batches. A short hash (file names)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("bits", "importance")}
    digest = hashlib.sha256(json.dumps({"settings": settings, "source": source}, sort_keys=True).encode())
    for batch in inputs:
        for name in sorted(batch):
            value = batch[name]
            if isinstance(value, torch.Tensor):
                digest.update(name.encode())
                digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _weight_stamp(weights: list[torch.Tensor]) -> list[float]:
    # sum of squares of each weight: a cheap check that a stored table belongs to these weights
    return [float(W.double().square().sum()) for W in weights]


def save_sensitivity(path: Path, stamp: dict, names: list[str], params: list[int], per_layer) -> None:
    """One block's candidate table (atomic), with the ranks and weight stamp it was measured with."""
    atomic_write_json(path, {**stamp, "names": names, "params": params, "candidates": [
        [{"config": c.config.to_dict(), "error": c.error, "storage_bits": c.storage_bits} for c in layer]
        for layer in per_layer]})


def load_sensitivity(path: Path, stamp: dict) -> dict | None:
    """The table written by :func:`save_sensitivity`, or None when it was measured with other ranks or weights
    (the block is then measured again)."""
    from casp.quant import config_from_dict

    saved = json.loads(path.read_text())  # written atomically: complete or absent
    same_weights = len(saved.get("weights", [])) == len(stamp["weights"]) and all(
        math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved["weights"], stamp["weights"]))
    if saved.get("ranks") != stamp["ranks"] or not same_weights:
        return None
    per_layer = [[Candidate(config_from_dict(c["config"]), c["error"], c["storage_bits"]) for c in layer]
                 for layer in saved["candidates"]]
    return {"names": saved["names"], "params": saved["params"], "per_layer": per_layer}


def compress_linear(W, bias, G, full: str, plan: Plan, cfg: CompressionConfig) -> tuple[nn.Module, dict]:
    """Compress one linear (dense or low-rank) with its planned setting; returns (module, record)."""
    qcfg = plan.config_for(full)
    if full in plan.ranks:
        A, B, factors = _lowrank_factors(W, G, plan.ranks[full], cfg)
        qB = quantize(B, G, qcfg)
        B_hat = qB.dequantize(torch.float32).to(W.device)
        qA = quantize(A, B_hat @ G @ B_hat.T, qcfg)  # A reads the quantized B's outputs
        W_hat = qA.dequantize(torch.float32).to(W.device) @ B_hat
        module = LowRankLinear(QuantLinear.from_weight(qA, bias), QuantLinear.from_weight(qB))
        storage = qA.storage_bits() + qB.storage_bits()
        extra = {"rank": plan.ranks[full], "damp_used": float(factors.damp_used)}
    else:
        qw = quantize(W, G, qcfg)
        W_hat = qw.dequantize(torch.float32).to(W.device)
        module = QuantLinear.from_weight(qw, bias)
        storage = qw.storage_bits()
        extra = {"rank": None}
    record = {"config": qcfg.label(), "bits": storage / W.numel(), "storage_bits": int(storage),
              "params": W.numel(), "error": output_error(W, W_hat, G), **extra}
    return module, record


def compress_block(ctx: BlockContext, plan: Plan, cfg: CompressionConfig) -> dict[str, dict]:
    """Compress every linear of one block, group by group (true-sequential)."""
    records = {}
    groups = ctx.adapter.linear_groups if cfg.true_sequential else (tuple(ctx.adapter.linear_names),)
    for group in groups:
        grams = ctx.grams(group)
        for name in group:
            full = f"{ctx.adapter.block_prefix(ctx.index)}.{name}"
            start = time.time()
            W, bias = _linear_weight(ctx.block.get_submodule(name), ctx.device)
            module, record = compress_linear(W, bias, grams[name], full, plan, cfg)
            table.set_module(ctx.block, name, module.to(ctx.device))
            records[full] = {**record, "block": ctx.index, "seconds": round(time.time() - start, 3)}
    return records


# ---- vision tower ----------------------------------------------------------------------------------
def vision_grams(model, adapter: ModelAdapter, inputs: list[dict], device) -> dict[str, tuple]:
    """(W, G) of every vision-tower/projector linear, from one pass of the calibration images."""
    linears = adapter.vision_linears(model)
    grams: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            grams[name] = grams.get(name, 0) + x.T @ x

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]
    capture_block_inputs(model, adapter, inputs, device)
    for h in handles:
        h.remove()
    return {n: (linears[n].weight.detach().float(), grams[n]) for n in linears if n in grams}


# ---- the whole job ---------------------------------------------------------------------------------
def compress(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: CompressionConfig,
    calib: str | Path | None = None,
    device: str | list[str] = "cpu",
    dtype: torch.dtype = torch.float32,
    resume: bool = False,
    sensitivity_cache: str | Path | None = None,
) -> CompressionResult:
    """Compress the model in ``model_dir`` into ``out_dir``; returns the compressed model and the report.

    ``sensitivity_cache``: a folder of per-block sensitivity tables shared between runs (see
    :func:`compress_model`)."""
    needs_data = cfg.quantizer != "rtn" or cfg.method == "casp" or cfg.alloc == "optimal"
    if needs_data and calib is None:
        raise ValueError(f"--calib is required for --quantizer {cfg.quantizer} / --method {cfg.method} / "
                         f"--alloc {cfg.alloc}; pass a calibration .jsonl or .txt")
    data = load_calibration(calib, cfg.samples, cfg.seed) if calib is not None else None  # fail fast
    eager = cfg.method == "casp"
    model, processor, adapter = load_model(model_dir, dtype=dtype, attn_implementation="eager" if eager else None)
    inputs = encode_samples(data.samples, processor, adapter, cfg.max_length) if data else []
    if not inputs:  # data-free RTN still walks the blocks once; one text sample drives it
        inputs = [dict(adapter.build_inputs(processor, ["calibration"], None))]
    return compress_model(model, adapter, inputs, out_dir, cfg, processor=processor, device=device, resume=resume,
                          source=str(model_dir), sensitivity_cache=sensitivity_cache)


def compress_model(
    model: nn.Module,
    adapter: ModelAdapter,
    inputs: list[dict],
    out_dir: str | Path,
    cfg: CompressionConfig,
    processor=None,
    device: str | list[str] = "cpu",
    resume: bool = False,
    source: str = "",
    sensitivity_cache: str | Path | None = None,
) -> CompressionResult:
    """Compress an already loaded model (kept on CPU; blocks visit ``device`` one at a time).

    ``device``: ``cpu``, ``cuda`` (every visible GPU), ``cuda:0,cuda:1`` or a list: blocks run on the first;
    the sensitivity pass (most of the time at 7B) spreads its per-linear quantizations over all of them.

    ``inputs``: calibration batches ready for ``model(**batch)``. For --method casp the model must use eager
    attention (attention maps are measured).

    ``sensitivity_cache``: where the sensitivity pass keeps its per-block tables (default: inside ``out_dir``,
    removed when the run finishes). A folder shared between runs lets a run at another target bits (same model,
    calibration data and other settings) skip the measurement: the allocation is then a few seconds.
    """
    from casp.formats.checkpoint import load_block, save_block, save_compressed

    t0 = time.time()
    devices = resolve_devices(device)
    device = devices[0]  # blocks run here, one at a time; the sensitivity pass uses every device
    out_dir = Path(out_dir)
    partial = out_dir / PARTIAL
    plan_path = partial / "plan.json"
    if resume and plan_path.is_file():
        saved = json.loads(plan_path.read_text())
        if saved["config"] != cfg.to_dict():
            raise ValueError(f"--resume: {out_dir} was started with different settings ({plan_path}); "
                             "use the same options or a new --out")
        plan = Plan(**saved["plan"])
    else:
        cache = Path(sensitivity_cache) if sensitivity_cache is not None else partial
        key = sensitivity_key(cfg, source, inputs)
        plan = make_plan(model, adapter, inputs, cfg, device, devices, cache=cache, key=key)
        atomic_write_json(plan_path, {"config": cfg.to_dict(), "plan": dataclasses.asdict(plan)})

    t_compress = time.time()
    records: dict[str, dict] = {}
    if cfg.vision == "quantize" and adapter.is_multimodal:
        records.update(compress_vision(model, adapter, inputs, plan, cfg, device))
    block_inputs = capture_block_inputs(model, adapter, inputs, device)
    num_blocks = len(adapter.decoder_layers(model))
    done = [i for i in range(num_blocks) if (partial / f"block_{i:04d}.safetensors").is_file()] if resume else []
    start = len(done) if done == list(range(len(done))) else 0

    def replay(i: int, block: nn.Module) -> None:
        records.update(load_block(partial, i, block, adapter))

    def on_block(ctx: BlockContext) -> None:
        block_records = compress_block(ctx, plan, cfg)
        save_block(partial, ctx.index, ctx.block, block_records, adapter)
        records.update(block_records)

    run_layerwise(model, adapter, block_inputs, on_block, device=device, start=start, replay=replay,
                  desc="compress")
    report = build_report(source, cfg, plan, records, time.time() - t0, resumed_from=start)
    report["pass_seconds"] = {**plan.seconds, "compress": round(time.time() - t_compress, 2)}
    save_compressed(model, processor, adapter, out_dir, cfg, report)
    return CompressionResult(model.eval(), processor, adapter, report)


@dataclasses.dataclass
class CompressionResult:
    model: nn.Module  # the compressed model in memory (same modules as casp.load(out_dir) gives)
    processor: Any
    adapter: ModelAdapter
    report: dict


def make_plan(model, adapter, inputs, cfg: CompressionConfig, device, devices: list | None = None,
              cache: Path | None = None, key: str = "") -> Plan:
    seconds: dict[str, float] = {}
    clock = time.time()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.time() - clock, 2)
        clock = time.time()

    block_inputs = capture_block_inputs(model, adapter, inputs, device)
    lap("capture")
    ranks, attention = stats_pass(model, adapter, block_inputs, cfg, device) if cfg.method == "casp" else ({}, [])
    extra = vision_grams(model, adapter, inputs, device) if cfg.vision == "quantize" and adapter.is_multimodal else {}
    lap("stats")
    names = [f"{adapter.block_prefix(i)}.{n}" for i in range(len(adapter.decoder_layers(model)))
             for n in adapter.linear_names] + list(extra)
    if cfg.alloc == "optimal":
        importance = None
        if cfg.importance == "fisher":
            importance = fisher_importance(model, inputs, names, adapter.image_token_id(model.config), device)
            lap("fisher")
        configs, allocation = sensitivity_pass(model, adapter, block_inputs, cfg, ranks, device, extra, importance,
                                               devices, cache=cache, key=key)
        lap("sensitivity")
    else:
        qcfg = base_quant_config(cfg).to_dict()
        configs, allocation = {n: qcfg for n in names}, {"uniform": qcfg}
    return Plan(ranks=ranks, configs=configs, attention=attention, allocation=allocation, seconds=seconds)


def compress_vision(model, adapter, inputs, plan: Plan, cfg, device) -> dict[str, dict]:
    records = {}
    for name, (W, G) in tqdm(vision_grams(model, adapter, inputs, device).items(), desc="vision", leave=False):
        linear = model.get_submodule(name)
        bias = None if linear.bias is None else linear.bias.detach()
        module, record = compress_linear(W.to(device), None if bias is None else bias.to(device), G.to(device),
                                         name, plan, cfg)
        table.set_module(model, name, module.to(linear.weight.device))
        records[name] = {**record, "block": None}
    return records


def build_report(model_dir, cfg: CompressionConfig, plan: Plan, records: dict, seconds: float,
                 resumed_from: int = 0) -> dict:
    params = sum(r["params"] for r in records.values())
    storage = sum(r["storage_bits"] for r in records.values())
    layers = [{"name": n, **r} for n, r in records.items()]
    return {
        "model": str(model_dir),
        "config": cfg.to_dict(),
        "avg_bits_per_original_param": storage / params if params else None,
        "compressed_linear_params": params,
        "compressed_linear_bytes": storage / 8,
        "fp16_linear_bytes": params * 2,
        "attention": plan.attention,
        "allocation": {k: v for k, v in plan.allocation.items() if k != "candidates"},
        "layers": layers,
        "seconds": round(seconds, 2),
        "resumed_from_block": resumed_from,
    }
