"""Benchmark on the real-parts VLM (EfficientNet-Lite0 + trained projector + SmolLM2-135M-Instruct).

Given a trained model directory (``python -m casp.demo.train_realvlm --out DIR``), on held-out synthetic
world data (VQA with balanced question types, captions; calibration from the calibration split):

1. fp16 (float32 on CPU) VQA exact match / VQA accuracy and caption CIDEr-D;
2. attention density per layer (``casp.calib.analyze.analyze_layers``: how much of the attention mass
   the fewest keys hold, image-token share), the AKVQ-VL saliency profile (TSA / PSA per layer: mean
   attention per text vs image token) and the pivot-token positions of one prompt per layer;
3. the KV-cache ablation (fp16, KIVI 2-bit, uniform -> +rotation -> +TSA -> +PSA) on VQA answers;
4. weight compression: RTN / GPTQ / AQLM / QuIP#, plain and CASP (whitened low-rank Q/K + optimal bit
   allocation), at about 2.0 / 2.25 / 3 bits per weight (measured average bits, overheads counted,
   are in the table), each evaluated like fp16.

Writes DIR/results.json, DIR/table.md and plots (quality_vs_bits.png, attention_density.png,
kv_saliency.png, pivots.png) under --out. Subsets: --quantizers, --bits, --methods, --skip-*.

    python benchmarks/real_parts_vlm.py MODEL_DIR --out benchmarks/results/real_parts_vlm --device cuda
    python benchmarks/real_parts_vlm.py MODEL_DIR --out /tmp/rp --quantizers rtn,gptq --bits 2.25 \\
        --n-vqa 60 --n-captions 20 --calib-samples 16 --kv-n 24          # a quicker subset
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Run as a script, this folder leads sys.path (benchmarks/kernels.py would shadow the `kernels` package
# transformers probes): put the repository root there instead, so casp imports.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from casp.config import CompressionConfig  # noqa: E402
from casp.demo import world  # noqa: E402
from casp.errors import CaspError  # noqa: E402
from casp.quant.aqlm import FAST_SEARCH  # noqa: E402

QUANTIZERS = ("rtn", "gptq", "aqlm", "quip")
TARGETS = ("2.0", "2.25", "3", "4")
METHODS = ("plain", "casp")
# AQLM's search settings: the cheap ones benchmarks/quality.py uses too (casp.quant.aqlm.FAST_SEARCH); AQLM at 3
# bits (2x12 codebooks of 4096 codewords) for every layer is otherwise the slowest part of the grid by far.
AQLM_OPTIONS = FAST_SEARCH


# ---- data ------------------------------------------------------------------------------------------


def make_data(root: Path, n_vqa: int, n_captions: int, n_calib: int) -> dict[str, Path]:
    """Held-out test VQA and captions (test split, seed 2) and calibration conversations (seed 1)."""
    return {
        "calib": world.write_llava_jsonl(root / "calib", n_calib, seed=1, split="calibration"),
        "vqa": world.write_vqa_jsonl(root / "test", n_vqa, seed=2, split="test"),
        "captions": world.write_caption_jsonl(root / "test", n_captions, seed=2, split="test"),
    }


# ---- method grid -----------------------------------------------------------------------------------


def method_config(
    method: str,
    quantizer: str,
    target: str,
    samples: int,
    aqlm_options: dict | None = None,
    rank_ratio: float = 0.25,
) -> CompressionConfig:
    """The compression recipe nearest to ``target`` bits per weight (overheads counted by the driver).

    plain RTN/GPTQ: 2.0 -> 2-bit, one group of 576 (SmolLM2's hidden size; ~2.06 bits), 2.25 -> 2-bit g128
    (~2.28 with the partial last group of 576), 3 -> 3-bit g576 (~3.06), 4 -> 4-bit g128 (~4.27). plain AQLM /
    QuIP#: the nearest whole code rate (2, 2, 3, 4). CASP: the exact budget (4.25 at "4") with optimal allocation
    over 2/3/4-bit candidates
    (RTN/GPTQ with group 128, or 576 at 2.0 where group-128 scales alone would exceed the budget), q/k factors
    keeping ``rank_ratio`` of their parameters (the paper's 25% by default).
    """
    common = {"samples": samples, "max_length": 512}
    if quantizer == "aqlm":
        common["quant_options"] = dict(AQLM_OPTIONS if aqlm_options is None else aqlm_options)
    bits = 4.25 if target == "4" else float(target)  # "4": the budget of plain 4-bit g128 (~4.27 with overheads)
    if method == "casp":
        if quantizer in ("rtn", "gptq"):  # at 2.0, g128's scales alone (0.25-0.28 bits) exceed the budget
            common["group_size"] = 576 if target == "2.0" else 128
        return CompressionConfig(
            method="casp", quantizer=quantizer, bits=bits, alloc="optimal", rank_ratio=rank_ratio, **common
        )
    if quantizer in ("rtn", "gptq"):
        code, group = {"2.0": (2, 576), "2.25": (2, 128), "3": (3, 576), "4": (4, 128)}[target]
        return CompressionConfig(quantizer=quantizer, bits=code, group_size=group, **common)
    return CompressionConfig(quantizer=quantizer, bits=round(bits), **common)


def lowrank_only(ratios: list[float], samples: int) -> list[tuple[str, CompressionConfig]]:
    """Ablation: CASP's whitened low-rank Q/K at each kept-parameter ratio, every linear (and factor) then at 8-bit
    RTN, so the accuracy lost is the low-rank step's alone."""
    return [
        (
            f"low-rank q/k {ratio:.0%} + RTN 8-bit",
            CompressionConfig(
                method="casp", quantizer="rtn", bits=8, rank_ratio=ratio, samples=samples, max_length=512
            ),
        )
        for ratio in ratios
    ]


def method_grid(
    methods, quantizers, targets, samples, aqlm_options=None, rank_ratio: float = 0.25
) -> list[tuple[str, CompressionConfig]]:
    """(label, config) per run; recipes that coincide (plain AQLM at 2.0 and 2.25) run once. CASP rows at another
    rank ratio than the paper's 25% are labelled with it ("CASP r50%+QUIP @2.25")."""
    grid, seen = [], set()
    for method in methods:
        for quantizer in quantizers:
            for target in targets:
                cfg = method_config(method, quantizer, target, samples, aqlm_options, rank_ratio)
                key = json.dumps(cfg.to_dict(), sort_keys=True)
                if key in seen:
                    continue
                seen.add(key)
                casp = "" if method != "casp" else "CASP+" if rank_ratio == 0.25 else f"CASP r{rank_ratio:.0%}+"
                grid.append((f"{casp}{quantizer.upper()} @{target}", cfg))
    return grid


# ---- evaluation ------------------------------------------------------------------------------------


def evaluate_loaded(model, processor, adapter, data: dict[str, Path], batch: int) -> dict:
    from casp.eval.evaluate import run_task

    # The prompts the model was trained on: the bare question (no LLaVA-style "answer in a word" suffix) and the
    # world's caption instruction, as the demo scores its model (casp.demo.run.score_model).
    vqa = run_task(
        f"vqa:{data['vqa']}", model, processor, adapter, batch_size=batch, max_new_tokens=10, prompt_suffix=""
    )
    cap = run_task(
        f"caption:{data['captions']}",
        model,
        processor,
        adapter,
        batch_size=batch,
        caption_prompt=world.CAPTION_PROMPTS[0],
    )
    return {
        "vqa_exact_match": vqa["exact_match"],
        "vqa_accuracy": vqa["vqa_accuracy"],
        "vqa_per_type": {t: v["exact_match"] for t, v in vqa["per_type"].items()},
        "caption_cider": cap["cider"],
        "examples": [{k: p[k] for k in ("question", "prediction", "answers")} for p in vqa["predictions"][:6]],
    }


def evaluate_dir(path: Path, data, device: str, batch: int) -> dict:
    from casp.models import load_model

    dtype = torch.float16 if device == "cuda" else torch.float32
    model, processor, adapter = load_model(path, dtype=dtype, device=device)
    out = evaluate_loaded(model, processor, adapter, data, batch)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- analysis ----------------------------------------------------------------------------------------


@torch.no_grad()
def analysis(model_dir: Path, data, device: str, samples: int, out: Path) -> dict:
    """Attention density per layer, the KV saliency profile (TSA/PSA) and pivot positions of one prompt."""
    from casp.calib.analyze import analyze_layers
    from casp.calib.data import load_calibration
    from casp.calib.inputs import encode_samples
    from casp.calib.runner import capture_block_inputs
    from casp.kv import analyze as kv_analyze
    from casp.kv import find_pivot_tokens
    from casp.models import load_model

    model, processor, adapter = load_model(model_dir, dtype=torch.float32, device=device, attn_implementation="eager")
    calib = load_calibration(data["calib"], samples, 0)
    inputs = encode_samples(calib.samples, processor, adapter, 512)
    block_inputs = capture_block_inputs(model, adapter, inputs, device)
    layers = analyze_layers(model, adapter, block_inputs, device)
    model.to(device)  # the layer-wise passes stream blocks through the device and leave the model where it was
    on_device = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()} for x in inputs]
    profile = kv_analyze(model, adapter, on_device)
    first = on_device[0]
    hidden = model(**first, output_hidden_states=True, use_cache=False).hidden_states  # embeddings + per block
    image_mask = adapter.image_token_mask(model, first["input_ids"])[0].cpu()
    pivots = [find_pivot_tokens(h[0].float().cpu()).tolist() for h in hidden[:-1]]  # block i's input
    span = image_mask.nonzero().flatten()
    del model
    result = {
        "layers": layers,
        "kv_profile": profile.to_dict(),
        "pivots": {
            "positions": pivots,
            "tokens": int(image_mask.numel()),
            "image_span": [int(span.min()), int(span.max()) + 1] if len(span) else None,
        },
    }
    write_plot(out / "attention_density.png", _density_png(layers))
    write_plot(out / "kv_saliency.png", saliency_png(result["kv_profile"]))
    write_plot(out / "pivots.png", pivots_png(result["pivots"]))
    return result


def kv_ablation(model_dir: Path, data, device: str, n: int, profile: dict | None, batch: int, residual: int) -> dict:
    """Greedy VQA answers with each KV cache (2-bit, ``residual`` most recent tokens kept in fp16)."""
    from PIL import Image

    from casp.kv import KVSaliencyProfile
    from casp.kv.bench import answer_accuracy, cache_methods
    from casp.models import load_model

    dtype = torch.float16 if device == "cuda" else torch.float32
    model, processor, adapter = load_model(model_dir, dtype=dtype, device=device)
    rows = []
    root = data["vqa"].parent
    for line in data["vqa"].read_text().splitlines()[:n]:
        rec = json.loads(line)
        with Image.open(root / rec["image"]) as img:
            rows.append({"image": img.convert("RGB"), "question": rec["question"], "answers": rec["answers"]})
    prof = None if profile is None else KVSaliencyProfile.from_dict(profile)
    methods = cache_methods(model, adapter, profile=prof, bits=2, ablation=True, residual=residual)
    return answer_accuracy(model, processor, adapter, rows, methods, max_new_tokens=10, batch_size=batch)


# ---- plots -------------------------------------------------------------------------------------------


def write_plot(path: Path, png: bytes | None) -> None:
    if png:
        path.write_bytes(png)


def _density_png(layers: list[dict]) -> bytes | None:
    from casp.report.plots import attention_density

    return attention_density(layers, title="real-parts VLM (SmolLM2-135M): attention density per layer")


def saliency_png(profile: dict) -> bytes | None:
    """Mean attention per text token and per image token, per layer; background marks TSA / PSA."""
    from matplotlib.figure import Figure

    from casp.report.plots import _png

    text, image = profile.get("text_attention") or [], profile.get("image_attention") or []
    if not text:
        return None
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(text)))
    for i, pattern in enumerate(profile["patterns"]):
        ax.axvspan(i - 0.5, i + 0.5, color="#f4d6a0" if pattern == "TSA" else "#dbe8f5", lw=0)
    ax.plot(xs, [float("nan") if v is None else v for v in text], marker="o", label="per text token")
    ax.plot(xs, [float("nan") if v is None else v for v in image], marker="s", label="per image token")
    ax.set_yscale("log")
    ax.set_xlabel("layer (orange: TSA, blue: PSA)")
    ax.set_ylabel("mean attention received")
    ax.legend(fontsize=8)
    return _png(fig)


def pivots_png(pivots: dict) -> bytes | None:
    from matplotlib.figure import Figure

    from casp.report.plots import _png

    positions = pivots["positions"]
    if not positions:
        return None
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    if pivots["image_span"]:
        ax.axvspan(*pivots["image_span"], color="#dbe8f5", label="image tokens")
    for layer, pos in enumerate(positions):
        ax.scatter(pos, [layer] * len(pos), s=10, color="#c0392b")
    ax.set_xlim(0, pivots["tokens"])
    ax.set_xlabel("token position (one calibration prompt)")
    ax.set_ylabel("layer (block input)")
    ax.set_title("pivot tokens (massive activations)", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    return _png(fig)


# ---- table -------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = [
        "| model | avg bits | VQA EM | VQA acc | CIDEr | compress s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error'][:200]} | | | | |")
            continue
        bits = "unquantized" if row["avg_bits"] is None else f"{row['avg_bits']:.3f}"
        secs = "" if row.get("compress_seconds") is None else f"{row['compress_seconds']:.0f}"
        lines.append(
            f"| {row['name']} | {bits} | {row['vqa_exact_match']:.3f} | {row['vqa_accuracy']:.3f} | "
            f"{row['caption_cider']:.3f} | {secs} |"
        )
    kv = results.get("kv_ablation")
    if kv:
        lines += [
            "",
            "| KV cache | VQA EM | VQA acc | token agreement with fp16 | KV bytes |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, r in kv.items():
            lines.append(
                f"| {name} | {r['exact_match']:.3f} | {r['vqa_accuracy']:.3f} | {r['agreement']:.3f} | "
                f"{r['kv_bytes']} |"
            )
    an = results.get("analysis")
    if an:
        prof = an["kv_profile"]
        lines += [
            "",
            "| layer | density | image mass | KV pattern | pivots (one prompt) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for i, layer in enumerate(an["layers"]):
            lines.append(
                f"| {i} | {layer['density']:.3f} | {layer.get('image_mass') or 0:.3f} | "
                f"{prof['patterns'][i]} | {an['pivots']['positions'][i]} |"
            )
    return "\n".join(lines) + "\n"


# ---- main --------------------------------------------------------------------------------------------


def run(args) -> dict:
    from casp.compress import compress
    from casp.report.plots import quality_vs_bits

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(out / "data", args.n_vqa, args.n_captions, args.calib_samples)
    results: dict = {
        "model": str(args.model),
        "device": args.device,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [],
    }
    # Resume: rows (and the analysis / KV sections) of an earlier run into the same --out are kept and not redone,
    # unless they failed or --force is given.
    previous = out / "results.json"
    if previous.is_file() and not args.force:
        old = json.loads(previous.read_text())
        results["rows"] = [r for r in old.get("rows", []) if "error" not in r]
        for section in ("analysis", "kv_ablation"):
            if section in old:
                results[section] = old[section]
    done = {r["name"] for r in results["rows"]}
    if torch.cuda.is_available() and args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "table.md").write_text(table(results))

    fp16_name = "fp16" if args.device == "cuda" else "fp32 (cpu)"
    if not args.skip_fp16 and fp16_name not in done:
        t0 = time.time()
        row = {"name": fp16_name, "avg_bits": None}
        row.update(evaluate_dir(args.model, data, args.device, args.batch))
        row["eval_seconds"] = round(time.time() - t0, 1)
        results["rows"].append(row)
        save()
    if not args.skip_analysis and "analysis" not in results:
        results["analysis"] = analysis(args.model, data, args.device, min(args.calib_samples, 16), out)
        save()
    if not args.skip_kv and "kv_ablation" not in results:
        profile = results.get("analysis", {}).get("kv_profile")
        results["kv_ablation"] = kv_ablation(
            args.model, data, args.device, args.kv_n, profile, args.batch, args.kv_residual
        )
        save()
    sensitivity = args.sensitivity_cache or out / "sensitivity"
    grid = method_grid(args.methods, args.quantizers, args.bits, args.calib_samples, args.aqlm_options, args.rank_ratio)
    for name, cfg in grid + lowrank_only(args.lowrank_only, args.calib_samples):
        if name in done:
            print(f"{name}: done in {previous}, kept", flush=True)
            continue
        print(f"{name}: compressing", flush=True)
        target = out / "models" / name.replace(" @", "_").replace("+", "_")
        row = {"name": name, "config": cfg.to_dict()}
        try:
            t0 = time.time()
            report = compress(
                args.model, target, cfg, calib=data["calib"], device=args.device, sensitivity_cache=sensitivity
            ).report
            row["compress_seconds"] = round(time.time() - t0, 1)
            row["avg_bits"] = report["avg_bits_per_original_param"]
            row.update(evaluate_dir(target, data, args.device, args.batch))
        except (CaspError, ValueError, RuntimeError) as err:  # one failed recipe must not end the benchmark
            row["error"] = f"{type(err).__name__}: {err}"
        if not args.keep_models:
            shutil.rmtree(target, ignore_errors=True)
        results["rows"].append(row)
        save()
    points = [
        {
            "method": r["name"].split(" @")[0],
            "avg_bits": r["avg_bits"],
            "metrics": {"VQA exact match": r["vqa_exact_match"], "caption CIDEr": r["caption_cider"]},
        }
        for r in results["rows"]
        if "error" not in r and r["avg_bits"] is not None
    ]
    write_plot(out / "quality_vs_bits.png", quality_vs_bits(points, ["VQA exact match", "caption CIDEr"]))
    save()
    return results


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="trained real-parts VLM directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quantizers", type=_csv(QUANTIZERS), default=list(QUANTIZERS))
    ap.add_argument("--bits", type=_csv(TARGETS), default=list(TARGETS), help="targets: 2.0,2.25,3,4")
    ap.add_argument("--methods", type=_csv(METHODS), default=list(METHODS))
    ap.add_argument("--n-vqa", type=int, default=300)
    ap.add_argument("--n-captions", type=int, default=100)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--kv-n", type=int, default=120, help="VQA questions for the KV-cache ablation")
    ap.add_argument(
        "--kv-residual",
        type=int,
        default=32,
        help="recent tokens kept in fp16 by the 2-bit caches (prompts are ~215 tokens: 196 image tokens)",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--skip-fp16", action="store_true")
    ap.add_argument("--skip-analysis", action="store_true")
    ap.add_argument("--skip-kv", action="store_true")
    ap.add_argument("--keep-models", action="store_true", help="keep the compressed model directories")
    ap.add_argument("--force", action="store_true", help="redo rows already in --out/results.json")
    ap.add_argument("--rank-ratio", type=float, default=0.25, help="share of q/k parameters CASP keeps (paper: 0.25)")
    ap.add_argument(
        "--lowrank-only",
        type=lambda text: [float(x) for x in text.split(",") if x.strip()],
        default=[],
        help="ablation rows: low-rank Q/K keeping these parameter ratios (e.g. 0.25,0.5), everything at 8-bit RTN",
    )
    ap.add_argument(
        "--sensitivity-cache",
        type=Path,
        default=None,
        help="folder of CASP sensitivity tables shared by the targets of one quantizer (default: OUT/sensitivity)",
    )
    ap.add_argument(
        "--aqlm-options",
        type=json.loads,
        default=dict(AQLM_OPTIONS),
        help=f"AQLM search settings as JSON (default {json.dumps(AQLM_OPTIONS)})",
    )
    args = ap.parse_args(argv)
    results = run(args)
    print(table(results), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
