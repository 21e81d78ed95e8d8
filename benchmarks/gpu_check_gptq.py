"""GPTQ on the GPU: the CUDA-graph block replay against the eager column loop, and against the CPU.

    python benchmarks/gpu_check_gptq.py [--out FILE]

For LLaVA-1.5-7B linear shapes (random weights, Gram of random correlated activations), 2/3/4 bits at once
(the sensitivity pass) and 2 bits alone (the compress pass): seconds of the eager loop and of the graphed one,
the share of codes that differ between them, and the relative output error of each. A code may flip where a
weight sits on a rounding boundary (the two paths reduce in different orders); the errors must agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from casp.quant.base import output_error
from casp.quant.gptq import GPTQConfig, _gptq
from casp.quant.uniform import UniformWeight

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096), (4096, 1024)]  # (N out, K in)


def timed(fn, *args, **kwargs):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    lines = [f"# {torch.cuda.get_device_name(dev)}; torch {torch.__version__}",
             f"{'N x K':>12} {'bits':>7} {'eager s':>8} {'graph s':>8} {'speedup':>7} {'codes differ':>12} "
             f"{'err eager':>10} {'err graph':>10}"]
    print(lines[0], flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    for N, K in SHAPES:
        X = torch.randn(4096, K, device=dev, generator=g) @ (torch.randn(K, K, device=dev, generator=g) / K**0.5)
        G = X.T @ X
        W = torch.randn(N, K, device=dev, generator=g) * 0.02
        for widths in ((2, 3, 4), (2,)):
            cfg = GPTQConfig(bits=widths[0])
            bits = widths[0] if len(widths) == 1 else torch.tensor(widths, device=dev).repeat_interleave(N)
            Ws = W.repeat(len(widths), 1)
            te, (ce, se, ze, perm, _) = timed(_gptq, Ws, G, bits, cfg, use_graph=False)
            tg, (cg, sg, zg, _, _) = timed(_gptq, Ws, G, bits, cfg, use_graph=True)
            differ = (ce != cg).float().mean().item()
            errs = []
            for c, s, z in ((ce, se, ze), (cg, sg, zg)):
                qw = UniformWeight.from_codes(c[:N], s[:N], z[:N], widths[0], 128, perm)
                errs.append(output_error(W, qw.dequantize(torch.float32), G))
            row = (f"{N:>5} x {K:<5} {','.join(map(str, widths)):>7} {te:8.2f} {tg:8.2f} {te / tg:6.1f}x "
                   f"{differ:12.2e} {errs[0]:10.4f} {errs[1]:10.4f}")
            print(row, flush=True)
            lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
