"""One eval run: task specs ("vqa:FILE", "mc:FILE", "caption:FILE", "ppl:FILE") -> results JSON.

This is what ``casp eval MODEL --task KIND:FILE ... --out results.json`` calls.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from casp.eval.errors import EvalError
from casp.eval.ppl import run_ppl
from casp.eval.results import make_results, save_results
from casp.eval.speed import measure_speed, speed_inputs
from casp.eval.tasks import run_caption, run_mc, run_vqa

TASK_KINDS = ("vqa", "mc", "caption", "ppl")


def parse_task_spec(spec: str) -> tuple[str, Path]:
    """ "vqa:path/to/file.jsonl" -> ("vqa", Path(...)), with a clear error for anything else."""
    kind, sep, path = spec.partition(":")
    if not sep or not path or kind not in TASK_KINDS:
        raise EvalError(f"bad task {spec!r}: write KIND:FILE with KIND one of {', '.join(TASK_KINDS)}")
    return kind, Path(path)


def run_task(
    spec: str,
    model: nn.Module,
    processor: Any,
    adapter: Any,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    image_root: str | Path | None = None,
    ppl_max_length: int | None = None,
    ppl_stride: int | None = None,
    progress: bool = True,
    prompt_suffix: str | None = None,
    caption_prompt: str | None = None,
    cuda_graph: bool = True,
) -> dict[str, Any]:
    """Run one task spec on a loaded model. ``prompt_suffix`` (vqa, mc) and ``caption_prompt`` (caption)
    replace the default LLaVA-style instructions when given; ``cuda_graph=False`` keeps GPU generation on
    transformers' ``generate``."""
    kind, path = parse_task_spec(spec)
    if kind == "ppl":
        return run_ppl(model, processor, path, max_length=ppl_max_length, stride=ppl_stride, progress=progress)
    runner = {"vqa": run_vqa, "mc": run_mc, "caption": run_caption}[kind]
    kwargs = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if prompt_suffix is not None and kind in ("vqa", "mc"):
        kwargs["prompt_suffix"] = prompt_suffix
    if caption_prompt is not None and kind == "caption":
        kwargs["caption_prompt"] = caption_prompt
    return runner(
        model,
        processor,
        adapter,
        path,
        image_root=image_root,
        batch_size=batch_size,
        limit=limit,
        progress=progress,
        cuda_graph=cuda_graph,
        **kwargs,
    )


def evaluate(
    model_path: str | Path,
    tasks: list[str],
    out: str | Path | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    speed: bool = False,
    speed_tokens: int = 32,
    batch1_kernel: str = "auto",
    **task_options: Any,
) -> dict[str, Any]:
    """Load a model (original or casp-compressed dir), run every task, write and return the results.

    With ``speed``, the results also get "speed" (casp.eval.speed.measure_speed): prefill and decode
    tokens/s and memory, on a batch of ``batch_size`` copies of the first prompt, ``speed_tokens`` new
    tokens each, decoded the way the tasks were (a CUDA graph on a GPU unless ``cuda_graph=False``).
    ``batch1_kernel``: see casp.kernels.set_batch1_kernel."""
    from casp.kernels import resolve_batch1_kernel, set_batch1_kernel
    from casp.models import load_model

    if not tasks:
        raise EvalError("no task given: add --task KIND:FILE (KIND one of vqa, mc, caption, ppl)")
    specs = [parse_task_spec(s) for s in tasks]  # fail on a typo before loading a large model
    if speed and speed_tokens < 2:
        raise EvalError(f"--speed-tokens must be at least 2 (decode is timed apart from prefill), got {speed_tokens}")
    for spec, (_, path) in zip(tasks, specs):
        if not path.is_file():
            raise EvalError(f"task {spec!r}: file {str(path)!r} not found")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    t0 = time.perf_counter()
    model, processor, adapter = load_model(model_path, dtype=dtype, device=device)
    batch1_kernel = resolve_batch1_kernel(model, batch1_kernel)  # "auto" decided here, so the results can say it
    set_batch1_kernel(model, batch1_kernel)
    timing: dict[str, float] = {"load_s": time.perf_counter() - t0}
    results: dict[str, dict[str, Any]] = {}
    from casp.quant.linear import dense_weights

    # On CPU the torch path would unpack every compressed layer at every generated token; keep one dense copy
    # per layer for the run instead (on GPUs the fused kernels read the packed weights directly).
    keep_dense = dense_weights(model) if not str(device).startswith("cuda") else contextlib.nullcontext()
    with keep_dense:
        for spec in tasks:
            results[spec] = run_task(spec, model, processor, adapter, **task_options)
            timing[f"{spec}_s"] = results[spec]["seconds"]
        speed_result = None
        if speed:
            t1 = time.perf_counter()
            inputs, source = speed_inputs(model, processor, adapter, specs, task_options.get("batch_size", 8),
                                          task_options.get("image_root"))
            tokenizer = getattr(processor, "tokenizer", processor)
            batch = int(inputs["input_ids"].shape[0])
            try:
                speed_result = measure_speed(model, inputs, speed_tokens, pad_token_id=tokenizer.pad_token_id,
                                             adapter=adapter, cuda_graph=task_options.get("cuda_graph", True))
            except torch.cuda.OutOfMemoryError:
                # The GPU's only signal; the task results above must still be written.
                torch.cuda.empty_cache()
                speed_result = {"batch_size": batch, "oom": True,
                                "error": f"out of GPU memory at batch {batch}: lower --batch-size for --speed"}
            speed_result["prompt"] = source
            speed_result["batch1_kernel"] = batch1_kernel
            timing["speed_s"] = time.perf_counter() - t1
    timing["total_s"] = time.perf_counter() - t0
    res = make_results(model_path, results, timing, device=device, dtype=str(dtype).removeprefix("torch."))
    if speed_result is not None:
        res["speed"] = speed_result
    if out is not None:
        save_results(res, out)
    return res
