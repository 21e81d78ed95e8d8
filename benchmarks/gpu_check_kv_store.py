"""GPU check of the Triton KV store kernels (casp.kernels.triton_kv_quant / triton_kv_dequant) against the
torch code they replace, on CUDA tensors, plus their speed at LLaVA-1.5-7B shapes.

* quantize: codes, scales and zeros of ``quantize_rows`` vs ``casp.kv.quantizer.quantize_tokens`` (after the
  same rotation); codes may differ only where the rotation's summation order moves a value across a
  rounding boundary, so the share of equal codes and the largest dequantized difference are reported;
* dequantize: ``dequantize_rows_into`` vs torch's dequantize (+ rotation);
* a chunked prefill through AKVQLayer.update with the kernels vs the torch path: the K/V handed to the
  attention at every chunk.

    python benchmarks/gpu_check_kv_store.py --out benchmarks/results/kv_store_kernels_h100.txt
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from casp.hadamard import hadamard_matrix  # noqa: E402
from casp.kernels.triton_kv_dequant import dequantize_rows_into  # noqa: E402
from casp.kernels.triton_kv_quant import quantize_rows  # noqa: E402
from casp.kv import AKVQConfig  # noqa: E402
from casp.kv.cache import AKVQLayer, _quantize_rows  # noqa: E402
from casp.kv.quantizer import dequantize, quantize_tokens  # noqa: E402


def check_kernels(lines: list[str]) -> bool:
    ok = True
    torch.manual_seed(0)
    for bits, group, rotate in ((2, 128, True), (4, 128, True), (2, 32, False), (4, 16, True)):
        x = torch.randn(8, 32, 64, 128, device="cuda", dtype=torch.float16).permute(2, 0, 1, 3)  # [T=64, B=8, H, d]
        x[0, :, :, :4] *= 30
        hm = hadamard_matrix(128, dtype=torch.float16, device="cuda") if rotate else None
        clip = 0.8 if bits == 2 else 1.0
        got = quantize_rows(x, bits, group, clip, hm)
        xr = x @ hm if rotate else x
        ref = quantize_tokens(xr.reshape(-1, 32, 128), bits, group, clip)
        same = float((got.codes == ref.codes).float().mean())
        dq = float((dequantize(got, torch.float32) - dequantize(ref, torch.float32)).abs().max())
        step = float(ref.scale.float().max())
        out = torch.full((8, 32, 70, 128), float("nan"), device="cuda", dtype=torch.float16)
        dequantize_rows_into(out[:, :, :64], ref.codes, ref.scale, ref.zero, bits, None, hm)
        want = dequantize(ref, torch.float16)
        want = (want @ hm if rotate else want).view(64, 8, 32, 128).permute(1, 2, 0, 3)
        dq_err = float((out[:, :, :64].float() - want.float()).abs().max() / want.float().abs().max())
        untouched = bool(torch.isnan(out[:, :, 64:]).all())
        good = same > 0.999 and dq <= step * 1.01 and dq_err < 2e-3 and untouched
        ok &= good
        lines.append(
            f"bits {bits} group {group} rotate {rotate}: equal codes {100 * same:.3f}%, max |deq diff| {dq:.2e} "
            f"(largest step {step:.2e}); dequantize rel err {dq_err:.1e}, other slots untouched {untouched}: "
            f"{'ok' if good else 'FAILED'}"
        )
    return ok


def check_layer(lines: list[str]) -> bool:
    torch.manual_seed(1)
    b, h, t, d = 16, 32, 600, 128
    image = torch.zeros(b, t, dtype=torch.bool, device="cuda")
    image[:, 5:581] = True
    hidden = torch.randn(b, t, 256, device="cuda", dtype=torch.float16)
    hidden[:, 0] *= 40
    worst = 0.0
    for mode, rotate_values in (("tsa", True), ("psa", True)):
        cfg = AKVQConfig(bits=2, residual=32)
        ref, fast = AKVQLayer(cfg, mode, rotate_values, d), AKVQLayer(cfg, mode, rotate_values, d)
        ref.use_triton, fast.use_triton = False, True
        for layer in (ref, fast):
            layer.image_mask = image
            layer.set_pivots(hidden, k=15, ratio=4.0)
        k = torch.randn(b, h, t, d, device="cuda", dtype=torch.float16)
        v = torch.randn(b, h, t, d, device="cuda", dtype=torch.float16)
        for a in range(0, t, 128):
            k_ref, v_ref = ref.update(k[:, :, a : a + 128], v[:, :, a : a + 128])
            k_fast, v_fast = fast.update(k[:, :, a : a + 128], v[:, :, a : a + 128])
            for p, q in ((k_ref, k_fast), (v_ref, v_fast)):
                worst = max(worst, float((p.float() - q.float()).norm() / p.float().norm()))
    good = worst < 2e-3
    lines.append(f"chunked prefill (TSA + PSA layers, 16 x 600 tokens): max rel diff of the K/V handed to attention "
                 f"{worst:.1e}: {'ok' if good else 'FAILED'}")  # fmt: skip
    return good


def speed(lines: list[str]) -> None:
    x = torch.randn(256, 32, 128, 128, device="cuda", dtype=torch.float16).permute(2, 0, 1, 3)  # 128 tokens, B 256
    hm = hadamard_matrix(128, dtype=torch.float16, device="cuda")
    t_kernel = do_bench(lambda: quantize_rows(x, 2, 128, 0.8, hm), return_mode="median")
    t_torch = do_bench(lambda: _quantize_rows(x, 2, 128, 0.8, hm), return_mode="median")
    p = quantize_rows(x, 2, 128, 0.8, hm)
    out = torch.empty(256, 32, 128, 128, device="cuda", dtype=torch.float16)
    t_deq = do_bench(lambda: dequantize_rows_into(out, p.codes, p.scale, p.zero, 2, None, hm), return_mode="median")

    def torch_deq():
        y = dequantize(p, torch.float16) @ hm
        out.permute(2, 0, 1, 3).copy_(y.view(128, 256, 32, 128))

    t_deq_torch = do_bench(torch_deq, return_mode="median")
    lines.append(
        f"speed, 128 tokens x batch 256 x 32 heads x 128 (2-bit, rotated): quantize {1e3 * t_kernel:.0f} us "
        f"(torch {1e3 * t_torch:.0f} us), dequantize into K/V {1e3 * t_deq:.0f} us (torch {1e3 * t_deq_torch:.0f} us)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    ok = check_kernels(lines) & check_layer(lines)
    speed(lines)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
