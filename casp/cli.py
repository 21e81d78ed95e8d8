"""The ``casp`` command line: a thin layer that builds the same configs the Python API takes."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from casp.errors import CaspError

EPILOG = "Run 'casp COMMAND --help' for the options of a command."


def _add_calib_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--calib", required=required, help="calibration data: LLaVA-conversation .jsonl (images "
                   "relative to it) or a plain .txt file")
    p.add_argument("--samples", type=int, default=32, help="number of calibration samples (default 32)")
    p.add_argument("--max-length", type=int, default=512, help="max text tokens per sample (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling calibration rows (default 0)")
    p.add_argument("--device", default=None, help="compute device for blocks (default: cuda if available, else cpu)")


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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
