"""The Triton decode-attention kernel over the packed KV store, run on CPU under Triton's interpreter
(in a subprocess with TRITON_INTERPRET=1), against its torch reference and against softmax attention over
the dequantized cache. Skipped when triton is not installed (CI); the GPU check is
benchmarks/gpu_check_kv_attention.py."""

import textwrap

import pytest

from tests.triton_interpreter import needs_triton, run_compiled, run_interpreted

_PRELUDE = textwrap.dedent(
    """
    import torch
    from casp.kv.quantizer import quantize_tokens
    from casp.kv.attention import Partial, merge_partials, packed_partial_reference, layer_decode_attention
    from casp.kernels.triton_kv_attention import packed_decode_partials
    """
)

_KERNEL = textwrap.dedent(
    """
    from casp.kernels.triton_kv_attention import tc_supported
    torch.manual_seed(0)
    worst = {"simt": 0.0, "tc": 0.0}
    # (bits, D, group, Hq, Hkv, B, N, L, splits): one group per head (the GPU shape's factored path),
    # several groups, GQA, splits (one left without valid tokens), tails shorter than a tile
    cases = [(2, 128, 128, 2, 2, 2, 70, 67, 1), (4, 128, 128, 4, 2, 1, 90, 130, 3), (2, 32, 8, 4, 1, 3, 30, 30, 2),
             (4, 32, 16, 2, 2, 2, 50, 200, 4), (2, 16, 16, 6, 3, 1, 9, 9, 1), (2, 64, 32, 8, 2, 2, 40, 150, 2),
             (4, 64, 16, 4, 1, 1, 60, 90, 1)]
    for bits, d, group, hq, hkv, b, n, length, splits in cases:
        k = quantize_tokens(torch.randn(n, hkv, d) * 2, bits, group)
        v = quantize_tokens(torch.randn(n, hkv, d), bits, group)
        idx = torch.randint(0, n, (b, length), dtype=torch.int32)
        idx[:, ::5] = -1
        if splits == 4:
            idx[:, 64:128] = -1  # the second split has nothing to attend to
        q = torch.randn(b, hq, d).half().float()  # fp16 values, as the model's queries
        ref = merge_partials([packed_partial_reference(q, k, v, idx, 0.2)])
        for kernel in ("simt", "tc"):
            if kernel == "tc" and not tc_supported(bits, d, d // group):
                continue
            m, l, acc = packed_decode_partials(
                q, k.codes, k.scale, k.zero, v.codes, v.scale, v.zero, idx, bits, 0.2, splits, block=16, kernel=kernel
            )
            assert m.shape == (b, hq, splits) and acc.shape == (b, hq, splits, d)
            if splits == 4:
                assert bool(torch.isinf(m[:, :, 1]).all()) and bool((l[:, :, 1] == 0).all())
            out = merge_partials([Partial(m, l, acc)])
            worst[kernel] = max(worst[kernel], float((out - ref).abs().max() / ref.abs().max()))
    # simt: fp32 throughout; tc: fp16 operands (p * scale, or (c - z) s weights with several groups)
    assert worst["simt"] < 1e-5 and worst["tc"] < 3e-3, worst
    print("ok", worst)
    """
)

_LAYERS = textwrap.dedent(
    """
    from casp.kv.cache import AKVQLayer
    from casp.kv import AKVQConfig
    torch.manual_seed(1)
    worst_ref = worst_dense = 0.0
    b, hkv, hq, t, d = 2, 2, 4, 40, 32
    image = torch.zeros(b, t, dtype=torch.bool)
    image[0, 4:30], image[1, 8:16] = True, True
    hidden = torch.randn(b, t, 8)
    hidden[0, 0] *= 50
    hidden[1, [3, 20]] *= 50
    for mode, rotate_values in (("tsa", False), ("psa", True), ("uniform", True)):
        cfg = AKVQConfig(bits=2, salient_bits=4, residual=8, block=4, group=16)
        ref_layer, layer = AKVQLayer(cfg, mode, rotate_values, d), AKVQLayer(cfg, mode, rotate_values, d)
        for x in (ref_layer, layer):
            x.image_mask = image
            x.set_pivots(hidden, k=15, ratio=4.0)
        layer.fused_decode = True
        k, v = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
        ref_layer.update(k, v)
        layer.update(k, v)
        mask = torch.ones(b, 1, 1, t + 6, dtype=torch.bool)
        mask[1, ..., :3] = False
        for step in range(6):
            kn, vn, q = torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hq, 1, d)
            k_all, v_all = ref_layer.update(kn, vn)
            layer.update(kn, vn)
            m = mask[..., : t + step + 1]
            fused = layer_decode_attention(layer, q, m, 0.2, use_triton=True)
            torch_ref = layer_decode_attention(layer, q, m, 0.2, use_triton=False)
            kk, vv = k_all.repeat_interleave(2, dim=1), v_all.repeat_interleave(2, dim=1)
            dense = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=m, scale=0.2)
            worst_ref = max(worst_ref, float((fused - torch_ref).abs().max()))
            worst_dense = max(worst_dense, float((fused - dense).abs().max()))
    # the tensor-core kernel (the default for these groups of whole words) multiplies fp16 operands
    assert worst_ref < 2e-3 and worst_dense < 2e-3, (worst_ref, worst_dense)
    print("ok", worst_ref, worst_dense)
    """
)


@needs_triton
@pytest.mark.parametrize("check", ["kernel", "layers"])
def test_packed_decode_kernel_under_triton_interpreter(check):
    run_interpreted(_PRELUDE + {"kernel": _KERNEL, "layers": _LAYERS}[check])


_COMPILE = textwrap.dedent(
    """
    import re, shutil, subprocess, tempfile, os
    import triton
    from casp.kernels.triton_kv_attention import BLOCK_N, NUM_WARPS, TC_BLOCK_N, TC_NUM_WARPS
    from casp.kernels.triton_kv_attention import _packed_decode_kernel, _packed_decode_tc_kernel
    from tests.triton_interpreter import compile_sm90
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    variants = []
    for bits, ng, gqa in ((2, 1, 1), (4, 1, 1), (2, 2, 4), (4, 4, 2)):
        db = 128 * bits // 8
        variants.append((_packed_decode_kernel, NUM_WARPS, {"GQA": gqa, "BITS": bits, "DW": db // 4, "NG": ng,
                                                             "BLOCK": BLOCK_N, "ASM": True}))
        variants.append((_packed_decode_tc_kernel, TC_NUM_WARPS, {"GQA": gqa, "QB": max(16, gqa), "BITS": bits,
                                                                   "DW": db // 4, "WPG": db // 4 // ng,
                                                                   "FACTORED": ng == 1, "BLOCK": TC_BLOCK_N,
                                                                   "ASM": True}))
    types = {"Q": "*fp16", "KC": "*i32", "KS": "*fp16", "KZ": "*fp16", "VC": "*i32", "VS": "*fp16", "VZ": "*fp16",
             "IDX": "*i32", "M_OUT": "*fp32", "L_OUT": "*fp32", "ACC_OUT": "*fp32", "sm_scale": "fp32"}
    for kernel, warps, const in variants:
        compiled = compile_sm90(kernel, types, const, num_warps=warps)
        assert compiled.asm["cubin"]
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            regs, local = map(int, re.search(r"REG:(\\d+).*LOCAL:(\\d+)", usage).groups())
            assert local == 0, (kernel.__name__, const, regs, local)  # no spills
            print(kernel.__name__, const, "registers", regs)
    print("ok")
    """
)


@needs_triton
def test_packed_decode_kernel_compiles_for_sm90_without_spills():
    """Real compilation (Triton -> PTX -> ptxas cubin for an H100), no GPU needed."""
    run_compiled(_COMPILE)
