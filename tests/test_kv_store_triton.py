"""The Triton kernels that quantize rows into AKVQ-VL's packed store and dequantize the store into the
attention's K/V buffer, run on CPU under Triton's interpreter: against casp.kv.quantizer (kernel level)
and against the torch path of the cache layer (chunked prefill and decode through AKVQLayer.update).
Skipped without triton (CI)."""

import textwrap

import pytest

from tests.triton_interpreter import needs_triton, run_interpreted

_KERNEL = textwrap.dedent(
    """
    import torch
    from casp.hadamard import hadamard_matrix
    from casp.kernels.triton_kv_dequant import dequantize_rows_into
    from casp.kv.quantizer import dequantize, quantize_tokens
    torch.manual_seed(0)
    worst = 0.0
    # (bits, d, group, B, H, S, rows, with dest, rotate)
    cases = [(2, 128, 128, 3, 2, 7, 21, False, True), (4, 64, 16, 2, 3, 9, 11, True, False),
             (8, 32, 32, 2, 1, 5, 10, False, False), (2, 32, 8, 4, 2, 6, 13, True, True)]
    for bits, d, group, b, h, s, n, with_dest, rotate in cases:
        x = torch.randn(n, h, d)
        p = quantize_tokens(x, bits, group)
        out = torch.full((b, h, s + 3, d), float("nan"))  # 3 extra slots that must stay untouched
        dest = torch.randperm(b * s)[:n].to(torch.int32) if with_dest else None
        hm = hadamard_matrix(d, dtype=torch.float32) if rotate else None
        dequantize_rows_into(out[:, :, :s], p.codes, p.scale, p.zero, bits, dest, hm)
        ref = dequantize(p, torch.float32)
        if rotate:
            ref = ref @ hm
        pos = torch.arange(n) if dest is None else dest.long()
        got = out[pos % b, :, pos // b]  # [n, H, d]
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
        written = torch.zeros(b, s + 3, dtype=torch.bool)
        written[pos % b, pos // b] = True
        assert bool(torch.isnan(out.permute(0, 2, 1, 3)[~written]).all())  # nothing else written
    assert worst < 2e-3, worst  # the rotation multiplies fp32-dequantized rows rounded to the output dtype
    print("ok", worst)
    """
)

_QUANT = textwrap.dedent(
    """
    import torch
    from casp.hadamard import hadamard_matrix
    from casp.kernels.triton_kv_quant import quantize_rows
    from casp.kv.quantizer import quantize_tokens
    torch.manual_seed(0)
    # (bits, d, group, rotate, a [T, B, H, d] view of a [B, H, T, d] tensor or plain [N, H, d] rows)
    cases = [(2, 128, 128, True, True), (4, 64, 16, False, False), (8, 32, 32, True, True), (2, 32, 16, False, True)]
    for bits, d, group, rotate, view in cases:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(3, 2, 9, d).to(dtype).permute(2, 0, 1, 3) if view else torch.randn(11, 2, d).to(dtype)
            x[0, ..., :3] *= 40  # outliers, clipped at 2 bits
            hm = hadamard_matrix(d, dtype=dtype) if rotate else None
            got = quantize_rows(x, bits, group, 0.8 if bits == 2 else 1.0, hm)
            xr = x @ hm if rotate else x
            ref = quantize_tokens(xr.reshape(-1, *xr.shape[-2:]), bits, group, 0.8 if bits == 2 else 1.0)
            for a, b in ((got.codes, ref.codes), (got.scale, ref.scale), (got.zero, ref.zero)):
                assert a.shape == b.shape and bool((a == b).all()), (bits, d, group, rotate, dtype)
    print("ok")
    """
)

_LAYER = textwrap.dedent(
    """
    import torch
    from casp.kv import AKVQConfig
    from casp.kv.cache import AKVQLayer
    torch.manual_seed(1)
    worst = 0.0
    b, h, t, d = 3, 2, 50, 32
    image = torch.zeros(b, t, dtype=torch.bool)
    image[0, 4:30], image[1, 8:16], image[2, 20:45] = True, True, True
    hidden = torch.randn(b, t, 8)
    hidden[0, 0] *= 50
    hidden[2, [3, 20]] *= 50
    for mode, rotate_values in (("tsa", False), ("psa", True), ("uniform", True)):
        cfg = AKVQConfig(bits=2, salient_bits=4, residual=8, block=4, group=16)
        ref, fast = AKVQLayer(cfg, mode, rotate_values, d), AKVQLayer(cfg, mode, rotate_values, d)
        fast.use_triton, ref.use_triton = True, False
        for layer in (ref, fast):
            layer.image_mask = image
            layer.set_pivots(hidden, k=15, ratio=4.0)
        k, v = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
        for a in range(0, t, 12):  # a chunked prefill, then two decode steps on the torch path
            k_ref, v_ref = ref.update(k[:, :, a : a + 12], v[:, :, a : a + 12])
            k_fast, v_fast = fast.update(k[:, :, a : a + 12], v[:, :, a : a + 12])
            worst = max(worst, float((k_ref - k_fast).abs().max()), float((v_ref - v_fast).abs().max()))
        for _ in range(2):
            kn, vn = torch.randn(b, h, 1, d), torch.randn(b, h, 1, d)
            k_ref, v_ref = ref.update(kn, vn)
            k_fast, v_fast = fast.update(kn, vn)
            worst = max(worst, float((k_ref - k_fast).abs().max()), float((v_ref - v_fast).abs().max()))
    assert worst < 1e-4, worst
    print("ok", worst)
    """
)


@needs_triton
@pytest.mark.parametrize("check", ["dequant", "quant", "layer"])
def test_store_kernels_under_triton_interpreter(check):
    run_interpreted({"dequant": _KERNEL, "quant": _QUANT, "layer": _LAYER}[check])
