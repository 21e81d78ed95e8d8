"""Quantization time and relative G-weighted output error of RTN, GPTQ, AQLM (2x8, 1x16) and QuIP# (E8P).

Synthetic layers: W [out, in] Gaussian with a few large input columns; calibration activations
X = Z B + 0.3 E (Z [T, in/4] low-rank factors, E noise) with 8 outlier features scaled by 20, so that
G = X^T X is strongly correlated as in real LMM layers. Error = tr(dW G dW^T) / tr(W G W^T).
bits/w counts every stored tensor (codes, scales, zeros, codebooks, signs).

    python benchmarks/codebook_quantizers.py --quick --out benchmarks/results/codebook_quantizers_cpu.txt
    python benchmarks/codebook_quantizers.py --device cuda --out benchmarks/results/codebook_quantizers_cuda.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch

from casp.quant.aqlm import AQLMConfig, quantize_aqlm
from casp.quant.base import output_error
from casp.quant.quip import QuIPConfig, quantize_quip
from casp.quant.rtn import RTNConfig, quantize_rtn

FULL_SHAPES = [(4096, 4096), (4096, 11008)]
QUICK_SHAPES = [(256, 1024), (256, 688)]  # 688 = 43 * 16: the same DCT x Hadamard path as 11008


def methods(quick: bool) -> list[tuple[str, object, object]]:
    """(name, quantize function, config) rows of the table."""
    rows = [("RTN 2b g128", quantize_rtn, RTNConfig(bits=2, group_size=128))]
    if importlib.util.find_spec("casp.quant.gptq") is not None:
        from casp.quant.gptq import GPTQConfig, quantize_gptq

        rows.append(("GPTQ 2b g128", quantize_gptq, GPTQConfig(bits=2, group_size=128)))
    rows += [
        ("AQLM 2x8", quantize_aqlm, AQLMConfig.preset("2x8")),
        ("AQLM 1x16", quantize_aqlm, AQLMConfig.preset("1x16", max_iters=3 if quick else 5)),
        ("QuIP# E8P 2b", quantize_quip, QuIPConfig(bits=2)),
        ("QuIP# E8P+E8P 4b", quantize_quip, QuIPConfig(bits=4)),
    ]
    return rows


def synthetic_layer(out_f: int, in_f: int, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, device=device) / in_f**0.5
    W[:, :4] *= 4
    T, r = max(2 * in_f, 512), max(in_f // 4, 8)
    X = torch.randn(T, r, generator=g, device=device) @ torch.randn(r, in_f, generator=g, device=device) / r**0.5
    X += 0.3 * torch.randn(T, in_f, generator=g, device=device)
    X[:, torch.randperm(in_f, generator=g, device=device)[:8]] *= 20
    return W, X.T @ X


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(shapes, device: str, quick: bool, only: list[str] | None) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        W, G = synthetic_layer(out_f, in_f, device)
        for name, fn, cfg in methods(quick):
            if only and not any(o.lower() in name.lower() for o in only):
                continue
            sync(device)
            t0 = time.perf_counter()
            qw = fn(W, G, cfg)
            sync(device)
            dt = time.perf_counter() - t0
            err = output_error(W, qw.dequantize(torch.float32), G)
            rows.append(
                {"shape": f"{out_f}x{in_f}", "method": name, "bpw": qw.bits_per_weight(), "err": err, "time": dt}
            )
            print(f"{rows[-1]['shape']:>10}  {name:<18} {qw.bits_per_weight():6.3f}  {err:9.5f}  {dt:8.2f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':>10}  {'method':<18} {'bits/w':>6}  {'rel.err':>9}  {'time s':>8}"]
    lines += [f"{r['shape']:>10}  {r['method']:<18} {r['bpw']:6.3f}  {r['err']:9.5f}  {r['time']:8.2f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU minutes)")
    ap.add_argument("--methods", nargs="*", help="substrings of method names to run (default: all)")
    ap.add_argument("--out", help="write the table here")
    args = ap.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.device.startswith("cuda"):  # warm up kernels / context so the first timing is honest
        W, G = synthetic_layer(64, 128, args.device)
        for _, fn, cfg in methods(True):
            fn(W, G, cfg)
    rows = run(shapes, args.device, args.quick, args.methods)
    header = (
        f"# command: python {' '.join(sys.argv)}\n# device: {args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}\n"
    )
    note = (
        "# bits/w counts every stored tensor. AQLM 1x16 stores 65536 x 8 fp16 codewords (8.4 Mbit): on small\n"
        "# layers that exceeds the codes (and the codebook can hold every group exactly, hence ~0 error);\n"
        "# it amortizes to ~0.19 bit/w only at 4096x11008.\n"
    )
    text = header + table(rows) + "\n" + (note if args.quick else "")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
