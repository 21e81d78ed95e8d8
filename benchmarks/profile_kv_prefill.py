"""Where the time of a chunked prefill (and, with --decode, of decode steps) goes, fp16 cache vs AKVQ-VL, on
the GPU (torch profiler).

The kv-bench throughput (benchmarks/kv_cache.py --gpu) counts the prefill of every prompt; at the
largest batch the AKVQ-VL prefill took 32.6 ms per 600-token prompt against fp16's 20.2 ms. This script
prefills one batch of prompts chunk by chunk exactly as kv-bench does (LLaVA-1.5-7B-shaped language
model, random fp16 weights, 576 image positions), first untimed to warm up, then under the profiler,
and prints the wall time and the GPU time per operator for each cache.

    python benchmarks/profile_kv_prefill.py --batch 64 --out benchmarks/results/kv_prefill_profile_h100.txt
    python benchmarks/profile_kv_prefill.py --batch 160 --decode 8 --out benchmarks/results/kv_decode_steps_h100.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import DynamicCache

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from casp.kv import AKVQCache, AKVQConfig  # noqa: E402
from casp.kv.attention import enable_fused_kv_attention  # noqa: E402
from casp.kv.bench import llava7b_language_model  # noqa: E402
from casp.models import get_adapter  # noqa: E402


@torch.no_grad()
def prefill(model, make_cache, ids: torch.Tensor, image_mask: torch.Tensor, chunk: int):
    """(seconds, cache): feed ``ids`` [B, T] chunk by chunk into a fresh cache."""
    cache = make_cache()
    if isinstance(cache, AKVQCache):
        cache.prepare(image_mask=image_mask)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for a in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, a : a + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, cache


@torch.no_grad()
def decode(model, cache, batch: int, steps: int) -> float:
    """Seconds for ``steps`` greedy-shaped decode steps (one token per row) on a prefilled cache."""
    tok = torch.full((batch, 1), 7, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=600)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--rows", type=int, default=25, help="operators listed per cache")
    ap.add_argument("--decode", type=int, default=0, help="profile this many decode steps instead of the prefill")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    model = llava7b_language_model(device)
    enable_fused_kv_attention(model)
    adapter = get_adapter(model)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), device=device)
    image_mask = torch.zeros(args.batch, args.prompt_len, dtype=torch.bool, device=device)
    image_mask[:, 5 : min(581, args.prompt_len)] = True
    caches = {
        "fp16": DynamicCache,
        "akvq-2bit-window32": lambda: AKVQCache(model, AKVQConfig(bits=2, residual=32), adapter),
    }
    lines = [
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; batch {args.batch}, prompt {args.prompt_len} "
        f"tokens in chunks of {args.chunk}; LLaVA-1.5-7B-shaped LM, random fp16"
    ]
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for name, make in caches.items():
        if args.decode:
            _, cache = prefill(model, make, ids, image_mask, args.chunk)
            decode(model, cache, args.batch, 2)  # warm-up (compiles, grows the window buffers)
            wall = decode(model, cache, args.batch, args.decode)
            with torch.profiler.profile(activities=acts) as prof:
                decode(model, cache, args.batch, args.decode)
            del cache
            what = f"{1e3 * wall / args.decode:.2f} ms per decode step at batch {args.batch}"
        else:
            prefill(model, make, ids, image_mask, args.chunk)  # warm-up (compiles, allocator)
            wall, _ = prefill(model, make, ids, image_mask, args.chunk)
            with torch.profiler.profile(activities=acts) as prof:
                prefill(model, make, ids, image_mask, args.chunk)
            what = f"{wall:.3f} s wall, {1e3 * wall / args.batch:.2f} ms per prompt"
        torch.cuda.empty_cache()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70)
        lines += ["", f"## {name}: {what}", table]
        print("\n".join(lines[-3:]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
