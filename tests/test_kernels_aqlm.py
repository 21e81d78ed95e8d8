"""The experimental AQLM GEMV kernel (casp/kernels/triton_aqlm.py) under Triton's CPU interpreter, when triton is
installed (the GPU run of benchmarks/kernels.py --aqlm checks it on the device)."""

from __future__ import annotations

import textwrap

from tests.triton_interpreter import needs_triton, run_compiled, run_interpreted

_INTERPRET = textwrap.dedent(
    """
    import torch
    from casp.kernels.triton_aqlm import aqlm_gemv
    from casp.quant.aqlm import AQLMWeight
    torch.manual_seed(0)
    worst = 0.0
    for N, K, ncb, B in [(40, 64, 2, 8), (33, 128, 1, 10), (64, 256, 2, 8)]:
        codes = torch.randint(0, 1 << B, (N, K // 8, ncb))
        stored = codes.to(torch.uint8) if B <= 8 else (codes - (codes >= 1 << 15).long() * (1 << 16)).to(torch.int16)
        cb = (torch.randn(ncb, 1 << B, 8) * 0.1).half()
        s = (torch.rand(N) + 0.5).half()
        qw = AQLMWeight(stored, cb, s, B)
        x = torch.randn(2, K).half()
        y = aqlm_gemv(x, stored, cb, s, bn=16, bj=4, split=2)
        ref = x.double() @ qw.dequantize(torch.float64).T
        worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    assert worst < 3e-3, worst
    print("ok", worst)
    """
)


@needs_triton
def test_aqlm_gemv_under_triton_interpreter():
    run_interpreted(_INTERPRET)


_INTERPRET_DENSE = textwrap.dedent(
    """
    import torch
    from casp.kernels.triton_aqlm import aqlm_dense, aqlm_dequantize
    from casp.quant.aqlm import AQLMWeight
    torch.manual_seed(0)
    worst = {"weight": 0.0, torch.float16: 0.0, torch.bfloat16: 0.0}
    # (N, K, codebooks, bits): tails of both tiles (N, K / 8 groups), one or two codebooks, 16-bit codes (int16)
    for N, K, ncb, B in [(40, 64, 2, 8), (33, 200, 1, 10), (70, 256, 2, 8)]:
        codes = torch.randint(0, 1 << B, (N, K // 8, ncb))
        stored = codes.to(torch.uint8) if B <= 8 else (codes - (codes >= 1 << 15).long() * (1 << 16)).to(torch.int16)
        cb = (torch.randn(ncb, 1 << B, 8) * 0.1).half()
        s = (torch.rand(N) + 0.5).half()
        qw = AQLMWeight(stored, cb, s, B)
        ref_w = qw.dequantize(torch.float64)
        w = aqlm_dequantize(stored, cb, s, torch.float32, bn=16, bj=4)
        worst["weight"] = max(worst["weight"], float((w.double() - ref_w).norm() / ref_w.norm()))
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(3, K).to(dtype)
            y = aqlm_dense(x, stored, cb, s)
            ref = x.double() @ ref_w.T
            assert y.dtype == dtype
            worst[dtype] = max(worst[dtype], float((y.double() - ref).norm() / ref.norm()))
    # the codewords are summed in fp16, as in the GEMV: one rounding
    assert worst["weight"] < 1e-3 and worst[torch.float16] < 3e-3 and worst[torch.bfloat16] < 2e-2, worst
    print("ok", worst)
    """
)


@needs_triton
def test_aqlm_dequantize_under_triton_interpreter():
    run_interpreted(_INTERPRET_DENSE)


_COMPILE = textwrap.dedent(
    """
    from casp.kernels.triton_aqlm import _aqlm_dequant_kernel as kernel
    from tests.triton_interpreter import compile_sm90
    for codes, ncode, out in (("*u8", 256, "*fp16"), ("*i16", 1 << 16, "*bf16")):
        const = {"NCB": 2, "NCODE": ncode, "GS": 8, "WIDE": codes == "*i16", "BN": 64, "BJ": 16}
        compiled = compile_sm90(kernel, {"codes_ptr": codes, "cb_ptr": "*fp16", "s_ptr": "*fp16", "w_ptr": out}, const)
        assert compiled.asm["cubin"]
    print("ok")
    """
)


@needs_triton
def test_aqlm_dequantize_compiles_for_sm90():
    run_compiled(_COMPILE)
