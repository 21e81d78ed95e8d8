"""CASP's premise, measured (the paper's Theorem 1 figure): the attention-map error that low-rank Q/K
causes, against attention density and against the share of image tokens in the prompt.

For every decoder layer and calibration prompt: replace q_proj and k_proj by their whitened rank-r
factors (ratio 0.25 by default), and compare the attention probabilities A (original) with Â
(low-rank) on the same layer inputs: relative error ||A - Â||_F / ||A||_F, plus the row density of A
(share of keys holding 95% of the mass). Prompts get 0..k extra text sentences, so the image-token share
varies. Writes a JSON with every point and a two-panel plot.

    python benchmarks/sparsity_bound.py --out benchmarks/results/sparsity_bound   # bundled demo model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the `kernels` package that
# transformers probes: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from casp.calib.attention import causal_visibility, row_density  # noqa: E402
from casp.calib.data import CalibSample  # noqa: E402
from casp.calib.inputs import encode_samples  # noqa: E402
from casp.calib.runner import BlockContext, capture_block_inputs, run_layerwise  # noqa: E402
from casp.lowrank.module import LowRankLinear  # noqa: E402
from casp.lowrank.ranks import fixed_rank  # noqa: E402
from casp.lowrank.whiten import whitened_lowrank  # noqa: E402
from casp.models import load_model  # noqa: E402

FILLER = "the picture shows shapes on a background ."


def prompts(n: int, extra_max: int, seed: int = 3):
    from casp.demo import world

    samples = []
    for i in range(n):
        ex = world.make_example("test", seed, i, world.balanced_type(i))
        extra = (i % (extra_max + 1))
        text = " ".join([FILLER] * extra + [ex.qa.question])
        from PIL import Image

        samples.append(CalibSample(prompt=text, answer=ex.qa.answer, image=Image.fromarray(ex.image)))
    return samples


def measure(model_dir, n: int, extra_max: int, ratio: float) -> list[dict]:
    model, processor, adapter = load_model(model_dir, attn_implementation="eager")
    inputs = encode_samples(prompts(n, extra_max), processor, adapter, max_length=1024)
    block_inputs = capture_block_inputs(model, adapter, inputs)
    points: list[dict] = []

    def on_block(ctx: BlockContext) -> None:
        attn_name = next(n for n, m in ctx.block.named_modules() if m is adapter.attention(ctx.block))
        grams = ctx.grams(["self_attn.q_proj"])
        maps: list[torch.Tensor] = []

        def keep(module, args, output):
            maps.append(output[1].detach()[0])  # [H, T, T]

        ctx.forward_all({attn_name: keep})
        original = list(maps)
        maps.clear()
        attn = adapter.attention(ctx.block)
        dense = {name: getattr(attn, name) for name in ("q_proj", "k_proj")}
        for name, lin in dense.items():
            W = lin.weight.detach().float()
            f = whitened_lowrank(W, grams["self_attn.q_proj"], fixed_rank(*W.shape, ratio))
            setattr(attn, name, LowRankLinear.from_factors(f.A, f.B, lin.bias, dtype=W.dtype))
        ctx.forward_all({attn_name: keep})
        for name, lin in dense.items():  # leave the block as it was: later layers see the original model
            setattr(attn, name, lin)
        for item, a, a_hat in zip(ctx.inputs, original, maps):
            vis = causal_visibility(a.shape[-2], a.shape[-1])
            err = float((a - a_hat).norm() / a.norm())
            points.append({"layer": ctx.index, "density": float(row_density(a, vis).mean()),
                           "image_share": float(item.image_mask.float().mean()), "error": err,
                           "tokens": int(item.image_mask.numel())})

    run_layerwise(model, adapter, block_inputs, on_block, desc="sparsity")
    return points


def plot(points: list[dict], path: Path, ratio: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    layers = sorted({p["layer"] for p in points})
    cmap = plt.get_cmap("viridis", len(layers))
    for li in layers:
        pts = [p for p in points if p["layer"] == li]
        axes[0].scatter([p["density"] for p in pts], [p["error"] for p in pts], s=10, color=cmap(li), label=f"L{li}")
        axes[1].scatter([p["image_share"] for p in pts], [p["error"] for p in pts], s=10, color=cmap(li))
    axes[0].set_xlabel("attention density (95% mass)")
    axes[1].set_xlabel("share of image tokens in the prompt")
    for ax in axes:
        ax.set_ylabel(f"||A - Â||/||A||, low-rank Q/K (ratio {ratio})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir (default: the bundled demo model)")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--extra-max", type=int, default=5, help="max extra text sentences per prompt")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--out", default="benchmarks/results/sparsity_bound")
    args = p.parse_args(argv)
    if args.model is None:
        from casp.demo.run import bundled_model_dir

        args.model = bundled_model_dir()
    points = measure(args.model, args.prompts, args.extra_max, args.ratio)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    corr = torch.corrcoef(torch.tensor([[q["density"] for q in points], [q["error"] for q in points]]))[0, 1]
    corr_share = torch.corrcoef(torch.tensor([[q["image_share"] for q in points], [q["error"] for q in points]]))
    summary = {"command": " ".join(sys.argv), "model": str(args.model), "ratio": args.ratio,
               "pearson_density_error": float(corr), "pearson_image_share_error": float(corr_share[0, 1]),
               "per_layer": [{"layer": li,
                              "density": sum(q["density"] for q in points if q["layer"] == li)
                              / max(1, sum(1 for q in points if q["layer"] == li)),
                              "error": sum(q["error"] for q in points if q["layer"] == li)
                              / max(1, sum(1 for q in points if q["layer"] == li))}
                             for li in sorted({q["layer"] for q in points})],
               "points": points}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(points, out.with_suffix(".png"), args.ratio)
    print(json.dumps({k: v for k, v in summary.items() if k != "points"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
