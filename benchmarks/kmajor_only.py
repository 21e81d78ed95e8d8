"""The K-major layout at every batch size ("kmajor-only") vs the stored layout's kernels vs fp16, on the GPU.

In "kmajor-only" mode (casp.kernels.set_batch1_kernel) a GPU holds each packed weight once, in the K-major layout,
and runs every batch size on it (casp/kernels/triton_kmajor_mm.py); the default mode holds the stored layout for
batches > 1 and a K-major copy for batch 1. This script times, per 7B/13B layer shape, bits (2, 4; group 128) and
batch M, side by side in one run: the stored-layout dispatch (``uniform_linear``), the K-major dispatch
(``kmajor_linear``) and fp16 ``F.linear``, as benchmarks/kernels.py times them (CUDA-graph replay rotating through
> 200 MB of copies, so weights stream from HBM). Also per row: the packed bytes each mode keeps on the GPU, the
error of each kernel against the fp32 reference, and the largest difference between the two modes' outputs.

    python benchmarks/kmajor_only.py --out benchmarks/results/kmajor_only_h100.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[0] = os.path.dirname(HERE)  # the repository, not this folder (its kernels.py would shadow casp.kernels)

from casp.kernels.slab_layout import make_kmajor_weight  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (13824, 5120), (5120, 13824)]
BATCHES = (1, 4, 16, 64, 512, 2048)


def _bench():
    """benchmarks/kernels.py as a module: its layer factory, copy count and graph timer."""
    spec = importlib.util.spec_from_file_location("casp_bench_kernels", os.path.join(HERE, "kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=None, help="e.g. 4096x11008,11008x4096 (N x K)")
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--batches", default=None, help="e.g. 1,16,2048")
    args = ap.parse_args()
    kb = _bench()
    from casp.kernels.triton_kmajor_mm import kmajor_linear
    from casp.kernels.triton_uniform import uniform_linear

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    batches = [int(b) for b in args.batches.split(",")] if args.batches else BATCHES
    head = [
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}",
        "stored: uniform_linear's dispatch on the stored layout (+ the K-major copy it makes for batch 1); "
        "kmajor-only: kmajor_linear on the K-major layout alone; fp16: F.linear",
        "timing: CUDA-graph replay, median of 15, rotating through > 200 MB of copies (weights from HBM); "
        "group 128; fp16 activations",
        "MB: packed bytes the mode keeps on the GPU for this layer; rel: ||y - fp32 ref|| / ||ref||; "
        "diff: max |y_stored - y_kmajor_only|",
        "",
        f"{'N x K':>12} {'bits':>4} {'M':>5} {'fp16 us':>9} {'stored us':>9} {'k-only us':>9} {'k-only/stored':>13} "
        f"{'k-only/fp16':>11} {'stored MB':>9} {'k-only MB':>9} {'rel stored':>10} {'rel k-only':>10} {'diff':>9}",
    ]
    print("\n".join(head), flush=True)
    lines = list(head)
    for N, K in shapes:
        for bits in (int(b) for b in args.bits.split(",")):
            qw0 = kb.make_layer(N, K, bits, kb.GROUP, "cuda", seed=bits)
            n = kb.n_copies(kb.packed_bytes(qw0))
            layers = [qw0] + [kb.clone_weight(qw0) for _ in range(n - 1)]
            kws = [make_kmajor_weight(q.qweight, q.scales, q.zeros, q.perm, bits, q.group_size, K) for q in layers]
            ref_w = qw0.dequantize(torch.float32)
            Ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(kb.n_copies(N * K * 2))]
            stored_mb = (kb.packed_bytes(qw0) + kws[0].nbytes()) / 1e6  # stored buffers + the batch-1 copy
            only_mb = kws[0].nbytes() / 1e6
            for M in batches:
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)

                def stored(q, x=x):
                    return uniform_linear(x, q.qweight, q.scales, q.zeros, q.perm, q.bits, q.group_size)

                fp16_us = kb.time_calls([(lambda W=W, x=x: F.linear(x, W)) for W in Ws])
                stored_us = kb.time_calls([(lambda q=q: stored(q)) for q in layers])
                only_us = kb.time_calls([(lambda kw=kw, x=x: kmajor_linear(x, kw)) for kw in kws])
                ref = x.float() @ ref_w.T
                ys, yk = stored(qw0), kmajor_linear(x, kws[0])
                diff = float((ys.float() - yk.float()).abs().max())
                line = (
                    f"{N:>5}x{K:<6} {bits:>4} {M:>5} {fp16_us:9.1f} {stored_us:9.1f} {only_us:9.1f} "
                    f"{only_us / stored_us:12.2f}x {only_us / fp16_us:10.2f}x {stored_mb:9.2f} {only_mb:9.2f} "
                    f"{rel_err(ys, ref):10.1e} {rel_err(yk, ref):10.1e} {diff:9.2e}"
                )
                print(line, flush=True)
                lines.append(line)
            del layers, kws, Ws
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
