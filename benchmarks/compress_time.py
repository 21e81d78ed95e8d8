"""Compression time of GPTQ vs RTN: one 4096x11008 layer and the 7 linears of a 7B-shaped decoder block.

Block linears (LLaMA-7B shapes): q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008. Weights
are random (std 0.02); each distinct input width gets a Gram matrix G = X^T X of random correlated
activations (X = Z A + Z', A low-rank, plus a few channels scaled up). Building G is not timed. Each
quantizer call is timed alone, with the device synchronized before and after.

    python benchmarks/compress_time.py --device cuda --out benchmarks/results/compress_time_h100.txt
    python benchmarks/compress_time.py --device cpu --quick --out benchmarks/results/compress_time_cpu.txt

--quick divides every dimension by 4 (a CPU-sized run). On a CPU shared with other busy processes,
--threads 1 avoids the OpenMP oversubscription that makes GPTQ's many small updates crawl.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from casp.quant import make_config, output_error, quantize


def block_shapes(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of a LLaMA decoder block's linears."""
    attn = {p: (hidden, hidden) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    return {**attn, "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def gram(K: int, n_tokens: int, device: torch.device, seed: int) -> torch.Tensor:
    """G = X^T X [K, K] for X = Z A + Z' with rank-K/8 mixing A and 1% of channels scaled x20."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = max(K // 8, 1)
    A = torch.randn(r, K, generator=g, device=device) / r**0.5
    ch = torch.ones(K, device=device)
    ch[torch.randperm(K, generator=g, device=device)[: max(K // 100, 1)]] = 20.0
    G = torch.zeros(K, K, device=device)
    for start in range(0, n_tokens, 2048):  # chunks keep X small
        n = min(2048, n_tokens - start)
        X = torch.randn(n, r, generator=g, device=device) @ A + torch.randn(n, K, generator=g, device=device)
        X = X * ch
        G += X.T @ X
    return G


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(W, G, cfg, device):
    sync(device)
    t0 = time.perf_counter()
    qw = quantize(W, G, cfg)
    sync(device)
    return qw, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="dimensions / 4 (CPU-sized run)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens per Gram matrix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared, busy machine)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available; use --device cpu --quick")
    div = 4 if args.quick else 1
    hidden, inter = 4096 // div, 11008 // div
    wdtype = torch.float16 if device.type == "cuda" else torch.float32  # weights as a model would hold them
    cases = {f"layer {hidden}x{inter}": {"down_proj": (hidden, inter)}, "7B-shaped block": block_shapes(hidden, inter)}

    grams = {K: gram(K, args.tokens, device, args.seed + K) for K in (hidden, inter)}
    # warm-up (CUDA context, cuBLAS / cuSOLVER handles) so the first timed call is not penalized
    for method in ("rtn", "gptq"):
        quantize(torch.randn(64, 256, device=device, dtype=wdtype), grams[hidden][:256, :256], make_config(method))
    sync(device)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows = []
    for case, shapes in cases.items():
        weights = {n: (0.02 * torch.randn(s, generator=gen, device=device)).to(wdtype) for n, s in shapes.items()}
        for bits in args.bits:
            for method in ("rtn", "gptq"):
                cfg = make_config(method, bits=bits, group_size=args.group_size)
                total, errs, stored, params = 0.0, [], 0, 0
                for W in weights.values():
                    G = grams[W.shape[1]]
                    qw, dt = timed(W, G if method == "gptq" else None, cfg, device)
                    total += dt
                    errs.append(output_error(W, qw.dequantize(), G))
                    stored, params = stored + qw.storage_bits(), params + W.numel()
                rows.append((case, len(shapes), method, bits, total, sum(errs) / len(errs), stored / params))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"# command: python {' '.join(sys.argv)}",
        f"# device: {device.type} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"weights {str(wdtype).removeprefix('torch.')}, {args.tokens} calibration tokens per Gram matrix",
        "# gptq: act_order, block 128, damp 0.01; rtn: min-max (no clip search); time = sum over the case's linears",
        "# rel_out_err = tr(dW G dW^T) / tr(W G W^T), mean over the case's linears",
        f"{'case':<20} {'linears':>7} {'method':>6} {'bits':>4} {'group':>5} {'time_s':>9} {'rel_out_err':>11} "
        f"{'bits/weight':>11}",
    ]
    for case, n, method, bits, t, err, bpw in rows:
        lines.append(
            f"{case:<20} {n:>7} {method:>6} {bits:>4} {args.group_size:>5} {t:>9.3f} {err:>11.5f} {bpw:>11.4f}"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
