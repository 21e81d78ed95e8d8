"""CASP vs plain quantization at equal average bits on the bundled demo VLM.

Runs the full `casp demo` comparison (fp16, RTN 2-bit g128, GPTQ 2-bit g128, GPTQ with optimal allocation at
2.25, CASP+RTN and CASP+GPTQ at 2.25 bits per original parameter, every overhead counted) and writes a
Markdown table with per-question-type exact match next to the raw demo outputs. The same comparison on a
real pretrained language model (SmolLM2-135M, perplexity) is benchmarks/quality.py.

    python benchmarks/casp_vs_plain.py --out benchmarks/results/casp_vs_plain_demo
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the `kernels` package that
# transformers probes: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from casp.demo.run import run_demo  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/casp_vs_plain_demo")
    p.add_argument("--work", default="/tmp/casp-vs-plain", help="where models and data are written")
    p.add_argument("--test", type=int, default=300, help="held-out VQA questions")
    p.add_argument("--calib", type=int, default=64, help="calibration conversations")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    start = time.time()
    summary = run_demo(args.work, quick=False, device=args.device, n_test=args.test, n_calib=args.calib)
    types = sorted({t for row in summary["rows"] for t in row["per_type"]})
    lines = [
        "# CASP vs plain quantization on the demo VLM (equal average bits)",
        "",
        f"Command: `python benchmarks/casp_vs_plain.py --test {args.test} --calib {args.calib} --device "
        f"{args.device}` ({time.time() - start:.0f} s)",
        f"Model: {summary['model']} (LlavaForConditionalGeneration, 6.9M parameters); {args.test} held-out "
        f"questions (types balanced), {args.calib} calibration conversations; greedy decoding; CIDEr on "
        f"{max(args.test // 4, 8)} held-out captions.",
        "avg bits = measured bits per original parameter of the compressed linears, scales/zeros/permutations/"
        "low-rank factors counted.",
        "",
        "| method | avg bits | VQA EM | CIDEr | " + " | ".join(types) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in types) + " |",
    ]
    for row in summary["rows"]:
        per = " | ".join(f"{row['per_type'].get(t, float('nan')):.3f}" for t in types)
        lines.append(f"| {row['method']} | {row['avg_bits']:.3f} | {row['vqa_em']:.3f} | {row['cider']:.3f} | {per} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
