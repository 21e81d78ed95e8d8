"""Peak memory and generation throughput (prefill and decode separately) for one prompt batch.

Two decode paths, the ones casp generate / casp eval run:

* ``cuda_graph`` (a GPU and an adapter that allows it, see casp.decode): the static loop's own clock gives
  the prefill, the one-off setup (eager first step and capture) and the replayed decode steps separately;
* ``generate`` (otherwise): ``generate`` is timed twice with the same inputs, once for 1 new token
  (prefill + one sampling step) and once for N new tokens, forced to run all N steps; decode tokens/s
  = B * (N - 1) / (t_N - t_1) and prefill tokens/s = (prompt tokens) / t_1. This works for every model
  ``generate`` supports (VLMs included: image encoding counts as prefill).

Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` over the runs; on CPU the bytes of
parameters and buffers and the growth of the process's resident set size (RSS) during the runs. Both
report ``kernel_copy_bytes``: the repacked copies of packed weights that the GPU kernels made (and keep)
on their first call, which ``model_bytes`` does not count, and ``offloaded_bytes``: the part of ``model_bytes``
held off the inputs' device (in "kmajor-only" mode the stored codes, whose K-major copy the GPU runs on).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from casp.eval.errors import EvalError


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed quantized buffers counted as stored)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def offloaded_bytes(model: nn.Module, device: torch.device) -> int:
    """Bytes of the parameters and buffers that are not on ``device`` (e.g. the stored codes that "kmajor-only"
    mode parks in CPU memory, or weights offloaded by accelerate)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device != device)


def process_rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc; None where unavailable)."""
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        return None
    import resource

    return int(statm.read_text().split()[1]) * resource.getpagesize()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_generate(model: nn.Module, inputs: Mapping[str, Any], new_tokens: int, pad_id: int | None) -> float:
    device = inputs["input_ids"].device
    _sync(device)
    t0 = time.perf_counter()
    model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # decode exactly N steps even if EOS comes first
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
    )
    _sync(device)
    return time.perf_counter() - t0


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _static_timings(model: nn.Module, inputs: Mapping[str, Any], new_tokens: int, repeats: int,
                    warmup: int) -> dict[str, float]:
    """Median per-phase seconds of the CUDA-graph decode loop, all ``new_tokens`` steps (no end token)."""
    from casp.decode import static_greedy_generate

    runs = []
    for i in range(warmup + repeats):
        stats: dict = {}
        t0 = time.perf_counter()
        static_greedy_generate(model, dict(inputs), new_tokens, (), stats=stats)
        stats["call_s"] = time.perf_counter() - t0
        if i >= warmup:
            runs.append(stats)
    return {k: _median([r[k] for r in runs]) for k in ("prefill_s", "setup_s", "decode_s", "decode_steps", "call_s")}


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    inputs: Mapping[str, Any],
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    pad_token_id: int | None = None,
    adapter: Any = None,
    cuda_graph: bool = True,
) -> dict[str, Any]:
    """Throughput and memory of greedy generation on one batch of prepared inputs.

    ``inputs`` are model inputs on the model's device (e.g. ``adapter.build_inputs(...)`` moved there).
    Times are the median of ``repeats`` runs after ``warmup`` runs. With ``adapter`` given, a model on a
    GPU decodes as casp eval decodes it (one CUDA graph, unless ``cuda_graph`` is off or the family keeps
    ``generate``); ``decode_path`` says which path was timed.
    """
    from casp.decode import graph_decode_applies
    from casp.kernels.slab_layout import kernel_copy_bytes

    if new_tokens < 2:
        raise EvalError(f"speed: new_tokens must be >= 2 to separate decode from prefill, got {new_tokens}")
    if "input_ids" not in inputs:
        raise EvalError("speed: inputs need 'input_ids' (build them with adapter.build_inputs)")
    device = inputs["input_ids"].device
    batch, prompt_len = inputs["input_ids"].shape
    mask = inputs.get("attention_mask")
    prompt_tokens = int(mask.sum()) if mask is not None else batch * prompt_len
    rss_before = process_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, Any] = {"device": str(device), "batch_size": batch, "prompt_tokens": prompt_tokens,
                           "new_tokens": new_tokens}
    if adapter is not None and graph_decode_applies(model, adapter, cuda_graph=cuda_graph):
        t = _static_timings(model, inputs, new_tokens, repeats, warmup)
        decode_s = max(t["decode_s"], 1e-9)
        out.update(decode_path="cuda_graph", prefill_s=t["prefill_s"], setup_s=t["setup_s"], decode_s=decode_s,
                   prefill_tokens_per_s=prompt_tokens / t["prefill_s"],
                   decode_tokens_per_s=batch * t["decode_steps"] / decode_s,
                   total_tokens_per_s=batch * new_tokens / t["call_s"])
    else:
        for _ in range(warmup):
            _timed_generate(model, inputs, new_tokens, pad_token_id)
        t1 = _median([_timed_generate(model, inputs, 1, pad_token_id) for _ in range(repeats)])
        tn = _median([_timed_generate(model, inputs, new_tokens, pad_token_id) for _ in range(repeats)])
        decode_s = max(tn - t1, 1e-9)
        out.update(decode_path="generate", prefill_s=t1, prefill_tokens_per_s=prompt_tokens / t1, decode_s=decode_s,
                   decode_tokens_per_s=batch * (new_tokens - 1) / decode_s,
                   total_tokens_per_s=batch * new_tokens / tn)
    out["model_bytes"] = model_bytes(model)
    out["offloaded_bytes"] = offloaded_bytes(model, device)
    out["kernel_copy_bytes"] = kernel_copy_bytes(model)
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        rss_after = process_rss_bytes()
        out["rss_delta_bytes"] = None if rss_before is None or rss_after is None else rss_after - rss_before
    return out


def speed_inputs(model: nn.Module, processor: Any, adapter: Any, tasks: list[tuple[str, Path]], batch_size: int,
                 image_root: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """(model inputs, where the prompt came from) for ``casp eval --speed``: ``batch_size`` copies of the
    first row (prompt and image) of the first vqa/mc/caption task, else the first 1000 characters of the
    first ppl file as a text prompt."""
    from casp.eval.tasks import _load_image, model_inputs, read_task_file

    for kind, path in tasks:
        if kind in ("vqa", "mc", "caption"):
            row = read_task_file(path, kind, image_root, limit=1)[0][0]
            images = None if row.image is None else [_load_image(row.image)] * batch_size
            inputs = model_inputs(model, processor, adapter, [row.prompt] * batch_size, images)
            return inputs, f"{kind}:{path.name} line {row.line}" + (" with its image" if images else "")
    kind, path = tasks[0]
    text = path.read_text(encoding="utf-8", errors="replace")[:1000].strip()
    if not text:
        raise EvalError(f"speed: {path} is empty; give a vqa/mc/caption task or a non-empty ppl file")
    return model_inputs(model, processor, adapter, [text] * batch_size, None), f"{kind}:{path.name} first 1000 chars"


def speed_line(speed: Mapping[str, Any]) -> str:
    """One printed line of a measure_speed result."""
    memory = (f"peak GPU memory {speed['peak_memory_bytes'] / 2**30:.2f} GiB" if "peak_memory_bytes" in speed
              else f"weights {speed['model_bytes'] / 2**20:.1f} MiB")
    kernel = f", --batch1-kernel {speed['batch1_kernel']}" if "batch1_kernel" in speed else ""
    return (f"speed ({speed['decode_path']}{kernel}, batch {speed['batch_size']}, {speed['new_tokens']} new tokens, "
            f"prompt from {speed.get('prompt', '?')}): decode {speed['decode_tokens_per_s']:.1f} tok/s, prefill "
            f"{speed['prefill_tokens_per_s']:.0f} tok/s, {memory}, kernel copies "
            f"{speed['kernel_copy_bytes'] / 2**20:.1f} MiB"
            + (f", {speed['offloaded_bytes'] / 2**20:.1f} MiB of weights off the device" if speed.get("offloaded_bytes")
               else ""))


def speed_sweep(
    model: nn.Module,
    make_inputs: Any,
    batch_sizes: list[int],
    new_tokens: int = 32,
    repeats: int = 3,
    pad_token_id: int | None = None,
    adapter: Any = None,
    cuda_graph: bool = True,
) -> list[dict[str, Any]]:
    """measure_speed at each batch size (``make_inputs(b)`` builds a batch of b prompts) until CUDA OOM."""
    rows = []
    for b in batch_sizes:
        try:
            rows.append(measure_speed(model, make_inputs(b), new_tokens, repeats, pad_token_id=pad_token_id,
                                      adapter=adapter, cuda_graph=cuda_graph))
        except torch.cuda.OutOfMemoryError:
            # Out of memory is how the largest batch size is found; record it and stop.
            torch.cuda.empty_cache()
            rows.append({"batch_size": b, "oom": True})
            break
    return rows
