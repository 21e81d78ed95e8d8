"""KV-cache benchmark: fp16 vs AKVQ-VL vs KIVI vs uniform 2-bit (and the AKVQ-VL ablation), plus
transformers' own QuantizedCache for each of its backends installed (quanto, HQQ, fp8).

(a) Accuracy (functions the lead wires to the demo model and a real LM):
    ``answer_accuracy(model, processor, adapter, data, methods)``  greedy answers per cache method:
        exact match / VQA accuracy against references, token agreement with the fp16 cache, KV bytes;
    ``continuation_nll(model, prefix_inputs, continuation_ids, make_cache)``  mean NLL of a
        continuation fed token by token, so every token attends over the (quantized) cache: the
        perplexity view of KV quantization.
    CPU run on a random LLaMA (the code path; numbers are not meaningful for quality):
        casp kv-bench --cpu-smoke --out benchmarks/results/kv_cache_cpu_smoke.txt

(b) Efficiency, ``--gpu``: a LLaVA-1.5-7B-shaped language model (LlamaConfig hidden 4096, 32 layers,
    32 heads, intermediate 11008) with random fp16 weights; prompts of ``--prompt-len`` tokens whose
    positions [5, 5 + 576) are marked as image tokens (what LLaVA's projector output occupies); greedy
    generation of ``--gen`` tokens. For fp16 (DynamicCache) and AKVQ-VL 2-bit: peak memory at a fixed
    batch, the largest batch before CUDA out-of-memory (doubling, then bisection), tokens/s at that batch.
        casp kv-bench --gpu --prefill-chunk 128 --out benchmarks/results/kv_cache_h100.txt
    ``--fused`` (default on for CUDA with triton): AKVQ decode steps attend straight over the packed cache
    (casp.kv.attention, Triton kernel) instead of dequantizing every layer's whole cache per step (the
    torch path, ``--fused off``). ``--prefill-chunk N``: prompts are prefilled N tokens at a time in a
    greedy loop that times prefill and decode apart, so the prefill's activations do not set the
    largest batch (every cache runs the same loop). Memory numbers are the real packed storage.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
import transformers as tf
from transformers import DynamicCache

from casp.kv import AKVQCache, AKVQConfig, KIVICache, KIVIConfig, ablation_configs
from casp.kv.attention import enable_fused_kv_attention, uses_fused_kv_attention
from casp.models import get_adapter

CacheFactory = Callable[[], object]


# ---- methods ---------------------------------------------------------------------------------------


def cache_methods(
    model, adapter, profile=None, bits: int = 2, ablation: bool = True, residual: int = 128
) -> dict[str, CacheFactory]:
    """name -> zero-argument factory of a fresh cache. 'fp16' is transformers' DynamicCache."""
    methods: dict[str, CacheFactory] = {
        "fp16": lambda: DynamicCache(),
        f"kivi-{bits}bit": lambda: KIVICache(model, KIVIConfig(bits=bits, residual=residual), adapter),
    }
    configs = ablation_configs(bits, profile=profile, residual=residual)
    names = list(configs) if ablation else ["uniform", "+PSA"]
    for name in names:
        label = {"uniform": f"uniform-{bits}bit", "+PSA": f"akvq-{bits}bit"}.get(name, f"akvq {name}")
        methods[label] = lambda cfg=configs[name]: AKVQCache(model, cfg, adapter)
    methods.update(transformers_quantized_caches(model, bits, residual))
    return methods


def transformers_quantized_caches(model, bits: int = 2, residual: int = 128) -> dict[str, CacheFactory]:
    """transformers' own ``QuantizedCache`` for each backend usable here: quanto / HQQ at ``bits`` bits
    (when optimum-quanto / hqq are installed) and per-tensor fp8 (transformers versions that have it)."""
    import importlib.util

    from transformers import cache_utils

    config = model.config
    methods: dict[str, CacheFactory] = {}
    for backend, package in (("quanto", "optimum"), ("hqq", "hqq")):
        if importlib.util.find_spec(package) is not None:
            methods[f"transformers-{backend}-{bits}bit"] = lambda b=backend: tf.QuantizedCache(
                b, config, nbits=bits, residual_length=residual
            )
    if hasattr(cache_utils, "Fp8QuantizedLayer"):
        methods["transformers-fp8"] = lambda: tf.QuantizedCache("fp8", config)
    return methods


def cache_bytes(cache) -> int:
    """Bytes a cache holds: memory_bytes() for casp caches, the key/value tensors of a DynamicCache."""
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    return sum(t.nbytes for layer in cache.layers if layer.is_initialized for t in (layer.keys, layer.values))


# ---- (a) accuracy ----------------------------------------------------------------------------------


@torch.no_grad()
def answer_accuracy(
    model,
    processor,
    adapter,
    data: list[dict],
    methods: dict[str, CacheFactory],
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> dict[str, dict]:
    """Greedy answers with each cache method on ``data`` rows {"image": PIL.Image | None, "question": str,
    "answers": [str]}; returns per method: exact_match, vqa_accuracy, agreement (share of generated tokens
    equal to the first method's, normally fp16) and kv_bytes (summed over batches)."""
    from casp.eval.metrics import exact_match, vqa_accuracy

    tokenizer = getattr(processor, "tokenizer", processor)
    results, reference = {}, None
    for name, make in methods.items():
        em = acc = agree = 0.0
        n_tok, kv_bytes, generated = 0, 0, []
        for start in range(0, len(data), batch_size):
            rows = data[start : start + batch_size]
            images = [r.get("image") for r in rows]
            inputs = adapter.build_inputs(processor, [r["question"] for r in rows], None if None in images else images)
            inputs = inputs.to(next(model.parameters()).device)
            cache = make()
            out = model.generate(
                **inputs,
                past_key_values=cache,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, inputs["input_ids"].shape[1] :]
            kv_bytes += cache_bytes(cache)
            generated.append(new)
            for row, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
                em += exact_match(text, row["answers"])
                acc += vqa_accuracy(text, row["answers"])
        if reference is not None:
            for mine, ref in zip(generated, reference):
                width = min(mine.shape[1], ref.shape[1])
                agree += float((mine[:, :width] == ref[:, :width]).sum())
                n_tok += mine.shape[0] * width
        else:
            reference = generated
        results[name] = {
            "exact_match": em / len(data),
            "vqa_accuracy": acc / len(data),
            "agreement": 1.0 if n_tok == 0 else agree / n_tok,
            "kv_bytes": kv_bytes,
        }
    return results


@torch.no_grad()
def continuation_nll(model, prefix_inputs: dict, continuation_ids: torch.Tensor, make_cache: CacheFactory) -> float:
    """Mean NLL (nats/token) of ``continuation_ids`` [1, n] after ``prefix_inputs`` (batch 1), fed one token
    at a time through a fresh cache from ``make_cache`` so that each token attends over the cached past."""
    cache = make_cache()
    logits = model(**prefix_inputs, past_key_values=cache).logits[:, -1]
    nll = 0.0
    n = continuation_ids.shape[1]
    for t in range(n):
        target = continuation_ids[:, t]
        nll += float(torch.nn.functional.cross_entropy(logits.float(), target))
        if t + 1 < n:
            logits = model(input_ids=continuation_ids[:, t : t + 1], past_key_values=cache).logits[:, -1]
    return nll / n


def perplexity_table(model, adapter, input_ids: torch.Tensor, prefix: int, methods: dict[str, CacheFactory]):
    """Perplexity of input_ids[:, prefix:] given input_ids[:, :prefix] under each cache method."""
    return {
        name: math.exp(continuation_nll(model, {"input_ids": input_ids[:, :prefix]}, input_ids[:, prefix:], make))
        for name, make in methods.items()
    }


# ---- (b) efficiency ----------------------------------------------------------------------------------


def llava7b_language_model(
    device: torch.device, layers: int = 32, hidden: int = 4096, heads: int = 32, inter: int = 11008, vocab: int = 32064
):
    """LLaVA-1.5-7B's language model shape with random fp16 weights (std 0.02), built on ``device``."""
    config = tf.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
    )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = tf.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def greedy_chunked(model, cache, ids: torch.Tensor, gen: int, chunk: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decoding of ``gen`` tokens after feeding the prompt ``ids`` [B, T] in chunks of ``chunk``
    tokens (no padding: every row has T tokens). Returns (new tokens [B, gen], prefill s, decode s).

    A chunked prefill keeps the activations (and, for a quantized cache, the dequantized K/V handed to
    the attention) of ``chunk`` tokens instead of the whole prompt, so the prefill peak no longer sets the
    largest batch; each chunk attends over the cache of the earlier ones (quantized, for a quantized cache)."""
    device = ids.device
    sync(device)
    t0 = time.perf_counter()
    for a in range(0, ids.shape[1], chunk):
        logits = model(input_ids=ids[:, a : a + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    tokens = [logits[:, -1].argmax(dim=-1, keepdim=True)]
    sync(device)
    t1 = time.perf_counter()
    for _ in range(gen - 1):
        logits = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        tokens.append(logits[:, -1].argmax(dim=-1, keepdim=True))
    sync(device)
    return torch.cat(tokens, dim=1), t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def generate_once(
    model, make_cache, batch: int, prompt_len: int, gen: int, image_span: tuple[int, int], chunk: int = 0
) -> dict:
    """One greedy generation of ``gen`` tokens for a batch; returns time, peak memory, cache bytes.

    chunk > 0: the prompt is prefilled ``chunk`` tokens at a time (greedy_chunked), and the prefill and
    decode times are reported apart; 0: one ``model.generate`` call."""
    device = model.device
    g = torch.Generator(device="cpu").manual_seed(batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    mask = torch.zeros(batch, prompt_len, dtype=torch.bool, device=device)
    mask[:, image_span[0] : image_span[1]] = True
    cache = make_cache()
    if isinstance(cache, AKVQCache):
        cache.prepare(image_mask=mask)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    prefill_s = decode_s = float("nan")
    if chunk > 0:
        new, prefill_s, decode_s = greedy_chunked(model, cache, ids, gen, chunk)
        n_new = new.shape[1]
    else:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=gen,
            min_new_tokens=gen,
            do_sample=False,
            pad_token_id=0,
        )
        n_new = out.shape[1] - prompt_len
        del out
    sync(device)
    seconds = time.perf_counter() - t0
    result = {
        "batch": batch,
        "seconds": seconds,
        "tokens_per_s": batch * n_new / seconds,
        "prefill_s": prefill_s,
        # tokens after the first (which the prefill produces) over the decode time
        "decode_tokens_per_s": batch * (n_new - 1) / decode_s if n_new > 1 else float("nan"),
        "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "cache_gb": cache_bytes(cache) / 2**30,
    }
    del cache
    return result


def try_batch(model, make_cache, batch, prompt_len, gen, image_span, chunk: int = 0) -> dict | None:
    """generate_once, or None on CUDA out-of-memory (memory is released before returning)."""
    device = model.device
    result = None
    try:
        result = generate_once(model, make_cache, batch, prompt_len, gen, image_span, chunk)
    except torch.cuda.OutOfMemoryError:
        result = None  # the exception (and the frames holding tensors) is gone once we leave this block
    free(device)
    return result


def describe(batch: int, r: dict | None) -> str:
    if r is None:
        return f"  batch {batch}: OOM"
    decode = r.get("decode_tokens_per_s", float("nan"))
    return (
        f"  batch {batch}: {r['tokens_per_s']:.0f} tok/s ({decode:.0f} decode), peak {r['peak_gb']:.1f} GB, "
        f"{r['seconds']:.1f} s"
    )


def bisect_batch(run, best: dict | None, lo: int, hi: int, rel: float, max_runs: int) -> dict | None:
    """Bisect between ``lo`` (ran; its result is ``best``) and ``hi`` (out of memory) until ``hi - lo <=
    rel * lo``; ``run(batch)`` returns a result or None on OOM. Returns the result of the largest batch that ran."""
    for _ in range(max_runs):
        if hi - lo <= max(1, int(rel * lo)):
            break
        mid = (lo + hi + 1) // 2
        r = run(mid)
        if r is None:
            hi = mid
        else:
            best, lo = r, mid
    return best


def max_batch_doubling(
    model, make_cache, prompt_len, gen, image_span, start: int, cap: int, log, chunk: int = 0
) -> dict | None:
    """Largest batch (to within 1/16) that generates without OOM: doubling from ``start``, then bisection."""

    def run(b: int) -> dict | None:
        r = try_batch(model, make_cache, b, prompt_len, gen, image_span, chunk)
        log(describe(b, r))
        return r

    best, lo, b = None, 0, start
    while b <= cap:
        r = run(b)
        if r is None:
            return bisect_batch(run, best, lo, b, 1 / 16, max_runs=16)
        best, lo = r, b
        b *= 2
    return best


def max_batch_extrapolated(
    model, make_cache, prompt_len, gen, image_span, first: dict, cap: int, log, chunk: int = 0, bisect_runs: int = 6
) -> dict | None:
    """Largest batch that generates without OOM, in few runs (each 7B run at a large batch is costly).

    Peak memory is linear in the batch (weights + per-sample cache and activations): fit it on the run at
    ``first['batch']`` and one at twice that, try the batch predicted to fill 97% of the GPU, then bisect
    between the largest batch that ran and the smallest that did not, to within 3% (at most ``bisect_runs``
    more runs). Every reported number comes from a batch that ran.
    """

    def run(b: int) -> dict | None:
        r = try_batch(model, make_cache, b, prompt_len, gen, image_span, chunk)
        log(describe(b, r))
        return r

    b1 = first["batch"]
    second = run(2 * b1)
    if second is None:
        return max_batch_doubling(model, make_cache, prompt_len, gen, image_span, b1, 2 * b1 - 1, log, chunk) or first
    slope = (second["peak_gb"] - first["peak_gb"]) / b1
    base = first["peak_gb"] - slope * b1
    free_b, _ = torch.cuda.mem_get_info(model.device)
    capacity = (torch.cuda.memory_allocated(model.device) + free_b) / 2**30
    guess = min(cap, max(2 * b1 + 1, int(0.97 * (capacity - base) / max(slope, 1e-6))))
    log(f"  peak ~ {base:.1f} GB + {slope:.3f} GB/sample, capacity {capacity:.1f} GB -> try batch {guess}")
    r = run(guess)
    if r is not None:
        return r  # the prediction fits (or hit --max-batch): one step further would exceed the GPU per the fit
    return bisect_batch(run, second, 2 * b1, guess, 1 / 33, max_runs=bisect_runs)


def median_of_runs(model, make_cache, top: dict, args, image_span, chunk: int, log) -> dict:
    """Re-run the largest batch ``args.repeats - 1`` more times; the run with the median tokens/s, with every
    run's tokens/s under "tokens_per_s_runs" (one 7B run at a large batch varies by several percent)."""
    runs = [top]
    for _ in range(args.repeats - 1):
        r = try_batch(model, make_cache, top["batch"], args.prompt_len, args.gen, image_span, chunk)
        log(describe(top["batch"], r))
        if r is not None:
            runs.append(r)
    runs.sort(key=lambda r: r["tokens_per_s"])
    return dict(runs[len(runs) // 2], tokens_per_s_runs=[r["tokens_per_s"] for r in runs])


def fused_wanted(mode: str, device: torch.device) -> bool:
    """--fused auto|on|off -> whether AKVQ decode steps use the fused attention (casp.kv.attention)."""
    import importlib.util

    if mode == "auto":
        return device.type == "cuda" and importlib.util.find_spec("triton") is not None
    return mode == "on"


def efficiency(args, log) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    shape = dict(layers=2, hidden=256, heads=2, inter=512, vocab=512) if args.cpu_smoke else {}
    model = llava7b_language_model(device, **shape)
    adapter = get_adapter(model)
    fused = fused_wanted(args.fused, device)
    if fused:  # "casp_kv" attention: sdpa everywhere except AKVQ decode steps (the fp16 rows run plain sdpa)
        enable_fused_kv_attention(model)
        # what the caches will see (recorded in the results, not the request)
        fused = uses_fused_kv_attention(adapter.attention(adapter.decoder_layers(model)[0]))
        log(f"fused decode attention: {'on' if fused else 'NOT enabled (set_attn_implementation refused casp_kv)'}")
    image_span = (5, min(5 + args.image_tokens, args.prompt_len))
    methods = {
        "fp16": lambda: DynamicCache(),
        "akvq-2bit": lambda: AKVQCache(model, AKVQConfig(bits=2, residual=args.residual), adapter),
    }
    fixed_only = set()  # rows measured at the fixed batch, without the (costly) largest-batch search
    if args.small_window:  # what a shorter fp16 window saves on short prompts
        w = args.small_window
        if not args.search_small_window:
            fixed_only.add(f"akvq-2bit-window{w}")
        methods[f"akvq-2bit-window{w}"] = lambda: AKVQCache(model, AKVQConfig(bits=2, residual=w), adapter)
    chunk = args.prefill_chunk
    rows = {}
    for name, make in methods.items():
        log(f"{name}: fixed batch {args.batch}")
        fixed = try_batch(model, make, args.batch, args.prompt_len, args.gen, image_span, chunk)
        log(describe(args.batch, fixed))
        if name in fixed_only:
            rows[name] = {"fixed": fixed, "max": None, "searched": False}
            continue
        log(f"{name}: searching the largest batch")
        if device.type == "cuda" and args.search == "extrapolate" and fixed is not None:
            top = max_batch_extrapolated(
                model, make, args.prompt_len, args.gen, image_span, fixed, args.max_batch, log, chunk, args.bisect_runs
            )
        else:
            top = max_batch_doubling(
                model, make, args.prompt_len, args.gen, image_span, args.batch, args.max_batch, log, chunk
            )
        if top is not None and args.repeats > 1:
            top = median_of_runs(model, make, top, args, image_span, chunk, log)
        rows[name] = {"fixed": fixed, "max": top}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "prompt_len": args.prompt_len,
        "image_tokens": image_span[1] - image_span[0],
        "gen": args.gen,
        "batch": args.batch,
        "residual": args.residual,
        "fused": fused,
        "prefill_chunk": chunk,
        "repeats": args.repeats,
        "model": "LLaVA-1.5-7B language model shape, random fp16" if not args.cpu_smoke else "tiny random (smoke)",
        "methods": rows,
    }


def efficiency_table(res: dict) -> str:
    nan = float("nan")
    lines = [
        f"device {res['device']}, torch {res['torch']}, transformers {res['transformers']}; {res['model']}",
        f"prompt {res['prompt_len']} tokens ({res['image_tokens']} image positions), {res['gen']} generated; "
        f"AKVQ fp16 window {res.get('residual', 128)} tokens; fused decode attention "
        f"{'on' if res.get('fused') else 'off'}; prefill "
        + (f"in chunks of {res['prefill_chunk']} tokens" if res.get("prefill_chunk") else "in one call (generate)"),
        "tok/s = generated tokens / (prefill + decode) seconds; decode tok/s = tokens after the first / decode seconds"
        + (f"; the largest-batch columns are the median of {res['repeats']} runs" if res.get("repeats", 1) > 1 else ""),
        "",
        f"| cache | peak GB @ batch {res['batch']} | cache GB @ {res['batch']} | tok/s @ {res['batch']} "
        "| max batch | peak GB @ max | cache GB @ max | tok/s @ max | decode tok/s @ max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["methods"].items():
        f, m = r["fixed"] or {}, r["max"] or {}
        top = m.get("batch", "OOM" if r.get("searched", True) else "-")
        lines.append(
            f"| {name} | {f.get('peak_gb', nan):.2f} | {f.get('cache_gb', nan):.3f} "
            f"| {f.get('tokens_per_s', nan):.0f} | {top} "
            f"| {m.get('peak_gb', nan):.2f} | {m.get('cache_gb', nan):.2f} | {m.get('tokens_per_s', nan):.0f} "
            f"| {m.get('decode_tokens_per_s', nan):.0f} |"
        )
    fp = res["methods"].get("fp16", {})
    for name, ak in res["methods"].items():
        if name == "fp16":
            continue
        if fp.get("max") and ak.get("max"):
            a, b = ak["max"], fp["max"]
            lines.append("")
            lines.append(
                f"{name} vs fp16: {a['batch'] / b['batch']:.2f}x batch, {a['tokens_per_s'] / b['tokens_per_s']:.2f}x "
                f"tokens/s, {a.get('decode_tokens_per_s', nan) / b.get('decode_tokens_per_s', nan):.2f}x decode "
                "tokens/s at the max batch"
            )
            if a.get("tokens_per_s_runs") and b.get("tokens_per_s_runs"):
                ratios = sorted(x / y for x in a["tokens_per_s_runs"] for y in b["tokens_per_s_runs"])
                lines.append(
                    f"  runs: {name} "
                    + " / ".join(f"{x:.0f}" for x in a["tokens_per_s_runs"])
                    + " tok/s, fp16 "
                    + " / ".join(f"{y:.0f}" for y in b["tokens_per_s_runs"])
                    + f" tok/s; every pairing gives {ratios[0]:.2f}x to {ratios[-1]:.2f}x"
                )
        if fp.get("fixed") and ak.get("fixed"):
            a, b = ak["fixed"], fp["fixed"]
            lines.append(
                f"{name} at batch {res['batch']}: peak memory {b['peak_gb'] / a['peak_gb']:.2f}x lower; "
                f"cache alone {b['cache_gb'] / a['cache_gb']:.2f}x smaller"
            )
    return "\n".join(lines)


@torch.no_grad()
def memory_ratios(lengths=(664, 2048), image_span=(5, 581), pivots=(0, 7, 300), layers: int = 32) -> dict:
    """Cache bytes vs an fp16 cache at LLaVA-1.5-7B's KV shape (32 layers x 32 heads x 128), batch 1.

    No weights are needed: the model is built on the meta device and K/V are random fp16 states fed
    to each layer's cache as one prefill of T tokens. AKVQ-VL runs with its default patterns (layers
    0-1 TSA, the rest PSA), ``image_span`` marked as image tokens and ``pivots`` kept in fp16 in PSA layers.
    """
    model = llava7b_language_model(torch.device("meta"), layers=layers)
    adapter = get_adapter(model)
    methods = {k: v for k, v in cache_methods(model, adapter).items() if k != "fp16"}
    out = {}
    for t in lengths:
        fp16 = 2 * layers * 32 * t * 128 * 2
        row = {"fp16 MB": fp16 / 2**20}
        for name, make in methods.items():
            cache = make()
            if isinstance(cache, AKVQCache):
                mask = torch.zeros(1, t, dtype=torch.bool)
                mask[:, image_span[0] : min(image_span[1], t)] = True
                cache.prepare(image_mask=mask)
                for layer in cache.layers:
                    layer.pivots = torch.zeros(1, t, dtype=torch.bool)
                    layer.pivots[0, list(pivots)] = True
            g = torch.Generator().manual_seed(t)
            for i in range(layers):
                k, v = torch.randn(2, 1, 32, t, 128, generator=g).half()
                cache.update(k, v, i)
            row[name] = fp16 / cache.memory_bytes()
        out[t] = row
    return out


def load_causal_lm(path: str):
    """(model, tokenizer, adapter) from a model directory or a .gguf file (dequantized to fp32 by transformers)."""
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        return model, tokenizer, get_adapter(model)
    from casp.models import load_model

    model, processor, adapter = load_model(path, dtype=torch.float32, device="cpu")
    return model, getattr(processor, "tokenizer", processor), adapter


def text_perplexity(args, log) -> dict:
    """Perplexity of continuations of a text file under every cache method (one window per chunk)."""
    model, tokenizer, adapter = load_causal_lm(args.ppl_model)
    ids = tokenizer(open(args.ppl_text).read(), return_tensors="pt").input_ids
    span = args.ppl_prefix + args.ppl_decode
    chunks = [ids[:, i * span : (i + 1) * span] for i in range(min(args.ppl_chunks, ids.shape[1] // span))]
    if not chunks:
        raise SystemExit(f"{args.ppl_text} has {ids.shape[1]} tokens, fewer than one window of {span}")
    methods = cache_methods(model, adapter, residual=args.residual)
    nll = {}
    for name, make in methods.items():
        t0 = time.perf_counter()
        values = [
            continuation_nll(model, {"input_ids": c[:, : args.ppl_prefix]}, c[:, args.ppl_prefix :], make)
            for c in chunks
        ]
        nll[name] = sum(values) / len(values)
        log(f"{name}: ppl {math.exp(nll[name]):.3f} ({time.perf_counter() - t0:.0f} s)")
    title = (
        f"perplexity of {args.ppl_decode} decoded tokens after a {args.ppl_prefix}-token prefix, {len(chunks)} "
        f"windows of {os.path.basename(args.ppl_text)}, model {os.path.basename(args.ppl_model)}"
    )
    return {title: {name: math.exp(v) for name, v in nll.items()}}


# ---- CPU smoke of the accuracy functions -------------------------------------------------------------


def vqa_by_cache(model_dir, vqa_file, n: int, residual: int) -> dict[str, dict]:
    """Held-out VQA with every cache method (and the ablation) on a VLM directory, e.g. the demo model."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from casp.eval.tasks import read_task_file
    from casp.kv.methods import load_profile
    from casp.models import load_model

    if vqa_file is None:
        from casp.demo import world

        vqa_file = world.write_vqa_jsonl(tempfile.mkdtemp(prefix="casp-kv-vqa-"), n, seed=2, split="test")
    rows, _ = read_task_file(Path(vqa_file), "vqa", None, n)
    data = []
    for row in rows:
        with Image.open(row.image) as img:
            data.append({"image": img.convert("RGB"), "question": row.prompt, "answers": row.data["answers"]})
    model, processor, adapter = load_model(model_dir)
    methods = cache_methods(model, adapter, profile=load_profile(model_dir), residual=residual)
    return answer_accuracy(model, processor, adapter, data, methods)


def accuracy_smoke(log) -> dict:
    """The accuracy functions on a random LLaMA with head dim 128 (code path only)."""
    torch.manual_seed(0)
    model = llava7b_language_model(torch.device("cpu"), layers=4, hidden=256, heads=2, inter=512, vocab=512)
    adapter = get_adapter(model)
    ids = torch.randint(3, 512, (1, 260))
    methods = cache_methods(model, adapter)
    return {"perplexity (random model, prefix 200, 60 decoded)": perplexity_table(model, adapter, ids, 200, methods)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="casp kv-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gpu", action="store_true", help="efficiency run on a LLaVA-1.5-7B-shaped model (CUDA)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of every code path")
    p.add_argument("--prompt-len", type=int, default=600)
    p.add_argument("--image-tokens", type=int, default=576)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="fixed batch for the peak-memory comparison")
    p.add_argument("--max-batch", type=int, default=2048, help="upper limit of the batch search")
    p.add_argument(
        "--search",
        choices=["extrapolate", "doubling"],
        default="extrapolate",
        help="largest-batch search: linear memory fit + few runs (default), or doubling + bisection",
    )
    p.add_argument("--out", default=None, help="write the table here (and the raw numbers next to it as .json)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (1 avoids oversubscription on a busy CPU)")
    p.add_argument("--memory", action="store_true", help="cache memory vs fp16 at LLaVA-7B KV shapes (CPU)")
    p.add_argument("--ppl-model", default=None, help="model dir or .gguf file: text perplexity per cache method")
    p.add_argument("--ppl-text", default=None, help="text file for --ppl-model")
    p.add_argument("--ppl-prefix", type=int, default=512)
    p.add_argument("--ppl-decode", type=int, default=256)
    p.add_argument("--ppl-chunks", type=int, default=2)
    p.add_argument("--vqa-model", default=None, help="VLM dir: held-out VQA exact match per cache method")
    p.add_argument("--vqa-file", default=None, help="VQA JSONL for --vqa-model (default: the demo world's test split)")
    p.add_argument("--vqa-n", type=int, default=120, help="questions for --vqa-model")
    p.add_argument("--residual", type=int, default=128, help="fp16 recent window of the quantized caches")
    p.add_argument(
        "--small-window", type=int, default=0, help="--gpu: also measure AKVQ with this fp16 window (fixed batch only)"
    )
    p.add_argument("--search-small-window", action="store_true", help="--gpu: search the largest batch for it too")
    p.add_argument(
        "--fused",
        choices=["auto", "on", "off"],
        default="auto",
        help="AKVQ decode attention straight over the packed cache (casp.kv.attention); auto: on for CUDA with triton",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="--gpu: prefill the prompts this many tokens at a time in a greedy loop (0: one generate call)",
    )
    p.add_argument("--bisect-runs", type=int, default=6, help="--gpu: at most this many bisection runs per search")
    p.add_argument("--repeats", type=int, default=1, help="--gpu: runs at the largest batch; the median is reported")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.gpu or args.cpu_smoke or args.ppl_model or args.memory or args.vqa_model):
        p.error("choose --gpu, --cpu-smoke, --memory, --ppl-model or --vqa-model")
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs CUDA")
    if args.prefill_chunk < 0 or args.bisect_runs < 0 or args.repeats < 1:
        p.error("--prefill-chunk and --bisect-runs must be >= 0, --repeats >= 1")
    if args.cpu_smoke:
        args.prompt_len, args.image_tokens, args.gen = min(args.prompt_len, 200), min(args.image_tokens, 150), 8
        args.batch, args.max_batch = 2, min(args.max_batch, 8)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.memory:
        res = memory_ratios()
        names = list(next(iter(res.values())))
        text = "fp16 cache bytes / cache bytes, LLaVA-1.5-7B KV shape (32 layers, 32 heads, dim 128), batch 1\n"
        text += "| tokens | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
        text += "\n".join(f"| {t} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |" for t, row in res.items())
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return 0
    if args.vqa_model:
        res = vqa_by_cache(args.vqa_model, args.vqa_file, args.vqa_n, args.residual)
        names = ["exact_match", "vqa_accuracy", "agreement", "kv_bytes"]
        text = (
            f"VQA per KV cache method: {args.vqa_model}, {args.vqa_n} questions, fp16 window {args.residual}\n"
            "| cache | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
        )
        text += "\n".join(
            f"| {m} | " + " | ".join(f"{row.get(n, float('nan')):.4g}" for n in names) + " |" for m, row in res.items()
        )
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return 0
    if args.ppl_model:
        if not args.ppl_text:
            p.error("--ppl-model needs --ppl-text")
        res = text_perplexity(args, log)
        text = "\n\n".join(
            f"{t}\n" + "\n".join(f"  {k:>16}: {v:.3f}" for k, v in tab.items()) for t, tab in res.items()
        )
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return 0
    res = efficiency(args, log)
    text = efficiency_table(res)
    if args.cpu_smoke:
        acc = accuracy_smoke(log)
        res["accuracy_smoke"] = acc
        for title, table in acc.items():
            text += f"\n\n{title}\n" + "\n".join(f"  {k:>16}: {v:.3f}" for k, v in table.items())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
