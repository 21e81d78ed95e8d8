"""Does balancing and/or a Hadamard rotation of the rank dimension make low-rank factors easier to quantize?

For synthetic q/k-like layers with realistic structure (a decaying spectrum plus a few outlier input
columns, and correlated activations with a few massive channels), factor W ~= A B with the whitened SVD
at the paper's 25% parameter ratio, then quantize A and B (B with the layer's Gram G, A with the Gram of
B's outputs B G B^T) and measure the relative output error of the product on held-out tokens:

    err = ||(W - Â B̂) X^T||_F^2 / ||W X^T||_F^2

for the factor conditionings: none (raw whitened factors), the official code's x10 / x0.1 rescale,
balanced, rotated, balanced + rotated. "floor" is the error of the unquantized A B (truncation only).

    PYTHONPATH=. python benchmarks/lowrank_rotation.py --out benchmarks/results/lowrank_rotation.txt
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from casp.lowrank import balance_factors, fixed_rank, official_rescale, rotate_rank, whitened_lowrank
from casp.quant.gptq import GPTQConfig, quantize_gptq
from casp.quant.rtn import RTNConfig, quantize_rtn

LAYERS = {  # name: (out_features m, in_features n)
    "q 1024x1024": (1024, 1024),
    "k-gqa 256x1024": (256, 1024),
    "q 576x576": (576, 576),
}
VARIANTS = ("none", "official x10", "balanced", "rotated", "balanced+rot")


def synthetic_layer(m: int, n: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [m, n], calibration X_cal [tokens, n] and held-out X_eval [tokens, n]."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    sigma = torch.arange(1, k + 1, dtype=torch.float32).pow(-0.6)  # decaying spectrum
    W = (U * sigma) @ V.T
    W += 0.02 * torch.randn(m, n, generator=g) / n**0.5  # a full-rank noise floor
    outliers = torch.randperm(n, generator=g)[:4]
    W[:, outliers] *= 8.0  # a few outlier input columns

    # Activations: low-dimensional correlated structure, lognormal channel scales, a few massive channels.
    mix = torch.randn(n // 8, n, generator=g) / (n // 8) ** 0.5
    chan = torch.exp(0.8 * torch.randn(n, generator=g))
    chan[torch.randperm(n, generator=g)[:3]] *= 30.0

    def draw(t: int) -> torch.Tensor:
        z = torch.randn(t, n // 8, generator=g) @ mix + 0.3 * torch.randn(t, n, generator=g)
        return z * chan

    return W, draw(tokens), draw(tokens)


def conditioned(A: torch.Tensor, B: torch.Tensor, variant: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if variant == "none":
        return A, B
    if variant == "official x10":
        return official_rescale(A, B)
    if variant == "balanced":
        return balance_factors(A, B)
    if variant == "rotated":
        return rotate_rank(A, B, seed)[:2]
    if variant == "balanced+rot":
        return rotate_rank(*balance_factors(A, B), seed)[:2]
    raise ValueError(variant)


def quantize_pair(A, B, G, quantizer: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    G_A = B @ G @ B.T  # Gram of B's outputs, what A sees
    if quantizer == "rtn":
        cfg = RTNConfig(bits=bits, group_size=128)  # per channel for A when r <= 128
        return quantize_rtn(A, G_A, cfg).dequantize(), quantize_rtn(B, G, cfg).dequantize()
    cfg = GPTQConfig(bits=bits, group_size=128)
    return quantize_gptq(A, G_A, cfg).dequantize(), quantize_gptq(B, G, cfg).dequantize()


def rel_err(W: torch.Tensor, M: torch.Tensor, X: torch.Tensor) -> float:
    Y = X.double() @ W.double().T
    return float((X.double() @ (W.double() - M.double()).T).pow(2).sum() / Y.pow(2).sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--quantizers", default="rtn,gptq")
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    bits_list = [int(b) for b in args.bits.split(",")]
    quantizers = args.quantizers.split(",")
    torch.set_num_threads(2)
    t0 = time.time()

    lines = []
    header = f"{'layer':16s} {'rank':>4s} {'quant':5s} {'bits':>4s} {'floor':>8s} " + " ".join(
        f"{v:>13s}" for v in VARIANTS
    )
    lines.append(header)
    wins = {v: 0 for v in VARIANTS}
    geo = {v: 0.0 for v in VARIANTS}
    cells = 0
    for name, (m, n) in LAYERS.items():
        r = fixed_rank(m, n, 0.25)
        for quantizer in quantizers:
            for bits in bits_list:
                acc = {v: 0.0 for v in VARIANTS}
                floor = 0.0
                for seed in range(args.seeds):
                    W, X_cal, X_eval = synthetic_layer(m, n, args.tokens, seed)
                    G = X_cal.T.double() @ X_cal.double()
                    f = whitened_lowrank(W, G.float(), r)
                    floor += rel_err(W, f.A @ f.B, X_eval) / args.seeds
                    for v in VARIANTS:
                        A, B = conditioned(f.A, f.B, v, seed)
                        A_hat, B_hat = quantize_pair(A, B, G.float(), quantizer, bits)
                        acc[v] += rel_err(W, A_hat @ B_hat, X_eval) / args.seeds
                best = min(acc, key=acc.get)
                wins[best] += 1
                for v in VARIANTS:
                    geo[v] += torch.log(torch.tensor(acc[v] / acc["none"])).item()
                cells += 1
                lines.append(
                    f"{name:16s} {r:4d} {quantizer:5s} {bits:4d} {floor:8.4f} "
                    + " ".join(f"{acc[v]:12.4f}{'*' if v == best else ' '}" for v in VARIANTS)
                )
    lines.append("")
    lines.append(
        "geometric mean of err / err(none) over all rows: "
        + ", ".join(f"{v} {torch.exp(torch.tensor(geo[v] / cells)).item():.3f}" for v in VARIANTS)
    )
    lines.append("rows won (* = lowest error): " + ", ".join(f"{v} {wins[v]}" for v in VARIANTS))
    lines.append(
        f"({args.seeds} seeds per row, {args.tokens} calibration + {args.tokens} held-out tokens, "
        f"{time.time() - t0:.0f} s on CPU)"
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("command: PYTHONPATH=. python " + " ".join(sys.argv) + "\n")
            fh.write(
                "error = ||(W - Â B̂) X^T||_F^2 / ||W X^T||_F^2 on held-out tokens (mean over seeds); "
                "floor = unquantized A B\n\n"
            )
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
