"""Argument parsers and handlers for ``casp eval`` and ``casp report`` (wired into casp/cli.py).

casp eval MODEL_OR_CASP_DIR --task vqa:FILE --task caption:FILE --task ppl:FILE --task mc:FILE --out results.json
casp report RESULTS... --out report.html        (or report.md)
"""

from __future__ import annotations

import argparse

import torch

from casp.eval.evaluate import TASK_KINDS


def add_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from casp.cli import add_batch1_kernel_argument  # casp.cli imports this module

    p = sub.add_parser(
        "eval",
        help="evaluate a model: VQA / multiple choice / captions (CIDEr) / perplexity -> results JSON",
        description="Run each --task KIND:FILE on an original or casp-compressed model directory and write one "
        "results JSON (schema v1). KIND: vqa (JSONL of image, question, answers), mc (question, options, answer), "
        "caption (image, references), ppl (plain text file). Images are relative to the JSONL's folder.",
    )
    p.add_argument("model", help="local model directory (original or written by 'casp compress')")
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="KIND:FILE",
        help=f"task to run, repeatable; KIND one of {', '.join(TASK_KINDS)}",
    )
    p.add_argument("--out", required=True, help="results JSON to write")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch size (default 8)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate per answer (default: vqa 16, mc 8, caption 32)",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N usable rows of each file")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the JSONL's)")
    p.add_argument(
        "--ppl-max-length",
        type=int,
        default=None,
        help="perplexity window in tokens (default: the model's context, at most 2048)",
    )
    p.add_argument("--ppl-stride", type=int, default=None, help="new tokens per perplexity window (default: half)")
    p.add_argument("--prompt-suffix", default=None,
                   help="text after each vqa/mc question (default: LLaVA's 'Answer the question using a single "
                   "word or phrase.' / letter instruction; pass '' for models trained without it)")
    p.add_argument("--caption-prompt", default=None, help="caption instruction (default 'Describe the image in "
                   "one sentence.'; a row's own 'prompt' wins)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="weights dtype (default: float16 on GPU, float32 on CPU)",
    )
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on a GPU, generate answers with transformers' generate instead of replaying one captured "
                   "CUDA graph per decode step")
    p.add_argument("--speed", action="store_true",
                   help="also measure prefill/decode tokens/s and memory on --batch-size copies of the first prompt "
                   "(stored under 'speed' in the results)")
    p.add_argument("--speed-tokens", type=int, default=32, help="new tokens per prompt for --speed (default 32)")
    add_batch1_kernel_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from casp.eval.evaluate import evaluate
    from casp.eval.speed import speed_line
    from casp.report.report import headline_metrics

    res = evaluate(
        args.model,
        args.task,
        out=args.out,
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        image_root=args.image_root,
        ppl_max_length=args.ppl_max_length,
        ppl_stride=args.ppl_stride,
        progress=not args.no_progress,
        prompt_suffix=args.prompt_suffix,
        caption_prompt=args.caption_prompt,
        cuda_graph=not args.no_cuda_graph,
        speed=args.speed,
        speed_tokens=args.speed_tokens,
        batch1_kernel=args.batch1_kernel,
    )
    for name, value in headline_metrics(res["tasks"]).items():
        print(f"{name}: {value:.4f}")
    for spec, task in res["tasks"].items():
        if task.get("n_skipped"):
            print(f"{spec}: skipped {task['n_skipped']} row(s), first: {task['skipped'][0]}")
    if "speed" in res:
        print(res["speed"].get("error") or speed_line(res["speed"]))
    print(f"wrote {args.out} ({res['timing']['total_s']:.1f} s)")
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report",
        help="turn results JSON files (and analysis.json / casp_report.json) into an HTML or Markdown report",
        description="Table of every run (model, method, bits, metrics) and plots: quality vs bits per method, "
        "attention density per layer, bits and ranks per layer. analysis.json / casp_report.json in a run's model "
        "directory are found automatically. .html is self-contained; .md writes PNGs next to it.",
    )
    p.add_argument("inputs", nargs="+", help="results JSON files (also analysis.json / casp_report.json)")
    p.add_argument("--out", required=True, help="report path ending in .html or .md")
    p.add_argument("--title", default="casp report", help="report title")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    from casp.report import build_report

    path = build_report(args.inputs, args.out, title=args.title)
    print(f"wrote {path}")
    return 0
