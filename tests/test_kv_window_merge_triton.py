"""The window + merge kernel of the fused KV decode (casp.kernels.triton_kv_merge) under Triton's interpreter,
against the torch partials (dense_partial + merge_partials), and compiled for an H100 (sm_90) without a GPU.
Skipped when triton is not installed (CI); the GPU check is benchmarks/gpu_check_kv_attention.py."""

import textwrap

from tests.triton_interpreter import needs_triton, run_compiled, run_interpreted

_CHECK = textwrap.dedent(
    """
    import torch
    from casp.kv.attention import Partial, dense_partial, merge_partials
    from casp.kernels.triton_kv_merge import window_merge
    torch.manual_seed(0)
    worst = 0.0
    # (B, Hq, Hkv, W, D, S, masked, empty split): no partials, a window shorter than a tile, several tiles,
    # GQA, padding masked, one partial with nothing in it (m = -inf, l = 0)
    for b, hq, hkv, w, d, s, masked, empty in [(2, 4, 4, 5, 16, 0, False, False), (1, 4, 2, 70, 32, 3, True, True),
                                               (3, 2, 1, 32, 16, 1, True, False), (2, 6, 3, 33, 64, 5, False, True)]:
        buf_k, buf_v = torch.randn(b, hkv, w + 9, d), torch.randn(b, hkv, w + 9, d)
        k, v = buf_k[:, :, :w], buf_v[:, :, :w]  # a view of a larger preallocated window, as the cache keeps it
        q = torch.randn(b, hq, d)
        valid = torch.rand(b, w) > 0.3 if masked else None
        if masked:
            valid[:, 0] = True
        m, l = torch.randn(b, hq, s) * 3, torch.rand(b, hq, s) * 5 + 0.1
        acc = torch.randn(b, hq, s, d)
        if empty:
            m[:, :, 0], l[:, :, 0], acc[:, :, 0] = float("-inf"), 0.0, 0.0
        ref = merge_partials([Partial(m, l, acc), dense_partial(q, k, v, valid, 0.3)])
        out = window_merge(q, k, v, valid, m, l, acc, 0.3)
        assert out.shape == (b, hq, d) and bool(torch.isfinite(out).all())
        worst = max(worst, float((out - ref).abs().max()))
    assert worst < 1e-5, worst
    try:
        window_merge(q, k[:, :, :, :8], v, None, m, l, acc, 0.3)
        raise AssertionError("a wrong window shape was accepted")
    except ValueError as err:
        assert "do not match" in str(err)
    print("ok", worst)
    """
)


@needs_triton
def test_window_merge_kernel_matches_torch_partials_under_interpreter():
    run_interpreted(_CHECK)


_COMPILE = textwrap.dedent(
    """
    from casp.kernels.triton_kv_merge import BLOCK_W, _window_merge_kernel as kernel
    from tests.triton_interpreter import compile_sm90
    types = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "VALID": "*i8", "M_IN": "*fp32", "L_IN": "*fp32",
             "ACC_IN": "*fp32", "OUT": "*fp32", "sm_scale": "fp32"}
    for gqa, has_valid in ((1, False), (4, True)):
        const = {"GQA": gqa, "D": 128, "BLOCK": BLOCK_W, "BLOCK_S": 64, "HAS_VALID": has_valid}
        assert compile_sm90(kernel, types, const).asm["cubin"]
    print("ok")
    """
)


@needs_triton
def test_window_merge_kernel_compiles_for_sm90():
    run_compiled(_COMPILE)
