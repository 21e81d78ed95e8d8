"""The experimental AQLM GEMV kernel (casp/kernels/triton_aqlm.py) under Triton's CPU interpreter, when triton is
installed (the GPU run of benchmarks/kernels.py --aqlm checks it on the device)."""

from __future__ import annotations

import textwrap

from tests.triton_interpreter import needs_triton, run_interpreted

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
