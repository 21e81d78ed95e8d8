"""Correctness of casp's Triton kernels for "uniform" weights against the torch path, on the GPU.

Every kernel (gemv, tensor-core dot, dequantize + cuBLAS) and the dispatching ``casp.kernels.linear``
are compared with ``UniformWeight.matmul`` (dequantize, then F.linear) and with an fp32 reference
for: the 7B/13B layer shapes and odd shapes (partial last group, K not a multiple of 32, N not a
multiple of the tile), bits 2/3/4/8, group 128 / per-channel / small odd groups, act-order on and
off, fp16 and bf16 activations, with and without bias, batch 1 to 2048. Prints one line per case
with the max abs error and fails (exit 1) if any relative error exceeds the dtype's tolerance or
an output is not finite.

    python benchmarks/gpu_check_kernels.py [--out FILE]
    python benchmarks/gpu_check_kernels.py --only slab --out FILE   # the slab-layout batch-1 kernels only
    python benchmarks/gpu_check_kernels.py --only kmajor --out FILE # the K-major batch-1 kernel only
    python benchmarks/gpu_check_kernels.py --only kmajor-only --out FILE  # every batch on the K-major layout
    python benchmarks/gpu_check_kernels.py --only codebooks --out FILE  # AQLM / QuIP# through QuantLinear's dispatch

The slab kernels (casp/kernels/triton_slab.py, paths "slab" and "slab16") are checked for 2/4/8 bits on
every shape, group 128 / per-channel / odd groups, act-order, fp16 and bf16, bias, 1 and 3 rows, and
through the dispatch with uniform_config.GEMV_M1 set to each of them.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels import SWEEP, make_layer, precompile  # noqa: E402  (benchmarks/kernels.py)

from casp import kernels  # noqa: E402
from casp.kernels import triton_uniform as tu  # noqa: E402
from casp.kernels.uniform_config import KernelConfig as C  # noqa: E402
from casp.quant.linear import QuantLinear  # noqa: E402
from casp.quant.uniform import UniformWeight  # noqa: E402

BIG = [(4096, 4096), (11008, 4096), (4096, 11008), (13824, 5120), (5120, 13824)]
ODD = [(576, 576, 128), (1000, 200, 64), (33, 100, -1), (96, 4096, 48), (250, 1000, 128), (40, 72, 8)]
# relative error ||y - ref|| / ||ref|| allowed: fp16/bf16 output rounding plus fp16 weights in the torch path
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def cases():
    """(N, K, group, bits, act_order, dtype, M, path or None for dispatch, bias)."""
    out = []
    for N, K in BIG:
        for bits in (2, 3, 4, 8):
            for group in (128, -1):
                act = group == 128 and bits in (2, 4)
                for M in (1, 4, 16, 2048):
                    out.append((N, K, group, bits, act, torch.float16, M, None, False))
                for M, path in ((1, "gemv"), (16, "gemv"), (4, "dot"), (3, "tc")):
                    out.append((N, K, group, bits, act, torch.float16, M, path, False))
    for N, K in BIG[1:2]:
        for bits in (2, 3, 4):
            for M in (1, 4, 16, 2048):
                out.append((N, K, 128, bits, True, torch.bfloat16, M, None, True))
    for N, K, group in ODD:
        for bits in (2, 3, 4, 8):
            for dtype in (torch.float16, torch.bfloat16):
                for M, path in (
                    (1, None), (3, None), (16, None), (37, None), (100, None), (5, "gemv"), (5, "dot"), (1, "tc"),
                    (1, "gemv"),
                ):  # fmt: skip
                    out.append((N, K, group, bits, bits == 3, dtype, M, path, M % 2 == 1))
    return out


def slab_cases():
    """Cases of the slab kernels. A path "slab16|64|512|4|8" forces KernelConfig(64, 512, 4, split=8) (every config
    benchmarks/kernels.py sweeps); "m1:<kernel>" runs the dispatch with GEMV_M1 = <kernel>."""
    out = []
    for path in ("slab", "slab16"):
        for N, K in BIG[:3]:  # the 7B shapes (each split count is another compile)
            for bits in (2, 4, 8):
                for group in (128, -1):
                    act = group == 128 and bits in (2, 4)
                    out.append((N, K, group, bits, act, torch.float16, 1, path, False))
            out.append((N, K, 128, 2, False, torch.bfloat16, 1, path, True))
            out.append((N, K, 128, 4, False, torch.float16, 3, path, True))
        for N, K, group in ODD + [(300, 520, 40), (64, 4096, 256), (48, 75, -1)]:
            for bits in (2, 4, 8):
                if group != -1 and group % (32 // bits):
                    continue  # not a slab layout (the dispatch keeps the stored-layout gemv there)
                for dtype in (torch.float16, torch.bfloat16):
                    out.append((N, K, group, bits, bits == 4, dtype, 1, path, dtype == torch.float16))
        for N, K in ((11008, 4096),):
            for bits in (2, 4):
                for c in SWEEP["slab"]:
                    out.append(
                        (
                            N,
                            K,
                            128,
                            bits,
                            False,
                            torch.float16,
                            1,
                            f"{path}|{c.bn}|{c.bk}|{c.num_warps}|{c.split}",
                            False,
                        )
                    )
        for N, K, group in ((11008, 4096, 128), (576, 576, 128), (40, 72, 8), (33, 100, -1)):
            for bits in (2, 3, 4, 8):
                out.append((N, K, group, bits, False, torch.float16, 1, f"m1:{path}", True))
    return out


def kmajor_cases():
    """Cases of the K-major kernel (casp/kernels/triton_kmajor.py): 2/4 bits, the 7B shapes and odd ones, act-order,
    bias, 1 and 3 rows, a spread of configs ("kmajor|bn|bk|warps|split|stages"), and the dispatch with
    GEMV_M1 = "kmajor" (which keeps the stored-layout gemv for bf16, 3 and 8 bits)."""
    out = []
    for N, K in BIG[:3]:
        for bits in (2, 4):
            for group in (128, -1):
                out.append((N, K, group, bits, group == 128, torch.float16, 1, "kmajor", False))
            out.append((N, K, 128, bits, False, torch.float16, 3, "kmajor", True))
    for N, K, group in ODD + [(300, 520, 40), (64, 4096, 256), (48, 75, -1), (1000, 96, 32)]:
        for bits in (2, 4):
            if group != -1 and group % (32 // bits):
                continue
            out.append((N, K, group, bits, bits == 4, torch.float16, 1, "kmajor", True))
    for N, K in ((4096, 11008), (11008, 4096)):
        for bits in (2, 4):
            for c in (C(512, 128, 4, 2, split=8), C(1024, 128, 8, 3, split=4), C(256, 64, 2, 2, split=16),
                      C(512, 64, 4, 3, split=32), C(1024, 64, 4, 2, split=1)):  # fmt: skip
                path = f"kmajor|{c.bn}|{c.bk}|{c.num_warps}|{c.split}|{c.num_stages}"
                out.append((N, K, 128, bits, False, torch.float16, 1, path, False))
    # L2 prefetch and programmatic dependent launch (each alone and together), on the 7B shapes (prefetch applies:
    # EVEN layers) and odd ones (masked: the kernel skips the prefetch), with bias and 3 rows
    for N, K, group, M in ((4096, 11008, 128, 1), (11008, 4096, 128, 1), (5120, 13824, 128, 1), (4096, 4096, 128, 3),
                           (576, 576, 128, 1), (1000, 200, 64, 1), (300, 520, 40, 2)):  # fmt: skip
        for bits in (2, 4):
            if group % (32 // bits):
                continue
            for c in (C(256, 128, 2, 3, split=16, prefetch=True), C(512, 64, 4, 3, split=4, prefetch=True, pdl=1),
                      C(256, 64, 2, 3, split=8, pdl=2), C(256, 128, 2, 2, split=1, prefetch=True, pdl=2)):  # fmt: skip
                path = f"kmajor|{c.bn}|{c.bk}|{c.num_warps}|{c.split}|{c.num_stages}|{int(c.prefetch)}|{c.pdl}"
                out.append((N, K, group, bits, bits == 4, torch.float16, M, path, M > 1))
    for N, K, group in ((11008, 4096, 128), (576, 576, 128), (40, 72, 8), (33, 100, -1)):
        for bits in (2, 3, 4, 8):
            for dtype in (torch.float16, torch.bfloat16):
                out.append((N, K, group, bits, False, dtype, 1, "m1:kmajor", True))
    return out


def kmajor_only_cases():
    """Cases of "kmajor-only" mode (casp/kernels/triton_kmajor_mm.py: the K-major layout at every batch size):
    path "konly" (kmajor_linear's own choice) or "konly:tc" / "konly:dequant" forced; 2/4 bits, the 7B/13B shapes
    and odd ones, group 128 / per-channel / small groups, act-order, fp16 and bf16, bias, 1 to 2048 rows."""
    out = []
    for N, K in BIG:
        for bits in (2, 4):
            for group in (128, -1):
                for M in (1, 4, 16, 64, 2048):
                    out.append((N, K, group, bits, group == 128, torch.float16, M, "konly", M == 4))
    for N, K in BIG[1:3]:
        for bits in (2, 4):
            for M in (1, 16, 2048):
                out.append((N, K, 128, bits, True, torch.bfloat16, M, "konly", True))
            for M, path in ((1, "konly:tc"), (3, "konly:tc"), (100, "konly:tc"), (3, "konly:dequant")):
                out.append((N, K, 128, bits, False, torch.float16, M, path, False))
    for N, K, group in ODD + [(300, 520, 40), (64, 4096, 256), (48, 75, -1), (1000, 96, 32)]:
        for bits in (2, 4):
            if group != -1 and group % (32 // bits):
                continue
            for M in (1, 5, 70):
                out.append((N, K, group, bits, bits == 4, torch.float16, M, "konly", True))
    return out


def _kmajor_only(x, qw, g, bits, bias, path):
    """kmajor_linear on a K-major copy of qw (path "konly" or "konly:<tc|dequant>")."""
    from casp.kernels.slab_layout import make_kmajor_weight
    from casp.kernels.triton_kmajor_mm import kmajor_linear

    kw = make_kmajor_weight(qw.qweight, qw.scales, qw.zeros, qw.perm, bits, g, x.shape[1])
    return kmajor_linear(x, kw, bias, path.partition(":")[2] or None)


def kmajor_only_memory_check() -> tuple[bool, str]:
    """A stack of 4 QuantLinear 4096x4096 (2 bits) on the GPU: GPU memory with the stored layout, after a batch-1
    call in the default mode (which adds the K-major copy), and in "kmajor-only" mode; the outputs of both modes."""
    from casp.kernels.slab_layout import kernel_copy_bytes

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = torch.nn.Sequential(*[QuantLinear.from_weight(make_layer(4096, 4096, 2, 128, "cuda", seed=i))
                                  for i in range(4)])  # fmt: skip
    stored = torch.cuda.memory_allocated() - base
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16) * 0.05
    x16 = torch.randn(16, 4096, device="cuda", dtype=torch.float16) * 0.05
    auto = kernels.resolve_batch1_kernel(model, "auto")  # on an 80 GB GPU: "kmajor" (the copies fit)
    with torch.no_grad():
        y1, y16 = model(x), model(x16)
        both = torch.cuda.memory_allocated() - base
        kernels.set_batch1_kernel(model, "kmajor-only")
        torch.cuda.empty_cache()
        only = torch.cuda.memory_allocated() - base
        k1, k16 = model(x), model(x16)
    rel = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in ((k1, y1), (k16, y16)))
    # (the outputs and the split-K counters, allocated by the first calls, add well under 2 MiB)
    ok = (only - stored < 2**21 and both - stored > 0.9 * stored and rel < 3e-3 and kernel_copy_bytes(model) > 0
          and auto == "kmajor")
    line = (f"{'OK ' if ok else 'FAIL'} kmajor-only memory, 4 x QuantLinear 4096x4096 2-bit: stored layout "
            f"{stored / 2**20:.1f} MiB, default mode after a batch-1 call {both / 2**20:.1f} MiB, kmajor-only "
            f"{only / 2**20:.1f} MiB; outputs vs the default mode (1 and 16 rows) rel {rel:.1e}; auto picks {auto}")
    return ok, line


def codebook_dispatch_checks() -> list[tuple[bool, str]]:
    """QuantLinear of AQLM 2x8 and QuIP# (2/3/4-bit) weights on the GPU: the kernel casp.kernels.kernel_for names
    (AQLM: the GEMV at one row, the Triton dequantize + cuBLAS at three; QuIP#: the Triton decode + cuBLAS) agrees
    with the fp32 reference, fp16 and bf16, with a bias."""
    from casp.quant.aqlm import AQLMWeight
    from casp.quant.quip import RESID_SCALE, QuIPWeight

    def int16(t):
        return (t - (t >= 1 << 15).long() * (1 << 16)).to(torch.int16)

    weights = []
    for N, K in ((4096, 4096), (11008, 4096), (4096, 11008), (576, 576), (40, 72)):
        g = torch.Generator(device="cuda").manual_seed(N + K)
        codes = torch.randint(0, 256, (N, K // 8, 2), generator=g, device="cuda").to(torch.uint8)
        cb = (torch.randn(2, 256, 8, generator=g, device="cuda") * 0.1).half()
        weights.append(AQLMWeight(codes, cb, (torch.rand(N, generator=g, device="cuda") + 0.5).half(), 8))
    for (N, K), bits in (((4096, 11008), 2), ((11008, 4096), 2), ((4096, 4096), 3), ((576, 576), 4), ((40, 96), 2)):
        g = torch.Generator(device="cuda").manual_seed(N + K + bits)
        codes = int16(torch.randint(0, 1 << 16, (N, K // 8), generator=g, device="cuda"))
        codes2 = (None if bits == 2 else torch.randint(0, 256, (N, K // 8), generator=g, device="cuda").to(torch.uint8)
                  if bits == 3 else int16(torch.randint(0, 1 << 16, (N, K // 8), generator=g, device="cuda")))
        su = (torch.randint(0, 2, (K,), generator=g, device="cuda") * 2 - 1).to(torch.int8)
        sv = (torch.randint(0, 2, (N,), generator=g, device="cuda") * 2 - 1).to(torch.int8)
        scales = (torch.rand(N, generator=g, device="cuda") * 0.02 + 0.01).half()
        weights.append(QuIPWeight(codes, codes2, scales, su, sv, bits, RESID_SCALE.get(bits, 1.0)))
    results = []
    for qw in weights:
        N, K = qw.shape
        W32 = qw.dequantize(torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            lin = QuantLinear.from_weight(qw, torch.randn(N, device="cuda")).to(dtype)
            for shape in ((1, 1, K), (3, K)):
                x = torch.randn(*shape, device="cuda", dtype=dtype)
                kind = kernels.kernel_for(x, qw)
                y = lin(x)
                ref = x.float() @ W32.T + lin.bias.float()
                rel = float((y.float() - ref).norm() / ref.norm())
                want = {"aqlm": "triton_aqlm" if x.numel() == K else "triton_aqlm_dense",
                        "quip": "triton_quip_dense"}[qw.format]
                ok = kind == want and y.dtype == dtype and bool(torch.isfinite(y).all()) and rel < TOL[dtype]
                name = f"{qw.format} {getattr(qw, 'bits', 2)}-bit"
                results.append((ok, f"{'OK ' if ok else 'FAIL'} {name} N={N} K={K} {str(dtype)[6:]} x{list(shape)}: "
                                    f"{kind}, rel={rel:.1e}"))
    return results


def _path_cfg(path):
    """(path, KernelConfig or None) of a case's path string "name|bn|bk|warps|split[|stages]"."""
    if path is None or "|" not in path:
        return path, None
    name, bn, bk, nw, split, *rest = path.split("|")  # rest: [stages [, prefetch, pdl]]
    stages = int(rest[0]) if rest else 2
    prefetch, pdl = (bool(int(rest[1])), int(rest[2])) if len(rest) > 2 else (False, 0)
    return name, tu.KernelConfig(int(bn), int(bk), int(nw), stages, split=int(split), prefetch=prefetch, pdl=pdl)


def _run(x, qw, g, bits, bias, path):
    """(output, name) of one case: a forced kernel path, the dispatch (path None), the dispatch with a
    given batch-1 kernel ("m1:<kernel>"), or the K-major layout alone ("konly[:path]")."""
    if path is not None and path.startswith("konly"):
        return _kmajor_only(x, qw, g, bits, bias, path), path
    if path is None or path.startswith("m1:"):
        m1 = None if path is None else path[3:]
        default_m1 = tu.cfgs.GEMV_M1
        if m1:
            tu.cfgs.GEMV_M1 = m1
        try:
            y = kernels.linear(x, qw, bias)
            name = f"dispatch:{tu.choose_path(x.shape[0], bits, g, qw.n_groups, half=x.dtype == torch.float16)}"
        finally:
            tu.cfgs.GEMV_M1 = default_m1
        return y, name
    name, cfg = _path_cfg(path)
    y = tu.uniform_linear(x, qw.qweight, qw.scales, qw.zeros, qw.perm, bits, g, bias, name, cfg)
    return y, path


def _warm(case) -> str:
    N, K, group, bits, act, dtype, M, path, bias = case
    default_m1 = tu.cfgs.GEMV_M1
    if path is not None and path.startswith("m1:"):
        tu.cfgs.GEMV_M1 = path[3:]
        path = None
    group = K if group == -1 else group
    G = -(-K // group)
    qweight = torch.zeros(N, (K + 31) // 32 * bits, dtype=torch.int32, device="cuda")
    scales = torch.ones(N, G, dtype=torch.float16, device="cuda")
    zeros = torch.zeros(N, G, dtype=torch.float16, device="cuda")
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    b = torch.zeros(N, dtype=dtype, device="cuda") if bias else None
    try:
        if path is not None and path.startswith("konly"):
            _kmajor_only(x, UniformWeight(qweight, scales, zeros, (N, K), bits, group), group, bits, b, path)
        else:
            name, cfg = _path_cfg(path)
            tu.uniform_linear(x, qweight, scales, zeros, None, bits, group, b, name, cfg)
        torch.cuda.synchronize()
    except Exception as e:  # reported again (as a failed case) when the case runs in the parent
        return f"{type(e).__name__}"
    finally:
        tu.cfgs.GEMV_M1 = default_m1
    return ""


def pdl_chain_checks(n_layers: int = 8, replays: int = 20) -> list[tuple[bool, str]]:
    """Each layer's input is the previous layer's output, 4096 x 4096, K-major kernel with programmatic dependent
    launch (and L2 prefetch), eagerly and replayed from a CUDA graph: the outputs must equal, bit for bit, the same
    chain without PDL (a kernel that read x before the previous one finished would differ), in every replay."""
    results = []
    for bits in (2, 4):
        sd = (2 * ((1 << bits) ** 2 - 1) / 12) ** 0.5  # std of (code - zero) for uniform codes and zeros
        layers = []
        for i in range(n_layers):
            qw = make_layer(4096, 4096, bits, 128, "cuda", seed=100 * bits + i)
            qw.scales.copy_((torch.rand_like(qw.scales.float()) + 0.5).half() / (sd * 64.0))  # gain ~1 per layer
            layers.append(qw)
        x0 = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
        base = C(256, 128 if bits == 2 else 64, 2, 3, split=16)

        def chain(cfg, layers=layers, x0=x0, bits=bits):
            h = x0
            for qw in layers:
                h = tu.uniform_linear(h, qw.qweight, qw.scales, qw.zeros, None, bits, 128, None, "kmajor", cfg)
            return h

        ref = chain(base).clone()
        ok_ref = bool(torch.isfinite(ref).all()) and 0.01 < float(ref.float().abs().mean()) < 100
        for cfg in (base.replace(pdl=1), base.replace(pdl=2), base.replace(prefetch=True, pdl=1)):
            eager = chain(cfg)
            static = {}
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static["y"] = chain(cfg)
            same = 0
            for _ in range(replays):
                static["y"].fill_(float("nan"))
                g.replay()
                same += bool(torch.equal(static["y"], ref))
            ok = ok_ref and torch.equal(eager, ref) and same == replays
            line = (f"{'OK ' if ok else 'FAIL'} PDL chain of {n_layers} layers 4096x4096 b={bits} "
                    f"prefetch={int(cfg.prefetch)} pdl={cfg.pdl}: eager equal={torch.equal(eager, ref)}, "
                    f"graph replays equal {same}/{replays} (mean |y| {float(ref.float().abs().mean()):.3f})")
            results.append((ok, line))
            del g, static
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--only", choices=["all", "slab", "kmajor", "kmajor-only", "old", "chain", "codebooks"],
                    default="all", help="which kernels to check (chain: the PDL chain check alone)")
    args = ap.parse_args()
    all_cases = {
        "all": cases() + slab_cases() + kmajor_cases() + kmajor_only_cases(),
        "slab": slab_cases(),
        "kmajor": kmajor_cases(),
        "kmajor-only": kmajor_only_cases(),
        "old": cases(),
        "chain": [],
        "codebooks": [],
    }[args.only]
    precompile(all_cases, args.workers, fn=_warm)
    # each line goes to the file as it is made: a run cut off by a time limit keeps the cases it checked
    out = open(args.out, "w", buffering=1) if args.out else None  # noqa: SIM115
    lines, fails, layers = [], 0, {}
    worst = {}
    for case in all_cases:
        N, K, group, bits, act, dtype, M, path, use_bias = case
        g = K if group == -1 else group
        key = (N, K, g, bits, act)
        if key not in layers:
            layers.clear()
            qw = make_layer(N, K, bits, g, "cuda", act_order=act, seed=N + K + bits)
            layers[key] = (qw, qw.dequantize(torch.float32))
        qw, W32 = layers[key]
        torch.manual_seed(M + N)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        bias = torch.randn(N, device="cuda", dtype=dtype) if use_bias else None
        try:
            y, name = _run(x, qw, g, bits, bias, path)
        except Exception as e:  # a kernel that fails to build is a failed case, not a lost run
            fails += 1
            line = f"FAIL N={N} K={K} g={g} b={bits} {path}: {type(e).__name__}: {str(e)[:300]}"
            print(line, flush=True)
            lines.append(line)
            if out:
                out.write(line + "\n")
            continue
        if path is not None and path.startswith("m1:"):
            name = f"{path}->{name.split(':')[-1]}"
        # torch path, as UniformWeight.matmul: dequantize to the activation dtype, then F.linear
        y_torch = torch.nn.functional.linear(x, W32.to(dtype)) + (0 if bias is None else bias)
        ref = x.float() @ W32.T + (0 if bias is None else bias.float())
        finite = bool(torch.isfinite(y).all())
        rel = float((y.float() - ref).norm() / ref.norm())
        rel_torch = float((y_torch.float() - ref).norm() / ref.norm())
        err_torch = float((y.float() - y_torch.float()).abs().max())
        ok = finite and y.dtype == dtype and y.shape == (M, N) and rel < TOL[dtype]
        fails += not ok
        wkey = (name.split(":")[-1], bits)
        worst[wkey] = max(worst.get(wkey, 0.0), err_torch)
        line = (
            f"{'OK ' if ok else 'FAIL'} N={N:<5} K={K:<5} g={g:<5} b={bits} act={int(act)} {str(dtype)[6:]:>8} "
            f"M={M:<4} {name:<22} bias={int(use_bias)} max|y-torch|={err_torch:.2e} rel={rel:.1e} "
            f"(torch path rel={rel_torch:.1e})"
        )
        lines.append(line)
        if out:
            out.write(line + "\n")
        if not ok:
            print(line, flush=True)
    # the module wrapper goes through the same dispatch
    qw = make_layer(576, 576, 2, 128, "cuda", act_order=True)
    lin = QuantLinear.from_weight(qw, torch.randn(576, device="cuda", dtype=torch.float16))
    x = torch.randn(2, 7, 576, device="cuda", dtype=torch.float16)
    y = lin(x)
    ref = qw.matmul(x) + lin.bias
    ql_ok = y.shape == (2, 7, 576) and float((y - ref).abs().max()) < 1e-2
    fails += not ql_ok
    lines.append(f"{'OK ' if ql_ok else 'FAIL'} QuantLinear [2, 7, 576] through casp.kernels.linear")
    n_checks = len(all_cases) + 1
    extra = []  # (ok, line) of the checks that are not kernel cases
    if args.only in ("all", "kmajor-only"):
        extra.append(kmajor_only_memory_check())
    if args.only in ("all", "kmajor", "chain"):
        extra += pdl_chain_checks()
    if args.only in ("all", "codebooks"):
        extra += codebook_dispatch_checks()
    for ok, line in extra:
        fails += not ok
        n_checks += 1
        lines.append(line)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
    summary = [
        "worst max|y - torch path| per (path, bits): "
        + ", ".join(f"{p}/{b}: {e:.2e}" for (p, b), e in sorted(worst.items()))
    ]
    summary.append(f"{n_checks - fails} passed, {fails} failed")
    print("\n".join(lines[-12:] + summary), flush=True)
    if out:
        out.write("\n".join(lines[-1:] + summary) + "\n")
        out.close()
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
