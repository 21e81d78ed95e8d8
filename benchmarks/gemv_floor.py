"""How fast can a batch-1 kernel *read* a packed weight on this GPU? The floor under casp's GEMV kernels.

A batch-1 dequantize-GEMV must read the packed codes, the group scales and zeros once. This script
times kernels that do only that: each program reads its rows and K range of the packed int32 words
(and the fp16 scales/zeros) tile by tile, folds them with XOR/add so that nothing is optimized away,
and writes one value per row, with the same grid shapes the GEMV kernels use (BN rows per program,
BW words per loop step, SPLIT programs along K). The loop is either the manual one-tile prefetch of
casp's kernels (``stages`` 1) or Triton's software pipeliner (``tl.range(num_stages=stages)``).

Also timed in the same run, as in benchmarks/kernels.py (CUDA-graph replay rotating through > 200 MB
of weight copies, so reads come from HBM): an empty kernel (the fixed cost of one launch inside a
graph), fp16 ``F.linear`` at batch 1 and a device-to-device copy (bandwidth ceiling).

    python benchmarks/gemv_floor.py --out benchmarks/results/gemv_floor_h100.txt
    python benchmarks/gemv_floor.py --layout kmajor --out FILE   # the K-major kernel's reads (its own grids)

Reported per (shape, bits): the best read-only config, its us and TB/s, and what that means for the
speedup over fp16 that any GEMV with this access pattern can reach.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.kernels import copy_bandwidth, n_copies, time_calls  # noqa: E402
from casp.kernels.triton_uniform import _split_reduce  # noqa: E402

SHAPES = [(11008, 4096), (4096, 11008), (4096, 4096)]  # (N out, K in)
GROUP = 128


@triton.jit
def _empty_kernel(out_ptr):
    tl.store(out_ptr + tl.program_id(0), 1)


@triton.jit
def _read_kernel(
    qw_ptr, s_ptr, z_ptr, out_ptr, N, KW, G, words_per_split, stride_qn, stride_sn,
    ws_ptr, cnt_ptr,
    BN: tl.constexpr, BW: tl.constexpr, WPG: tl.constexpr, STAGES: tl.constexpr, EPI: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """out[pid_s, rn] = fold of rows rn's words [pid_s * words_per_split, +words_per_split) and their groups."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rw = tl.arange(0, BW)
    lo = pid_s * words_per_split
    hi = tl.minimum(lo + words_per_split, KW)
    rows = rn[:, None].to(tl.int64) * stride_qn
    srows = rn[:, None].to(tl.int64) * stride_sn
    acc = tl.zeros([BN, BW], dtype=tl.int32)
    sacc = tl.zeros([BN, BW // WPG], dtype=tl.float32)
    rg = tl.arange(0, BW // WPG)
    if STAGES == 1:
        wn = tl.load(qw_ptr + rows + lo + rw[None, :], mask=nmask[:, None] & (lo + rw < hi)[None, :], other=0)
        for u0 in range(lo, hi, BW):
            w = wn
            nxt = u0 + BW + rw
            wn = tl.load(qw_ptr + rows + nxt[None, :], mask=nmask[:, None] & (nxt < hi)[None, :], other=0)
            g = (u0 // WPG) + rg
            gm = nmask[:, None] & (g < G)[None, :]
            sacc += tl.load(s_ptr + srows + g[None, :], mask=gm, other=0.0).to(tl.float32)
            sacc += tl.load(z_ptr + srows + g[None, :], mask=gm, other=0.0).to(tl.float32)
            acc ^= w
    else:
        for u0 in tl.range(lo, hi, BW, num_stages=STAGES):
            cols = u0 + rw
            w = tl.load(qw_ptr + rows + cols[None, :], mask=nmask[:, None] & (cols < hi)[None, :], other=0)
            g = (u0 // WPG) + rg
            gm = nmask[:, None] & (g < G)[None, :]
            sacc += tl.load(s_ptr + srows + g[None, :], mask=gm, other=0.0).to(tl.float32)
            sacc += tl.load(z_ptr + srows + g[None, :], mask=gm, other=0.0).to(tl.float32)
            acc ^= w
    r = tl.sum(acc, axis=1).to(tl.float32) + tl.sum(sacc, axis=1)
    if EPI:  # the GEMV kernels' split-K epilogue: partials to a workspace, the last program sums them
        r, last = _split_reduce(r, ws_ptr, cnt_ptr, rn, nmask, pid_n, pid_s, N, SPLIT)
        tl.store(out_ptr + rn, r, mask=nmask & last)
    else:
        tl.store(out_ptr + pid_s * N + rn, r, mask=nmask)


@triton.jit
def _read_kmajor_kernel(
    w_ptr, sz_ptr, out_ptr, ws_ptr, cnt_ptr, N, KW, words_per_split,
    BN: tl.constexpr, BC: tl.constexpr, WPG: tl.constexpr, STAGES: tl.constexpr, EPI: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """The K-major kernel's reads alone (casp/kernels/triton_kmajor.py): [BC, BN] word tiles of the [KW, N] words
    and one [BN] row of packed (scale, zero) per slab, over K range pid_s, folded with XOR / add."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rc = tl.arange(0, BC)
    lo = pid_s * words_per_split
    hi = tl.minimum(lo + words_per_split, KW)
    w_ptrs = w_ptr + rc[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros([BC, BN], dtype=tl.int32)
    sacc = tl.zeros([BN], dtype=tl.int32)
    for kw0 in tl.range(lo, hi, BC, num_stages=STAGES):
        acc ^= tl.load(w_ptrs + kw0 * N)
        sacc ^= tl.load(sz_ptr + (kw0 // WPG) * N + rn)
    r = (tl.sum(acc, axis=0) ^ sacc).to(tl.float32)
    if EPI:  # the GEMV kernels' split-K epilogue: partials to a workspace, the last program sums them
        r, last = _split_reduce(r, ws_ptr, cnt_ptr, rn, rn < N, pid_n, pid_s, N, SPLIT)
        tl.store(out_ptr + rn, r, mask=last)
    else:
        tl.store(out_ptr + pid_s * N + rn, r)


def read_kmajor_call(w, sz, out, bn, bc, split, warps, stages, wpg, epi=False):
    """One read-only call over K-major words w [KW, N] (N a multiple of bn, KW of bc) and packed sz [G, N]."""
    KW, N = w.shape
    per = -(-KW // split)
    per = -(-per // bc) * bc
    split = -(-KW // per)
    cnt = _counters(w.device)
    return lambda: _read_kmajor_kernel[(N // bn, split)](
        w, sz, out, out[N:], cnt, N, KW, per,
        BN=bn, BC=bc, WPG=wpg, STAGES=stages, EPI=epi, SPLIT=split if epi else 1, num_warps=warps, num_stages=stages,
    )  # fmt: skip


# the K-major kernel's grids (benchmarks/kernels.py WIDE / PREFETCH_GRID): rows, words per step, K splits, warps, stages
KMAJOR_CONFIGS = [
    (bn, bc, split, warps, 3)
    for bn, warps in ((256, 2), (512, 4), (128, 1))
    for bc in (4, 8)
    for split in (8, 16, 32)
]


def kmajor_floor(N: int, K: int, bits: int, copy_tbs: float, fp16_us: float, top: int) -> list[str]:
    """Best read-only times over KMAJOR_CONFIGS on K-major words of an [N, K] layer, with and without the epilogue."""
    wpg = GROUP * bits // 32
    KW = K * bits // 32
    G = K // GROUP
    nbytes = KW * N * 4 + G * N * 4 + K * 2
    mats = [
        (torch.randint(-(2**31), 2**31 - 1, (KW, N), dtype=torch.int32, device="cuda"),
         torch.randint(-(2**31), 2**31 - 1, (G, N), dtype=torch.int32, device="cuda"))
        for _ in range(n_copies(nbytes))
    ]  # fmt: skip
    out = torch.empty(64 * N, dtype=torch.float32, device="cuda")
    results = []
    for bn, bc, split, warps, stages in KMAJOR_CONFIGS:
        if bc > wpg:
            continue
        for epi in (False, True):
            us = time_calls([read_kmajor_call(w, sz, out, bn, bc, split, warps, stages, wpg, epi) for w, sz in mats])
            results.append((us, (bn, bc, split, warps, stages, epi)))
    results.sort()
    lines = [f"{N}x{K} {bits}-bit K-major: {nbytes / 1e6:.2f} MB read; {len(results)} read-only configs timed"]
    for us, (bn, bc, split, warps, stages, epi) in results[:top]:
        tbs = nbytes / us / 1e6
        lines.append(
            f"  read-kmajor BN={bn:<3} BC={bc} split={split:<2} warps={warps} stages={stages} epilogue={int(epi)}: "
            f"{us:6.2f} us {tbs:5.2f} TB/s ({100 * tbs / copy_tbs:3.0f}% of copy), fp16 / read = {fp16_us / us:4.2f}x"
        )
    return lines


def read_call(qw, s, z, out, bn, bw, split, warps, stages, wpg, epi=False):
    N, KW = qw.shape
    per = -(-KW // split)
    per = -(-per // bw) * bw
    split = -(-KW // per)
    grid = (triton.cdiv(N, bn), split)
    ws = out[N:]
    cnt = _counters(qw.device)
    return lambda: _read_kernel[grid](
        qw, s, z, out, N, KW, s.shape[1], per, qw.stride(0), s.stride(0), ws, cnt,
        BN=bn, BW=bw, WPG=wpg, STAGES=stages, EPI=epi, SPLIT=split if epi else 1,
        num_warps=warps, num_stages=max(stages, 1),
    )  # fmt: skip


def _counters(device):
    from casp.kernels import triton_uniform as tu

    tu._split_plan(64, 1, 2, 1, 1, 1, device)  # creates the zeroed per-device counters once
    return tu._COUNTERS[device]


CONFIGS = [
    (bn, bw, split, warps, stages)
    for bn, bw, split, warps, stages in itertools.product((16, 32, 64, 128), (16, 32, 64), (1, 4, 8, 16), (4,), (1, 3))
    if 256 <= bn * bw <= 4096
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--top", type=int, default=5, help="best configs listed per (shape, bits)")
    ap.add_argument("--layout", choices=["stored", "kmajor"], default="stored",
                    help="read the stored [N, K-words] layout (the gemv kernels') or the K-major [K-words, N] one")
    args = ap.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    dev = torch.cuda.get_device_name()
    copy_tbs = copy_bandwidth()
    lines = [f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}",
             f"device-to-device copy: {copy_tbs:.2f} TB/s (read + write)"]  # fmt: skip
    flag = torch.zeros(1024, dtype=torch.int32, device="cuda")
    empty_us = time_calls([lambda: _empty_kernel[(1,)](flag)] * 64)
    empty132 = time_calls([lambda: _empty_kernel[(132,)](flag)] * 64)
    lines.append(f"empty kernel in a graph: {empty_us:.2f} us per launch (1 program), {empty132:.2f} us (132 programs)")
    print("\n".join(lines), flush=True)
    for N, K in SHAPES:
        Ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(n_copies(N * K * 2))]
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        fp16_us = time_calls([(lambda W=W, x=x: F.linear(x, W)) for W in Ws])
        del Ws
        lines.append(f"{N}x{K} fp16 F.linear M=1: {fp16_us:.1f} us ({N * K * 2 / fp16_us / 1e6:.2f} TB/s)")
        print(lines[-1], flush=True)
        for bits in bits_list:
            if args.layout == "kmajor":
                lines += kmajor_floor(N, K, bits, copy_tbs, fp16_us, args.top)
                print("\n".join(lines[-1 - args.top :]), flush=True)
                continue
            KW = (K + 31) // 32 * bits
            G = -(-K // GROUP)
            wpg = GROUP * bits // 32
            nbytes = N * KW * 4 + 2 * N * G * 2 + K * 2
            copies = n_copies(nbytes)
            mats = [
                (
                    torch.randint(-(2**31), 2**31 - 1, (N, KW), dtype=torch.int32, device="cuda"),
                    torch.rand(N, G, device="cuda").half(),
                    torch.rand(N, G, device="cuda").half(),
                )
                for _ in range(copies)
            ]
            out = torch.empty(16 * N, dtype=torch.float32, device="cuda")
            results = []
            for cfg in CONFIGS:
                bn, bw, split, warps, stages = cfg
                if bw < wpg or bw * split > 4 * KW:
                    continue
                try:
                    us = time_calls([read_call(q, s, z, out, bn, bw, split, warps, stages, wpg) for q, s, z in mats])
                except Exception as e:  # noqa: BLE001  (one config failing to build must not stop the sweep)
                    print(f"  {cfg}: FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                results.append((us, cfg))
            results.sort()
            # the same best configs with the GEMV kernels' split-K epilogue (workspace + atomic counter)
            epi = []
            for _us, cfg in results[: args.top]:
                bn, bw, split, warps, stages = cfg
                if split > 1:
                    calls = [read_call(q, s, z, out, bn, bw, split, warps, stages, wpg, True) for q, s, z in mats]
                    us = time_calls(calls)
                    epi.append(f"  + split-K epilogue BN={bn} BW={bw} split={split} stages={stages}: {us:6.2f} us")
            del mats
            lines.append(f"{N}x{K} {bits}-bit: {nbytes / 1e6:.2f} MB read; {len(results)} read-only configs timed")
            for us, (bn, bw, split, warps, stages) in results[: args.top]:
                tbs = nbytes / us / 1e6
                lines.append(
                    f"  read BN={bn:<3} BW={bw:<3} split={split:<2} warps={warps} stages={stages}: {us:6.2f} us "
                    f"{tbs:5.2f} TB/s ({100 * tbs / copy_tbs:3.0f}% of copy), fp16 / read = {fp16_us / us:4.2f}x"
                )
            lines += epi
            print("\n".join(lines[-1 - min(args.top, len(results)) - len(epi) :]), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
