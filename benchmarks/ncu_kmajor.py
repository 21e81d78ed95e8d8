"""Driver for an Nsight Compute profile of the batch-1 K-major kernel (casp/kernels/triton_kmajor.py).

Makes one random "uniform" layer (default 4096 out x 11008 in, group 128) and enough copies of it that the weights
stream from HBM, then calls the K-major kernel on each copy ``--calls`` times in turn. Profile one of the later
calls, e.g. (ncu leaves the clocks alone with --clock-control none):

    ncu --clock-control none --launch-skip 40 --launch-count 1 -k regex:kmajor_gemv \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 benchmarks/ncu_kmajor.py --bits 2 [--prefetch] [--pdl 2]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels import clone_weight, make_layer, n_copies, packed_bytes  # noqa: E402  (benchmarks/kernels.py)

from casp.kernels import triton_uniform as tu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x11008", help="N out x K in")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--pdl", type=int, default=0)
    ap.add_argument("--calls", type=int, default=4, help="passes over the copies")
    args = ap.parse_args()
    N, K = (int(v) for v in args.shape.split("x"))
    qw0 = make_layer(N, K, args.bits, 128, "cuda", seed=args.bits)
    layers = [qw0] + [clone_weight(qw0) for _ in range(n_copies(packed_bytes(qw0)) - 1)]
    cfg = tu.cfgs.pick_config("kmajor", args.bits, N, K, 1).replace(prefetch=args.prefetch, pdl=args.pdl)
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    for _ in range(args.calls):
        for qw in layers:
            tu.uniform_linear(x, qw.qweight, qw.scales, qw.zeros, None, args.bits, 128, None, "kmajor", cfg)
    torch.cuda.synchronize()
    print(f"{len(layers)} copies x {args.calls} calls, {cfg}")


if __name__ == "__main__":
    main()
