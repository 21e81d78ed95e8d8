"""The experimental QuIP# (E8P) matmul kernel (casp/kernels/triton_quip.py) and the Triton Walsh-Hadamard transform
(casp/kernels/triton_fwht.py) under Triton's CPU interpreter against the torch code, and compiled for an H100
(sm_90, no GPU needed). Skipped when triton is not installed (CI)."""

from __future__ import annotations

import textwrap

from tests.triton_interpreter import needs_triton, run_compiled, run_interpreted

_WEIGHTS = """
import torch
from casp.quant.quip import RESID_SCALE, QuIPWeight
torch.manual_seed(0)
def weights():
    # (N, K, bits, rows): tails of both tiles, K with a non-power-of-two factor (kron transform), 2/3/4 bits
    for N, K, bits, rows in [(40, 64, 2, 1), (33, 128, 3, 2), (64, 96, 4, 3), (24, 256, 2, 2)]:
        codes = torch.randint(0, 1 << 16, (N, K // 8))
        codes = (codes - (codes >= 1 << 15).long() * (1 << 16)).to(torch.int16)
        if bits == 3:
            codes2 = torch.randint(0, 256, (N, K // 8)).to(torch.uint8)
        elif bits == 4:
            c2 = torch.randint(0, 1 << 16, (N, K // 8))
            codes2 = (c2 - (c2 >= 1 << 15).long() * (1 << 16)).to(torch.int16)
        else:
            codes2 = None
        scales = (torch.rand(N) * 0.02 + 0.01).half()
        su = (torch.randint(0, 2, (K,)) * 2 - 1).to(torch.int8)
        sv = (torch.randint(0, 2, (N,)) * 2 - 1).to(torch.int8)
        yield QuIPWeight(codes, codes2, scales, su, sv, bits, RESID_SCALE.get(bits, 1.0)), rows
"""

_INTERPRET = _WEIGHTS + textwrap.dedent(
    """
    from casp.kernels.triton_quip import quip_linear
    worst = 0.0
    for qw, rows in weights():
        x = torch.randn(rows, qw.shape[1])
        y = quip_linear(x, qw, bn=16, bj=4, split=2)
        ref = qw.matmul(x.double()).double()
        worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    assert worst < 1e-5, worst
    print("ok", worst)
    """
)

_INTERPRET_DENSE = _WEIGHTS + textwrap.dedent(
    """
    from casp.kernels.triton_quip import quip_dense, quip_dequantize_rotated
    worst = {"rotated": 0.0, torch.float16: 0.0, torch.bfloat16: 0.0}
    for qw, rows in weights():
        ref_w = qw.rotated()
        w = quip_dequantize_rotated(qw, torch.float32, bn=16, bj=4)
        worst["rotated"] = max(worst["rotated"], float((w - ref_w).abs().max() / ref_w.abs().max()))
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(rows, qw.shape[1]).to(dtype)
            y = quip_dense(x, qw)
            ref = qw.matmul(x.double()).double()
            assert y.dtype == dtype and y.shape == ref.shape
            worst[dtype] = max(worst[dtype], float((y.double() - ref).norm() / ref.norm()))
    assert worst["rotated"] < 1e-6 and worst[torch.float16] < 3e-3 and worst[torch.bfloat16] < 2e-2, worst
    print("ok", worst)
    """
)


@needs_triton
def test_quip_kernel_under_triton_interpreter():
    run_interpreted(_INTERPRET)


_COMPILE = textwrap.dedent(
    """
    from casp.kernels.triton_fwht import _fwht_kernel
    from casp.kernels.triton_quip import _quip_dequant_kernel, _quip_gemv_kernel
    from tests.triton_interpreter import compile_sm90
    for bits in (2, 3, 4):
        codes2 = "*u8" if bits == 3 else "*i16"
        types = {"x_ptr": "*fp32", "codes_ptr": "*i16", "codes2_ptr": codes2, "src_ptr": "*fp32", "par_ptr": "*i32",
                 "s_ptr": "*fp16", "y_ptr": "*fp32", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "inv_resid": "fp32"}
        assert compile_sm90(_quip_gemv_kernel, types, {"BITS": bits, "BN": 32, "BJ": 16, "SPLIT": 4}).asm["cubin"]
        for out in ("*fp16", "*bf16"):
            types = {"codes_ptr": "*i16", "codes2_ptr": codes2, "src_ptr": "*fp32", "par_ptr": "*i32",
                     "s_ptr": "*fp16", "w_ptr": out, "inv_resid": "fp32"}
            assert compile_sm90(_quip_dequant_kernel, types, {"BITS": bits, "BN": 64, "BJ": 16}).asm["cubin"]
    types = {"X": "*fp32", "Y": "*fp32", "scale": "fp32"}
    for a, b, warps in ((16, 16, 4), (64, 64, 4), (128, 64, 8), (128, 128, 8)):
        assert compile_sm90(_fwht_kernel, types, {"A": a, "B": b}, num_warps=warps).asm["cubin"]
    print("ok")
    """
)


@needs_triton
def test_quip_kernel_compiles_for_sm90():
    run_compiled(_COMPILE)


_FWHT = textwrap.dedent(
    """
    import torch
    from casp.hadamard import fwht
    from casp.kernels.triton_fwht import fwht_rows
    torch.manual_seed(0)
    worst = 0.0
    for n, rows in ((256, 3), (512, 1), (2048, 2)):
        x = torch.randn(rows, n)
        worst = max(worst, float((fwht_rows(x) - fwht(x)).abs().max()))
    x = torch.randn(2, 3, 1024).half()  # leading dims and fp16 in/out
    y = fwht_rows(x)
    assert y.dtype == torch.float16 and y.shape == x.shape
    worst = max(worst, float((y.float() - fwht(x.float())).abs().max()) / 10)
    assert worst < 1e-4, worst
    print("ok", worst)
    """
)


@needs_triton
def test_fwht_kernel_under_triton_interpreter():
    run_interpreted(_FWHT)
