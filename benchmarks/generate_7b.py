"""Whole-model decode (batch 1 or ``--batch B``) through casp's generation path: generate vs one CUDA graph.

A LLaVA-1.5-7B-shaped transformers ``LlamaForCausalLM`` (32 layers, hidden 4096, MLP 11008, vocab 32000;
random fp16 weights, nothing downloaded), once in fp16 and once with every decoder linear a
``QuantLinear`` of random 2-bit codes (group 128: 2.25 bits per weight with fp16 scales and zeros), which
runs casp's Triton kernels on CUDA. Each model decodes greedily from a random prompt in two ways:

* generate: transformers' ``model.generate`` (DynamicCache, each step launched from Python), which is what
  ``casp generate`` ran on a GPU before casp.decode;
* graph: ``casp.decode.static_greedy_generate`` (StaticCache, one captured step replayed per token), what
  ``casp generate`` now runs on a GPU with the fp16 cache.

With ``--batch B`` the B prompts are decoded together (what ``casp eval`` does on a GPU) and tok/s counts the
tokens of every row. ``--batch1-kernel kmajor,kmajor-only`` times the casp model once per packed-weight kernel mode
(casp.kernels.set_batch1_kernel), and the last column is the GPU memory the model holds after its runs.
Timing (end-of-sequence ignored, medians of ``--repeats`` calls after a warm-up call): for generate, whole
calls of 1, n and 2n new tokens, tok/s = n / (t(2n) - t(n)) and one-off = t(n) - t(1) - (n - 1) / tok/s; for
the static loop, its own per-phase clock (``stats``): tok/s = steps / decode seconds, one-off = the eager
first step plus the capture.
Checks: the graph's tokens equal the same static loop run eagerly, and how many leading tokens agree with
``generate``.

    python benchmarks/generate_7b.py --out benchmarks/results/generate_7b_h200.txt   # GPU
    python benchmarks/generate_7b.py --tiny                                          # CPU smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

# Run as a script, this folder leads sys.path and its kernels.py would shadow the `kernels` package that
# transformers probes: put the repository root there instead.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[0] = os.path.dirname(HERE)

from casp.decode import static_greedy_generate  # noqa: E402
from casp.models import get_adapter  # noqa: E402


def _decode_7b():
    spec = importlib.util.spec_from_file_location("decode_7b", os.path.join(HERE, "decode_7b.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["decode_7b"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    import transformers as tf

    if tiny:
        cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024)
    else:
        cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = tf.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # decode the full length every time
    return model


def quantize_random(model, bits: int) -> None:
    """Every decoder linear -> a QuantLinear of random ``bits``-bit codes (group 128)."""
    random_quant_linear = _decode_7b().random_quant_linear
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for j, name in enumerate(adapter.linear_names):
            parent_name, leaf = name.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            old = getattr(parent, leaf)
            n_out, n_in = old.weight.shape
            setattr(parent, leaf, random_quant_linear(n_out, n_in, bits, 1000 * i + j, old.weight.device))
            del old
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Median wall seconds of ``repeats`` calls of fn() after one warm-up call, and the last call's result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def measure(model, prompt: torch.Tensor, n: int, way: str, repeats: int) -> dict:
    """tok/s of the decode steps and the one-off costs of a call of ``way``, medians of ``repeats`` calls."""
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    rows = prompt.shape[0]
    with torch.no_grad():
        if way == "generate":  # no hooks inside generate: derive the step time from calls of 1, n and 2n tokens

            def run(k: int):
                out = model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
                return out[:, prompt.shape[1]:]

            t1, _ = timed(lambda: run(1), repeats)
            tn, tokens = timed(lambda: run(n), repeats)
            t2n, _ = timed(lambda: run(2 * n), repeats)
            per_token = (t2n - tn) / n
            return dict(tok_s=rows / per_token, ms_token=1e3 * per_token, prefill_ms=1e3 * t1,
                        setup_ms=1e3 * (tn - t1 - (n - 1) * per_token), call_tok_s=rows * n / tn, tokens=tokens.cpu())
        runs = []
        for i in range(repeats + 1):  # the first call is a warm-up (Triton compiles)
            stats: dict = {}
            t = time.perf_counter()
            tokens = static_greedy_generate(model, inputs, n, (), cuda_graph=way == "graph", stats=stats)
            stats["call_s"] = time.perf_counter() - t
            if i:
                runs.append(stats)
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        per_token = med["decode_s"] / runs[0]["decode_steps"]
        return dict(tok_s=rows / per_token, ms_token=1e3 * per_token, prefill_ms=1e3 * med["prefill_s"],
                    setup_ms=1e3 * med["setup_s"], call_tok_s=rows * n / med["call_s"], tokens=tokens.cpu())


def agree(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading tokens in which a and b agree in every row."""
    same = (a == b).all(0).long()
    return int(same.cumprod(0).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the table here")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke run, seconds)")
    ap.add_argument("--tokens", type=int, default=None, help="n: new tokens per timed call (default 128; tiny 6)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (tok/s counts every row)")
    ap.add_argument("--tuned", default=None, help="JSON of kernel configs from benchmarks/kernels.py --tuned-json")
    ap.add_argument("--batch1-kernel", default="kmajor",
                    help="comma list of casp.kernels.BATCH1_KERNELS modes to time the casp model in (default kmajor)")
    args = ap.parse_args()
    from casp.kernels import BATCH1_KERNELS, set_batch1_kernel

    modes = args.batch1_kernel.split(",")
    unknown = [m for m in modes if m not in BATCH1_KERNELS]
    if unknown:
        ap.error(f"unknown --batch1-kernel {unknown}; choose from {', '.join(BATCH1_KERNELS)}")
    tuned_note = "kernel configs: casp/kernels/uniform_config.py TUNED / defaults"
    if args.tuned:
        from casp.kernels import uniform_config

        tuned_note = f"kernel configs: {uniform_config.load_tuned_json(args.tuned)} entries of {args.tuned} over TUNED"
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float16 if device == "cuda" else torch.float32
    n = args.tokens or (6 if args.tiny else 128)
    ways = ["generate", "graph"] if device == "cuda" else ["generate", "static"]
    if device == "cpu":
        torch.set_num_threads(1)
    t0 = time.time()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    import transformers

    casp_label = f"casp {args.bits}-bit"
    # (label, batch-1 kernel mode): the fp16 model, then one casp model switched between the modes
    runs = [("fp16" if device == "cuda" else "fp32", None)] + [
        (casp_label if modes == ["kmajor"] else f"{casp_label} {m}", m) for m in modes
    ]
    width = max(14, *(len(label) for label, _ in runs))
    head = [
        f"greedy decode at batch {args.batch}, LLaVA-1.5-7B language-model shape{' (TINY)' if args.tiny else ''}, "
        f"random {dtype} weights; prompt {args.prompt} tokens; n = {n} new tokens per call; median of {args.repeats}",
        f"device: {name}; torch {torch.__version__}; transformers {transformers.__version__}",
        f"casp {args.bits}-bit: every decoder linear a QuantLinear of random {args.bits}-bit codes, group 128; "
        "embedding and lm_head fp16",
        "generate: transformers' model.generate (eager steps); graph: casp.decode.static_greedy_generate (CUDA graph)",
        tuned_note,
        f"casp model's batch-1 kernel modes (casp.kernels.set_batch1_kernel): {', '.join(modes)}; GPU MiB: "
        "torch.cuda.memory_allocated after the row's runs",
        "tok/s: generate n / (t(2n) - t(n)), graph steps / decode seconds; call tok/s = n / t(n) (prefill, capture "
        "and all); one-off ms: generate t(n) - t(1) - (n - 1) / tok/s, graph its eager first step + capture",
        "",
        f"{'model':<{width}} {'way':<9} {'tok/s':>8} {'ms/token':>9} {'x fp16 gen':>10} {'call tok/s':>10} "
        f"{'prefill ms':>10} {'one-off ms':>10} {'GPU MiB':>8}",
    ]
    print("\n".join(head), flush=True)
    rows, checks, results = [], [], {}
    prompt = torch.randint(1, 256 if args.tiny else 32000, (args.batch, args.prompt),
                           generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    model = None
    for label, mode in runs:
        if mode is None or model is None:
            model = build_model(args.tiny, device, dtype)
            if mode is not None:
                quantize_random(model, args.bits)
        if mode is not None:
            set_batch1_kernel(model, mode)
        for way in ways:
            r = measure(model, prompt, n, way, args.repeats)
            results[(label, way)] = r
            base = results[(runs[0][0], "generate")]["tok_s"]  # fp16 through generate, this run
            mib = f"{torch.cuda.memory_allocated() / 2**20:8.0f}" if device == "cuda" else f"{'-':>8}"
            line = (f"{label:<{width}} {way:<9} {r['tok_s']:8.1f} {r['ms_token']:9.2f} {r['tok_s'] / base:9.2f}x "
                    f"{r['call_tok_s']:10.1f} {r['prefill_ms']:10.1f} {r['setup_ms']:10.1f} {mib}")
            print(line, flush=True)
            rows.append(line)
        fast = ways[1]
        eager = static_greedy_generate(model, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, n, (),
                                       cuda_graph=False).cpu()
        g, h = results[(label, fast)]["tokens"], results[(label, "generate")]["tokens"]
        checks.append(f"{label}: {fast} tokens equal the eager static loop's: {torch.equal(g, eager)}; "
                      f"leading tokens agreeing with generate: {agree(g, h)} of {n}")
        if mode is None:
            del model
            model = None
            if device == "cuda":
                torch.cuda.empty_cache()
    tail = ["", "checks:"] + ["  " + c for c in checks] + [f"total {time.time() - t0:.0f}s"]
    print("\n".join(tail), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(head + rows + tail) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
