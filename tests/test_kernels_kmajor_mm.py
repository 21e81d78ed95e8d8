"""The K-major layout at every batch size ("kmajor-only" mode): the layout's torch reference, the mode's
bookkeeping on QuantLinear, and the kernels of casp/kernels/triton_kmajor_mm.py under Triton's CPU interpreter
and compiled for an H100."""

from __future__ import annotations

import textwrap

import pytest
import torch

from casp import kernels
from casp.kernels import slab_layout as sl
from casp.quant.linear import QuantLinear
from casp.quant.uniform import UniformWeight
from tests.triton_interpreter import needs_triton, run_compiled, run_interpreted


def _layer(N=24, K=200, bits=2, group=40, seed=0, perm=False) -> UniformWeight:
    g = torch.Generator().manual_seed(seed)
    G = -(-K // group)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = torch.rand(N, G, generator=g) * 0.01 + 0.002
    zeros = torch.randint(0, 1 << bits, (N, G), generator=g).half()
    qw = UniformWeight.from_codes(codes, scales, zeros, bits, group)
    if perm:
        qw = UniformWeight(qw.qweight, qw.scales, qw.zeros, (N, K), bits, group,
                           torch.randperm(K, generator=g).to(torch.int32))  # fmt: skip
    return qw


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("K", "group"), [(576, 128), (75, 75), (96, 32), (200, 40)])
def test_kmajor_weight_dequantizes_like_the_stored_one(bits, K, group):
    qw = _layer(N=20, K=K, bits=bits, group=group)
    if sl.slab_words(bits, group, K) is None:
        with pytest.raises(ValueError, match="groups of whole 32-bit words"):
            sl.make_kmajor_weight(qw.qweight, qw.scales, qw.zeros, None, bits, group, K)
        return
    kw = sl.make_kmajor_weight(qw.qweight, qw.scales, qw.zeros, None, bits, group, K)
    assert (kw.out_features, kw.in_features) == (20, K)
    s, z = kw.scale_zero()
    assert torch.equal(s, qw.scales.float()) and torch.equal(z, qw.zeros.float())  # 2^pre moved out exactly
    assert torch.equal(kw.dequantize(torch.float64), qw.dequantize(torch.float64))
    assert kw.nbytes() == kw.words.numel() * 4 + kw.sz.numel() * 4


def test_make_kmajor_weight_refuses_other_bit_widths():
    qw = _layer(K=96, bits=3, group=32)
    with pytest.raises(ValueError, match="2 or 4 bits"):
        sl.make_kmajor_weight(qw.qweight, qw.scales, qw.zeros, None, 3, 32, 96)


def test_kmajor_only_is_a_no_op_on_cpu_without_the_interpreter(monkeypatch):
    """On the CPU the torch path runs: "kmajor-only" leaves the buffers where they are and the outputs unchanged."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = torch.nn.Sequential(QuantLinear.from_weight(_layer(K=256, group=64), torch.randn(24)))
    x = torch.randn(3, 256)
    before = model(x)
    qweight = model[0].qweight
    assert kernels.kmajor_only_weight(model[0].quantized_weight()) is None
    assert kernels.set_batch1_kernel(model, "kmajor-only") == 1
    assert model[0].kmajor_only is None and model[0].qweight is qweight
    assert torch.equal(model(x), before)
    assert sl.kernel_copy_bytes(model) == 0


def test_linear_kmajor_torch_path_matches_the_stored_weight():
    """fp32 activations (or a device without the kernels) multiply the weight dequantized from the K-major copy."""
    qw = _layer(K=256, bits=4, group=64, perm=True)
    kw = sl.make_kmajor_weight(qw.qweight, qw.scales, qw.zeros, qw.perm, 4, 64, 256)
    x, b = torch.randn(5, 256, dtype=torch.float64), torch.randn(24)
    ref = x @ qw.dequantize(torch.float64).T + b.double()
    assert torch.allclose(kernels.linear_kmajor(x, kw, b), ref, atol=1e-10)


_INTERPRET_KERNELS = textwrap.dedent(
    """
    import torch
    from casp.kernels import slab_layout as sl
    from casp.kernels import triton_kmajor_mm as mm
    from casp.kernels.uniform_config import KernelConfig
    from tests.test_kernels_kmajor_mm import _layer
    worst = {torch.float16: 0.0, torch.bfloat16: 0.0}
    # (N, K, group, rows, act-order): masked rows, a partial slab (K = 75), small groups (2 words per slab at
    # 2 bits: the fewest the tensor-core kernel takes), the dequantize path's many rows
    for N, K, group, M, perm in [(40, 576, 128, 5, False), (33, 75, 75, 3, True), (64, 1024, 128, 20, False),
                                 (48, 96, 32, 70, True)]:
        for bits in (2, 4):
            qw = _layer(N, K, bits, group, perm=perm)
            kw = sl.make_kmajor_weight(qw.qweight, qw.scales, qw.zeros, qw.perm, bits, group, K)
            w = qw.dequantize(torch.float64)  # original column order
            # the transposed dequantization is the torch path's (q - z) s exactly
            wt = mm.kmajor_dequantize_t(kw, torch.float32)
            assert torch.equal(wt.t().double(), kw.dequantize(torch.float64)), (N, K, bits)
            for dtype in (torch.float16, torch.bfloat16):
                x, b = torch.randn(M, K).to(dtype), torch.randn(N).to(dtype)
                ref = x.double() @ w.T + b.double()
                got = [(mm.kmajor_linear(x, kw, b, path=p), ref) for p in ("dequant", "tc", None)]
                xs = (x if qw.perm is None else x[:, qw.perm.long()]).contiguous()
                got += [(mm.kmajor_tc(xs, kw, b, KernelConfig(16, 128, 4, 2, bm=16, split=s)), ref) for s in (2, 3)]
                if dtype == torch.float16:
                    got.append((mm.kmajor_linear(x[:1], kw, b), ref[:1]))  # one row: the batch-1 GEMV
                for y, r in got:
                    assert y.dtype == dtype and y.shape == r.shape
                    worst[dtype] = max(worst[dtype], float((y.double() - r).norm() / r.norm()))
    assert worst[torch.float16] < 1e-3 and worst[torch.bfloat16] < 8e-3, worst
    qw = _layer(24, 96, 2, 16)  # group 16 at 2 bits: one word per slab, 8 column pairs
    kw = sl.make_kmajor_weight(qw.qweight, qw.scales, qw.zeros, None, 2, 16, 96)
    assert mm.kmajor_linear(torch.randn(2, 96).half(), kw).shape == (2, 24)  # picks the dequantize path
    try:
        mm.kmajor_linear(torch.randn(2, 96).half(), kw, path="tc")
    except ValueError as e:
        assert "16 column pairs per slab" in str(e)
    else:
        raise AssertionError("a slab of 8 pairs reached tl.dot")
    print("ok", worst)
    """
)


@needs_triton
def test_kmajor_mm_kernels_under_triton_interpreter():
    run_interpreted(_INTERPRET_KERNELS)


_INTERPRET_MODE = textwrap.dedent(
    """
    import torch
    from casp import kernels
    from casp.kernels import slab_layout as sl
    from casp.quant.linear import QuantLinear
    from tests.test_kernels_kmajor_mm import _layer
    # a 2-bit act-order layer with a bias, a 4-bit one, and a 3-bit one the layout does not take
    model = torch.nn.Sequential(QuantLinear.from_weight(_layer(64, 256, 2, 64, perm=True), torch.randn(64)),
                                QuantLinear.from_weight(_layer(96, 64, 4, 32)),
                                QuantLinear.from_weight(_layer(40, 96, 3, 32)))
    x = {m: torch.randn(m, 256).half() for m in (1, 6, 70)}
    ref = {m: model.double()(x[m].double()) for m in x}  # the torch path in fp64
    model.half()
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    assert kernels.set_batch1_kernel(model, "kmajor-only") == 3
    assert [m.kmajor_only is not None for m in model] == [True, True, False]
    assert sl.kernel_copy_bytes(model) == sum(m.kmajor_only.nbytes() for m in model[:2])
    for m in x:
        y = model(x[m])
        assert y.dtype == torch.float16
        err = float((y.double() - ref[m]).norm() / ref[m].norm())
        assert err < 2e-3, (m, err)
    # saving reads the stored buffers, unchanged
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    # .half() on the same device keeps the mode; loading new codes into the stored buffers is picked up
    model.half()
    assert model[0].kmajor_only is not None
    new = _layer(64, 256, 2, 64, seed=1, perm=True)
    model[0].load_state_dict({**{k: v for k, v in model[0].state_dict().items()}, **new.state()})
    y = model[0](x[6])
    ref0 = (x[6].double()[:, new.perm.long()] @ new.dequantize(torch.float64)[:, new.perm.long()].T
            + model[0].bias.double())
    assert float((y.double() - ref0).norm() / ref0.norm()) < 2e-3
    # another kernel choice leaves the mode
    kernels.set_batch1_kernel(model, "gemv")
    assert all(m.kmajor_only is None for m in model) and sl.kernel_copy_bytes(model) == 0
    # so does a move to another device: the stored buffers follow it
    kernels.set_batch1_kernel(model, "kmajor-only")
    assert model[0].kmajor_only is not None
    model.to("meta")
    assert model[0].kmajor_only is None and model[0].qweight.device.type == "meta"
    print("ok")
    """
)


@needs_triton
def test_kmajor_only_mode_under_triton_interpreter():
    run_interpreted(_INTERPRET_MODE)


_INTERPRET_MODEL = textwrap.dedent(
    """
    import torch
    from casp import kernels
    from casp.models.base import cache_argument
    from casp.quant.linear import QuantLinear
    from casp.quant.rtn import RTNConfig, quantize_rtn
    from tests.fixtures import build
    # a tiny LLaMA whose decoder linears are 2-bit (attention) and 4-bit (MLP) RTN weights, in fp16
    model, _ = build("llama", num_layers=2, hidden=64)
    for layer in model.model.layers:
        for parent, bits in ((layer.self_attn, 2), (layer.mlp, 4)):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    qw = quantize_rtn(lin.weight.data, None, RTNConfig(bits=bits, group_size=32))
                    setattr(parent, name, QuantLinear.from_weight(qw))
    model.half()
    ids = torch.randint(3, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits.float()  # the torch path (dequantize, then matmul)
        assert kernels.set_batch1_kernel(model, "kmajor-only") == 14
        assert all(m.kmajor_only is not None for m in model.modules() if isinstance(m, QuantLinear))
        prefill = model(ids, use_cache=True)  # 9 rows: the tensor-core kernel
        cache = {cache_argument(model): prefill.past_key_values}
        step = model(ids[:, -1:], **cache).logits.float()  # 1 row: the GEMV
        full = model(torch.cat([ids, ids[:, -1:]], 1)).logits.float()
    err = float((prefill.logits.float() - ref).norm() / ref.norm())
    err1 = float((step[:, -1] - full[:, -1]).norm() / full[:, -1].norm())
    assert err < 5e-3 and err1 < 5e-3, (err, err1)
    print("ok", err, err1)
    """
)


@needs_triton
def test_kmajor_only_tiny_llama_under_triton_interpreter():
    """A whole model in "kmajor-only" mode: its prefill (tensor-core kernel) agrees with the torch path, and a decode
    step (batch-1 GEMV) with the same token's prefill."""
    run_interpreted(_INTERPRET_MODEL)


_COMPILE = textwrap.dedent(
    """
    from casp.kernels.triton_kmajor_mm import _kmajor_dequant_t_kernel as dq
    from casp.kernels.triton_kmajor_mm import _kmajor_tc_kernel as tc
    from tests.triton_interpreter import compile_sm90 as build

    for dt in ("fp16", "bf16"):
        for bits, wpg, bm, split in ((2, 8, 16, 4), (4, 16, 64, 1), (2, 2, 32, 2), (4, 4, 16, 1)):
            c = build(tc, {"x_ptr": "*i32", "w_ptr": "*i32", "sz_ptr": "*i32", "b_ptr": "*" + dt, "y_ptr": "*" + dt,
                           "ws_ptr": "*fp32", "cnt_ptr": "*i32"},
                      {"BITS": bits, "WPG": wpg, "PRE": 4, "HAS_BIAS": True, "BM": bm, "BN": 64, "SPLIT": split,
                       "XBF16": dt == "bf16", "F32_DOT": False}, num_stages=2)  # as default_tc_config
            assert c.asm["cubin"] and "mma" in c.asm["ptx"]  # the slab's products on tensor cores
            c = build(dq, {"w_ptr": "*i32", "sz_ptr": "*i32", "out_ptr": "*" + dt},
                      {"BITS": bits, "WPG": wpg, "PRE": 4, "BN": 128})
            assert c.asm["cubin"]
    print("ok")
    """
)


@needs_triton
def test_kmajor_mm_kernels_compile_for_sm90():
    run_compiled(_COMPILE)
