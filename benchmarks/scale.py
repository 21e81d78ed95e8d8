"""Compression at 7B scale: a LLaVA-1.5-7B-shaped model with random weights, CASP+GPTQ at 2.25 bits.

Streams one decoder block at a time through the GPU (the rest of the model stays on CPU), and records
wall time per pass, peak GPU memory and peak CPU memory (RSS). ``--layers N`` builds the model with N of
its 32 decoder blocks (same per-block shapes) so that a run fits a short GPU lease; the time for all 32
blocks is then projected from the measured per-block times and is labelled as a projection.

    python benchmarks/scale.py --device cuda --layers 4 --samples 16 --out benchmarks/results/scale_h100.txt
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

# Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the `kernels` package that
# transformers probes: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from casp.compress import compress_model  # noqa: E402
from casp.config import CompressionConfig  # noqa: E402
from casp.models import get_adapter  # noqa: E402


def llava_7b_config(layers: int, tiny: bool = False):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    scale = 16 if tiny else 1  # --tiny: the same structure at 1/16 width, for a CPU smoke test of this script
    vision = CLIPVisionConfig(hidden_size=1024 // scale, intermediate_size=4096 // scale, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096 // scale, intermediate_size=11008 // scale, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def random_model(layers: int, dtype: torch.dtype, tiny: bool = False, init_device: str = "cpu"):
    """The model on CPU with N(0, 0.02) weights, built without a slow default init. The values are drawn on
    ``init_device`` (a GPU draws 7B values in a second; the CPU's seeded generator needs minutes)."""
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    config = llava_7b_config(layers, tiny)
    config._attn_implementation = "eager"  # CASP measures attention maps
    with init_empty_weights(include_buffers=False):
        model = LlavaForConditionalGeneration(config)
    gen = torch.Generator(init_device).manual_seed(0)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            value = torch.empty(p.shape, dtype=dtype)
            if name == "weight" and p.dim() == 1:  # norms
                value.fill_(1.0)
            elif name == "bias":
                value.zero_()
            else:
                value.copy_(torch.empty(p.shape, dtype=dtype, device=init_device).normal_(0, 0.02, generator=gen))
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    return model.eval()


def calibration_inputs(n: int, text_tokens: int, dtype: torch.dtype) -> list[dict]:
    """~LLaVA prompts: BOS, 576 image tokens, then text (random ids); random pixels."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        text = torch.randint(2, 32000, (text_tokens,), generator=gen)
        ids = torch.cat([torch.tensor([1]), torch.full((576,), 32000), text])[None]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "pixel_values": torch.randn(1, 3, 336, 336, generator=gen).to(dtype)})
    return batches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="decoder blocks to build (LLaVA-1.5-7B has 32)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--bits", type=float, default=2.25)
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", default="/tmp/casp-scale", help="where the compressed checkpoint is written")
    p.add_argument("--out", default=None, help="write the result table here too")
    p.add_argument("--tiny", action="store_true", help="1/16 width: a CPU smoke test of this script, not a result")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run stopped in --work (the plan's sensitivity tables and finished blocks are kept): a "
        "32-block run can span several device calls on one warm machine; wall time is then this call's only",
    )
    args = p.parse_args(argv)

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    t0 = time.time()
    model = random_model(args.layers, dtype, args.tiny, init_device="cuda" if args.device.startswith("cuda") else "cpu")
    build_s = time.time() - t0
    adapter = get_adapter(model)
    inputs = calibration_inputs(args.samples, args.text_tokens, dtype)
    cfg = CompressionConfig(method="casp", quantizer="gptq", bits=args.bits, alloc="optimal", samples=args.samples)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    result = compress_model(
        model, adapter, inputs, args.work, cfg, device=args.device, source="random llava-7b", resume=args.resume
    )
    wall = time.time() - t1
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    cpu_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    rep = result.report
    per_block = [sum(r["seconds"] for r in rep["layers"] if r["block"] == b) for b in range(args.layers)]
    lines = [
        f"# {' '.join(sys.argv)}",
        f"# device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}; "
        f"torch {torch.__version__}",
        ("model: 1/16-WIDTH SMOKE TEST (not a result) of " if args.tiny else "model: ")
        + "LLaVA-1.5-7B shapes (CLIP ViT-L/336 tower, 4096 hidden, 11008 MLP, 32 heads), random weights, "
        f"{args.layers} of 32 decoder blocks; {args.samples} calibration prompts of {577 + args.text_tokens} tokens",
        f"method: CASP (whitened low-rank Q/K, ratio 0.25) + GPTQ, optimal allocation at {args.bits} bits",
        f"model build (random values drawn on the {'GPU' if args.device.startswith('cuda') else 'CPU'}, weights on the "
        f"CPU): {build_s:.1f} s (not part of the compression time)",
        f"compression wall time ({args.layers} blocks, all passes: stats, sensitivity, compress, save): {wall:.1f} s"
        + (" (THIS CALL ONLY: resumed; add the earlier calls' times)" if args.resume else ""),
        "wall time per pass (s): " + ", ".join(f"{k} {v:.1f}" for k, v in rep.get("pass_seconds", {}).items())
        + (" (planning passes may come from an earlier call)" if args.resume else ""),
        f"compress-pass time per block (quantization only): mean {sum(per_block) / len(per_block):.1f} s",
        f"projected wall time for 32 blocks: {wall / args.layers * 32 / 60:.1f} min (linear in blocks; a projection, "
        "not a measurement)" if args.layers != 32 else f"wall time, 32 blocks: {wall / 60:.1f} min (measured)",
        f"peak GPU memory allocated: {gpu_peak:.2f} GiB",
        f"peak CPU memory (RSS): {cpu_peak:.2f} GiB",
        f"achieved average bits per original parameter: {rep['avg_bits_per_original_param']:.4f}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
