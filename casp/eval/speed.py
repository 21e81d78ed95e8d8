"""Peak memory and generation throughput (prefill and decode separately) for one prompt batch.

Prefill and decode are separated by timing ``generate`` twice with the same inputs: once for
1 new token (prefill + one sampling step) and once for N new tokens, forced to run all N steps.
Then decode tokens/s = B * (N - 1) / (t_N - t_1) and prefill tokens/s = (prompt tokens) / t_1. This
works for every model ``generate`` supports (VLMs included: image encoding counts as prefill).

Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` over the runs; on CPU the bytes of
parameters and buffers and the growth of the process's resident set size (RSS) during the runs.
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


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    inputs: Mapping[str, Any],
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """Throughput and memory of greedy generation on one batch of prepared inputs.

    ``inputs`` are model inputs on the model's device (e.g. ``adapter.build_inputs(...)`` moved there).
    Times are the median of ``repeats`` runs after ``warmup`` runs.
    """
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
    for _ in range(warmup):
        _timed_generate(model, inputs, new_tokens, pad_token_id)
    t1 = sorted(_timed_generate(model, inputs, 1, pad_token_id) for _ in range(repeats))[repeats // 2]
    tn = sorted(_timed_generate(model, inputs, new_tokens, pad_token_id) for _ in range(repeats))[repeats // 2]
    decode_s = max(tn - t1, 1e-9)
    out: dict[str, Any] = {
        "device": str(device),
        "batch_size": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_s": t1,
        "prefill_tokens_per_s": prompt_tokens / t1,
        "decode_s": decode_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
        "total_tokens_per_s": batch * new_tokens / tn,
        "model_bytes": model_bytes(model),
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        rss_after = process_rss_bytes()
        out["rss_delta_bytes"] = None if rss_before is None or rss_after is None else rss_after - rss_before
    return out


def speed_sweep(
    model: nn.Module,
    make_inputs: Any,
    batch_sizes: list[int],
    new_tokens: int = 32,
    repeats: int = 3,
    pad_token_id: int | None = None,
) -> list[dict[str, Any]]:
    """measure_speed at each batch size (``make_inputs(b)`` builds a batch of b prompts) until CUDA OOM."""
    rows = []
    for b in batch_sizes:
        try:
            rows.append(measure_speed(model, make_inputs(b), new_tokens, repeats, pad_token_id=pad_token_id))
        except torch.cuda.OutOfMemoryError:
            # Out of memory is how the largest batch size is found; record it and stop.
            torch.cuda.empty_cache()
            rows.append({"batch_size": b, "oom": True})
            break
    return rows
