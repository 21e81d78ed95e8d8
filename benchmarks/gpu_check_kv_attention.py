"""GPU check and timing of the fused decode attention over AKVQ-VL's packed KV cache (casp.kv.attention,
Triton kernel casp/kernels/triton_kv_attention.py), at LLaVA-1.5-7B shapes: 32 heads, head dim 128.

For each layout (TSA: text 4-bit + image 2-bit classes; PSA: one class + 15 fp16 pivot tokens per row),
bits (2, 4; at 4 bits every class is 4-bit), batch and sequence length, one AKVQ layer (fp16 window 128,
block 32, values rotated online) is filled with random fp16 K/V (keys with outlier channels), one decode
token is appended through the fused path, and the attention of a random query is computed by:

* fused: ``layer_decode_attention(..., use_triton=True)``: Triton kernel per class + fp16 window/pivots
  in torch + log-sum-exp merge (what decoding runs);
* reference: the same with ``use_triton=False`` (gather + dequantize in fp32): error ``rel ref``;
* sdpa-dequant: SDPA over the dequantized cache the torch path builds (``_load_into`` + window):
  error ``rel sdpa``.

Timings (triton.testing.do_bench: median, L2 flushed between calls, eager launches included):
``kernel`` the Triton kernel of the largest class alone, with its packed bytes read / time; ``fused``
the whole fused call; ``torch path`` dequantize the layer's cache into fp16 + SDPA (the old per-step
cost); ``fp16 sdpa`` SDPA decode over an fp16 cache of the same length (what an fp16 KV cache costs).
Exit status 1 if any relative error exceeds the tolerance or an output is not finite.

    PYTHONPATH=. python benchmarks/gpu_check_kv_attention.py --out kv_attention_h100.txt [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

# Run as a script, this folder leads sys.path and its kernels.py would shadow the `kernels` package that
# transformers probes: put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from casp.kv import AKVQConfig  # noqa: E402
from casp.kv.attention import layer_decode_attention  # noqa: E402
from casp.kv.cache import AKVQLayer  # noqa: E402

HEADS, HEAD_DIM, IMAGE = 32, 128, (5, 581)
TOL_REF, TOL_SDPA = 2e-3, 1e-2  # fp16 output rounding; + fp16 scores/probabilities inside SDPA
FULL = [(1, 600), (1, 4096), (16, 600), (16, 2048), (64, 600), (64, 2048), (64, 4096)]
QUICK = [(1, 600), (16, 2048), (64, 4096)]
# (kernel, tokens per tile, warps) timed besides the default; all compile for sm_90 without spills
TILE_VARIANTS = [
    ("simt", 8, 1),
    ("simt", 16, 1),
    ("simt", 16, 2),
    ("simt", 32, 1),
    ("simt", 64, 4),
    ("tc", 32, 4),
    ("tc", 128, 4),
]


def build_layer(layout: str, bits: int, batch: int, length: int, kv_heads: int, seed: int, device: str) -> AKVQLayer:
    """An AKVQ layer holding ``length`` tokens (a prefill of length - 1 and one fused decode step)."""
    cfg = AKVQConfig(bits=bits, salient_bits=4, residual=128, block=32)
    layer = AKVQLayer(cfg, layout.lower(), True, HEAD_DIM)
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.float16 if device == "cuda" else torch.float32
    image = torch.zeros(batch, length, dtype=torch.bool, device=device)
    image[:, IMAGE[0] : min(IMAGE[1], length)] = True
    layer.image_mask = image
    pivots = torch.zeros(batch, length, dtype=torch.bool, device=device)
    pivots[:, 0] = True
    pivots.scatter_(1, torch.randint(1, length - 160, (batch, 14), device=device, generator=g), True)
    layer.pivots = pivots
    layer.fused_decode = True
    shape = (batch, kv_heads, length - 1, HEAD_DIM)
    k = torch.randn(shape, device=device, dtype=dtype, generator=g)
    k[..., [3, 77]] *= 8  # outlier channels, as real keys have
    v = torch.randn(shape, device=device, dtype=dtype, generator=g)
    layer.update(k, v)
    del k, v
    new = torch.randn(2, batch, kv_heads, 1, HEAD_DIM, device=device, dtype=dtype, generator=g)
    layer.update(new[0], new[1])
    return layer


def dequantized_kv(layer: AKVQLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path's K/V: the store dequantized into fp16, then the window (as update() builds it)."""
    b, h, w, d = layer.keys.shape
    s = layer.stored
    k = layer.keys.new_empty(b, h, s + w, d)
    v = layer.values.new_empty(b, h, s + w, d)
    if s:
        layer._load_into(k[:, :, :s], v[:, :, :s])
    k[:, :, s:], v[:, :, s:] = layer.keys, layer.values
    return k, v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def expand(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def run_case(layout, bits, batch, length, q_heads, kv_heads, bench, device="cuda") -> dict:
    from triton.testing import do_bench

    from casp.kernels.triton_kv_attention import packed_decode_partials

    scale = HEAD_DIM**-0.5
    layer = build_layer(layout, bits, batch, length, kv_heads, batch * 7919 + length + bits, device)
    q = torch.randn(batch, q_heads, 1, HEAD_DIM, device=device, dtype=layer.keys.dtype)
    fused = layer_decode_attention(layer, q, None, scale, use_triton=True)
    ref = layer_decode_attention(layer, q, None, scale, use_triton=False)
    k, v = dequantized_kv(layer)
    group = q_heads // kv_heads
    sdpa = F.scaled_dot_product_attention(q, expand(k, group), expand(v, group), scale=scale)
    row = {
        "layout": layout,
        "bits": bits,
        "batch": batch,
        "length": length,
        "heads": f"{q_heads}/{kv_heads}",
        "rel_ref": rel(fused, ref),
        "rel_sdpa": rel(fused, sdpa),
        "finite": bool(torch.isfinite(fused).all()),
    }
    del ref
    if bench:
        packed, _ = layer.decode_segments()
        seg = max(packed, key=lambda s: s.k.nbytes)
        q_rot = (q[:, :, 0] @ layer.hadamard_matrix()).contiguous()
        idx = seg.idx
        pk, pv = seg.k, seg.v
        args = (q_rot, pk.codes, pk.scale, pk.zero, pv.codes, pv.scale, pv.zero, idx, pk.bits, scale)
        t_kernel = do_bench(lambda: packed_decode_partials(*args), return_mode="median")
        row["kernel_us"] = 1e3 * t_kernel
        # other tile shapes (tokens per tile, warps) that compile without spills; the best one is reported
        row["variants"] = {}
        for kind, blk, w in TILE_VARIANTS:
            fn = functools.partial(packed_decode_partials, *args, block=blk, num_warps=w, kernel=kind)
            row["variants"][f"{kind} {blk}x{w}"] = 1e3 * do_bench(fn, return_mode="median")
        row["kernel_gbs"] = (seg.k.nbytes + seg.v.nbytes + idx.nbytes) / (t_kernel * 1e-3) / 1e9
        row["fused_us"] = 1e3 * do_bench(lambda: layer_decode_attention(layer, q, None, scale), return_mode="median")

        def torch_path():
            kk, vv = dequantized_kv(layer)
            return F.scaled_dot_product_attention(q, expand(kk, group), expand(vv, group), scale=scale)

        del k, v
        row["torch_us"] = 1e3 * do_bench(torch_path, return_mode="median")
        shape = (batch, kv_heads, length, HEAD_DIM)
        k16 = torch.randn(shape, device=device, dtype=torch.float16)
        v16 = torch.randn(shape, device=device, dtype=torch.float16)
        row["fp16_us"] = 1e3 * do_bench(
            lambda: F.scaled_dot_product_attention(q, expand(k16, group), expand(v16, group), scale=scale),
            return_mode="median",
        )
        row["fp16_gbs"] = (k16.nbytes + v16.nbytes) / (row["fp16_us"] * 1e-6) / 1e9
        row["cache_ratio"] = (k16.nbytes + v16.nbytes) / sum(t.nbytes for t in layer.tensors())
        del k16, v16
    return row


def profile_case(
    layout: str, bits: int, batch: int, length: int, device: str = "cuda", calls: int = 50, compiled: bool = False
) -> str:
    """Where the fused decode call's time goes: host (CPU) time per call of each stage, launched without waiting
    for the GPU, against the GPU time of the whole call; and the torch/Triton kernels launched per call."""
    from torch.profiler import ProfilerActivity, profile

    from casp.kernels.triton_kv_attention import packed_decode_partials
    from casp.kv.attention import (
        Partial,
        decode_attention,
        dense_partial,
        key_valid_from_mask,
        merge_partials,
        packed_partial,
    )

    scale = HEAD_DIM**-0.5
    layer = build_layer(layout, bits, batch, length, HEADS, 0, device)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=layer.keys.dtype)
    mask = torch.zeros(batch, 1, 1, layer.get_seq_length(), device=device, dtype=q.dtype)  # sdpa-style, all keys
    packed, dense = layer.decode_segments()
    seg = max(packed, key=lambda s: s.k.nbytes)
    h = layer.hadamard_matrix()
    q_rot = (q[:, :, 0] @ h).contiguous()
    stages = {
        "whole call, no mask": lambda: layer_decode_attention(layer, q, None, scale),
        "whole call, 4-D mask": lambda: layer_decode_attention(layer, q, mask, scale),
        "decode_segments()": lambda: layer.decode_segments(),
        "key_valid_from_mask": lambda: key_valid_from_mask(mask, layer.get_seq_length()),
        "decode_attention (segments given)": lambda: decode_attention(
            q[:, :, 0], packed, dense, scale, None, h, layer.rotate_keys, layer.rotate_values
        ),
        "Triton kernel launch (largest class)": lambda: packed_decode_partials(
            q_rot,
            seg.k.codes,
            seg.k.scale,
            seg.k.zero,
            seg.v.codes,
            seg.v.scale,
            seg.v.zero,
            seg.idx,
            seg.k.bits,
            scale,
        ),
        "one small torch op (x + 1)": lambda: q + 1,
    }
    if compiled:  # does fusing the small torch ops around the kernel pay? (torch.compile of the torch parts)
        dense_c = torch.compile(dense_partial, dynamic=False)
        merge_c = torch.compile(merge_partials, dynamic=False)

        def compiled_call():
            q0 = q[:, :, 0]
            q_r = q0 @ h if layer.rotate_keys else q0
            parts = [packed_partial(q_r, sg.k, sg.v, sg.idx, scale) for sg in packed]
            if layer.rotate_values:
                parts = [Partial(pt.m, pt.l, pt.acc @ h.float()) for pt in parts]
            parts += [dense_c(q0, d.k, d.v, d.valid, scale) for d in dense]
            return merge_c(parts)

        ref = decode_attention(q[:, :, 0], packed, dense, scale, None, h, layer.rotate_keys, layer.rotate_values)
        err = ((compiled_call() - ref).norm() / ref.norm()).item()
        stages[f"decode_attention, compiled torch parts (rel err {err:.1e})"] = compiled_call
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    lines = [f"## profile: {layout} {bits}-bit, batch {batch}, {length} tokens, {HEADS} heads ({calls} calls each)"]
    lines.append("| stage | host us per call (no sync) | GPU-inclusive us per call |")
    lines.append("| --- | --- | --- |")
    for name, fn in stages.items():
        for _ in range(5):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) / calls * 1e6
        sync()
        total = (time.perf_counter() - t0) / calls * 1e6
        lines.append(f"| {name} | {host:.0f} | {total:.0f} |")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            layer_decode_attention(layer, q, mask, scale)
        sync()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sum(e.count for e in kernels) / 10
    lines.append(f"\nGPU kernels per call: {launches:.0f}; by count (name: launches per call):")
    for e in sorted(kernels, key=lambda e: -e.count)[:15]:
        lines.append(f"- {e.key[:90]}: {e.count / 10:.0f}")
    top = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    lines.append(
        "\naten ops per call (top 15 by count): "
        + ", ".join(f"{e.key[6:]} {e.count / 10:.0f}" for e in sorted(top, key=lambda e: -e.count)[:15])
    )
    return "\n".join(lines)


MERGE_VARIANTS = [(32, 4), (16, 1), (16, 2), (32, 1), (64, 2)]  # (window tokens per tile, warps)


def merge_bench() -> list[str]:
    """Time casp.kernels.triton_kv_merge.window_merge variants at kv-bench's largest-batch shapes."""
    from triton.testing import do_bench

    from casp.kernels.triton_kv_merge import window_merge

    lines = ["", "window + merge kernel (window_merge) variants, us per call:"]
    for b, w in ((160, 48), (792, 48), (64, 128)):
        q = torch.randn(b, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
        k = torch.randn(b, HEADS, w, HEAD_DIM, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        m = torch.randn(b, HEADS, 2, device="cuda")
        l_sum = torch.rand(b, HEADS, 2, device="cuda") + 1
        acc = torch.randn(b, HEADS, 2, HEAD_DIM, device="cuda")
        ref = window_merge(q, k, v, None, m, l_sum, acc, 0.088)
        times = []
        for blk, warps in MERGE_VARIANTS:
            out = window_merge(q, k, v, None, m, l_sum, acc, 0.088, blk, warps)
            err = float((out - ref).abs().max())
            fn = functools.partial(window_merge, q, k, v, None, m, l_sum, acc, 0.088, blk, warps)
            us = 1e3 * do_bench(fn, return_mode="median")
            times.append(f"{blk}x{warps}: {us:.0f} (max diff {err:.1e})")
        gb = 2 * k.numel() * 2 / 1e9
        lines.append(f"batch {b}, window {w} ({gb:.2f} GB of fp16 K+V): " + ", ".join(times))
    return lines


def _best_variant(row: dict) -> str:
    variants = row.get("variants")
    if not variants:
        return "-"
    name = min(variants, key=variants.get)
    return f"{name}: {variants[name]:.0f}"


def table(rows: list[dict]) -> str:
    nan = float("nan")
    lines = [
        "| layout | bits | batch | tokens | heads q/kv | rel ref | rel sdpa | kernel us | kernel GB/s "
        "| best kernel, tile (tokens x warps): us | fused us | torch path us | fp16 sdpa us | fp16 GB/s | fp16 / fused "
        "| cache fp16 / akvq |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['bits']} | {r['batch']} | {r['length']} | {r['heads']} | {r['rel_ref']:.1e} "
            f"| {r['rel_sdpa']:.1e} | {r.get('kernel_us', nan):.0f} | {r.get('kernel_gbs', nan):.0f} "
            f"| {_best_variant(r)} "
            f"| {r.get('fused_us', nan):.0f} | {r.get('torch_us', nan):.0f} | {r.get('fp16_us', nan):.0f} "
            f"| {r.get('fp16_gbs', nan):.0f} | {r.get('fp16_us', nan) / r.get('fused_us', nan):.2f} "
            f"| {r.get('cache_ratio', nan):.2f} |"
        )
    return "\n".join(lines)


def _patch_interpreter_for_numpy2() -> None:
    """Triton's interpreter passes scalars as 1-element arrays, which numpy 2 refuses to int() (CPU dry run only)."""
    import numpy as np
    import triton.runtime.interpreter as ti

    original = ti._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    ti._patch_lang_tensor = patched


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="3 shapes instead of 7")
    p.add_argument("--no-bench", action="store_true", help="correctness only")
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="one small case on CPU (run with TRITON_INTERPRET=1), correctness only",
    )
    p.add_argument("--profile", action="store_true", help="only the host/GPU time breakdown of the fused call")
    p.add_argument("--merge-bench", action="store_true", help="only the window_merge tile/warp variants")
    p.add_argument("--compiled", action="store_true", help="with --profile: also time torch.compile'd torch parts")
    args = p.parse_args(argv)
    if args.merge_bench or args.profile:
        if args.merge_bench:
            text = "\n".join(merge_bench())
        else:
            cases = (("TSA", 2, 16, 2048), ("PSA", 2, 64, 600))
            text = "\n\n".join(profile_case(*case, compiled=args.compiled) for case in cases)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return 0
    if args.cpu_dry_run:
        _patch_interpreter_for_numpy2()
        row = run_case("PSA", 2, 1, 300, HEADS, HEADS, bench=False, device="cpu")
        print(row)
        return 0 if row["rel_ref"] < TOL_REF and row["rel_sdpa"] < TOL_SDPA else 1
    if not torch.cuda.is_available():
        p.error("needs CUDA")
    import triton

    t0 = time.time()
    head = (
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
        f"LLaVA-1.5-7B KV shape ({HEADS} heads, dim {HEAD_DIM}), fp16 window 128, block 32, 15 pivots/row (PSA)"
    )
    print(head, flush=True)
    rows, failed = [], []
    cases = [
        (lay, bits, b, t, HEADS, HEADS)
        for lay in ("TSA", "PSA")
        for bits in (2, 4)
        for b, t in (QUICK if args.quick else FULL)
    ]
    cases.append(("PSA", 2, 16, 2048, HEADS, 8))  # grouped-query attention (4 query heads per KV head)
    for case in cases:
        row = run_case(*case, bench=not args.no_bench)
        torch.cuda.empty_cache()
        rows.append(row)
        ok = row["finite"] and row["rel_ref"] < TOL_REF and row["rel_sdpa"] < TOL_SDPA
        if not ok:
            failed.append(row)
        print(
            ("ok  " if ok else "FAIL"),
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()},
            flush=True,
        )
    text = "\n".join(
        [
            head,
            f"# {len(rows)} cases, {len(failed)} failed (tolerances: rel ref {TOL_REF}, rel sdpa {TOL_SDPA}); "
            f"wall {time.time() - t0:.0f} s",
            table(rows),
        ]
    )
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
