"""casp.kernels.linear on CPU: falls back to the torch path, matches it, and never needs Triton; kernel choice."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from casp import kernels
from casp.kernels import uniform_config as cfgs
from casp.quant.linear import QuantLinear
from casp.quant.uniform import UniformWeight
from tests.triton_interpreter import needs_triton, run_compiled, run_interpreted


def _layer(N=24, K=72, bits=3, group=32, act_order=True, seed=0) -> UniformWeight:
    g = torch.Generator().manual_seed(seed)
    G = -(-K // group)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = (torch.rand(N, G, generator=g) * 0.05 + 0.01).half()
    zeros = torch.randint(0, 1 << bits, (N, G), generator=g).half()
    perm = torch.randperm(K, generator=g) if act_order else None
    return UniformWeight.from_codes(codes, scales, zeros, bits, group, perm)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_linear_is_torch_path(bits, act_order):
    qw = _layer(bits=bits, act_order=act_order, seed=bits)
    x = torch.randn(2, 5, 72)
    bias = torch.randn(24)
    assert kernels.kernel_for(x, qw) is None
    y = kernels.linear(x, qw, bias)
    assert torch.equal(y, qw.matmul(x) + bias)
    # ...which is x W^T with W the dense weight in the original input order
    ref = x.double() @ qw.dequantize(torch.float64).T + bias.double()
    assert torch.allclose(y.double(), ref, atol=1e-4)
    assert torch.equal(kernels.linear(x, qw), qw.matmul(x))


def test_cpu_half_and_bf16_activations_fall_back():
    qw = _layer()
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(3, 72, dtype=dtype)
        assert kernels.kernel_for(x, qw) is None
        y = kernels.linear(x, qw, torch.randn(24))
        assert y.dtype == dtype and y.shape == (3, 24)


def test_quant_linear_forward_uses_dispatch():
    qw = _layer(bits=2, act_order=True)
    lin = QuantLinear.from_weight(qw, torch.randn(24))
    x = torch.randn(4, 72)
    assert torch.equal(lin(x), kernels.linear(x, lin.quantized_weight(), lin.bias))


def test_set_batch1_kernel_reaches_the_dispatch_and_gemv_frees_the_copies(monkeypatch):
    from casp.kernels import slab_layout as sl

    model = torch.nn.Sequential(QuantLinear.from_weight(_layer(K=256, bits=2, group=64, act_order=False)),
                                torch.nn.ReLU(), QuantLinear.from_weight(_layer(N=256, K=24, bits=4, group=8)))
    seen = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda x, qw, bias=None, m1=None: seen.append(m1) or real(x, qw, bias))
    model(torch.randn(1, 256))
    assert seen == [None, None]  # unset: uniform_config.GEMV_M1
    first = model[0]
    sl.cached_kmajor(first.qweight, first.scales, first.zeros, 2, 64, 256)  # as a first GPU call would
    assert sl.kernel_copy_bytes(model) > 0
    assert kernels.set_batch1_kernel(model, "kmajor") == 2 and sl.kernel_copy_bytes(model) > 0
    assert kernels.set_batch1_kernel(model, "gemv") == 2
    assert sl.kernel_copy_bytes(model) == 0  # the K-major copy is gone
    model(torch.randn(1, 256))
    assert seen[2:] == ["gemv", "gemv"]
    assert cfgs.choose_path(1, 2, 64, 4, m1="gemv") == "gemv" and cfgs.choose_path(1, 2, 64, 4) == "kmajor"
    with pytest.raises(ValueError, match="unknown batch-1 kernel 'fast'; choose one of auto, kmajor, gemv"):
        kernels.set_batch1_kernel(model, "fast")


def test_auto_batch1_kernel_keeps_a_fifth_of_the_gpu_free():
    GiB = 2**30
    # an 80 GB GPU holding a 2.25-bit 7B model: the 2 GB of K-major copies fit
    assert kernels.choose_batch1_kernel(2 * GiB, 75 * GiB, 80 * GiB) == "kmajor"
    # an 8 GB GPU with 5 GB free: 2 GB of copies + 1.6 GB to spare fit; with 3 GB free they do not
    assert kernels.choose_batch1_kernel(2 * GiB, 5 * GiB, 8 * GiB) == "kmajor"
    assert kernels.choose_batch1_kernel(2 * GiB, 3 * GiB, 8 * GiB) == "kmajor-only"
    # off the GPU nothing is copied: "auto" is "kmajor", whose kernels do not run on the CPU anyway
    model = torch.nn.Sequential(QuantLinear.from_weight(_layer(K=256, bits=2, group=64, act_order=False)))
    assert kernels.kmajor_copy_bytes(model) == 0
    # what the copies would take: codes, scales and zeros of the 2/4-bit layers (not the 3-bit one)
    mixed = torch.nn.Sequential(model[0], QuantLinear.from_weight(_layer(K=256, bits=3, group=64, act_order=False)))
    first = model[0]
    expect = sum(t.numel() * t.element_size() for t in (first.qweight, first.scales, first.zeros))
    assert kernels.kmajor_copy_bytes(mixed, torch.device("cpu")) == expect > 0
    assert kernels.resolve_batch1_kernel(model, "auto") == "kmajor"
    assert kernels.resolve_batch1_kernel(model, "gemv") == "gemv"
    assert kernels.set_batch1_kernel(model, "auto") == 1 and model[0].batch1_kernel == "kmajor"


def test_aqlm_gemv_applies_to_one_row_and_small_codebooks():
    from casp.quant.aqlm import AQLMWeight

    def aqlm(bits: int, group: int = 8) -> AQLMWeight:
        dtype = torch.uint8 if bits <= 8 else torch.int16
        codes = torch.randint(0, 1 << min(bits, 7), (16, 64 // group, 2), dtype=dtype)
        return AQLMWeight(codes, torch.randn(2, 1 << bits, group).half(), torch.ones(16).half(), bits)

    one, three = torch.randn(1, 1, 64).half(), torch.randn(3, 64).half()
    assert kernels.aqlm_gemv_applies(one, aqlm(8)) and kernels.aqlm_gemv_applies(one[0], aqlm(8))
    assert not kernels.aqlm_gemv_applies(three, aqlm(8))  # several rows: the torch path
    assert not kernels.aqlm_gemv_applies(one, aqlm(12))  # 4096 codewords per codebook do not stay in L1
    assert not kernels.aqlm_gemv_applies(one, _layer(K=64))  # another format
    assert kernels.kernel_for(one, aqlm(8)) is None  # CPU


def test_gpu_dispatch_needs_cuda_half_uniform():
    """kernel_for only picks the Triton kernel for CUDA fp16/bf16 activations of a uniform weight."""
    qw = _layer()
    x32 = torch.randn(1, 72)
    assert kernels.kernel_for(x32, qw) is None  # CPU
    if torch.cuda.is_available():
        assert kernels.kernel_for(x32.cuda(), qw) is None  # fp32 activations: torch path
        if kernels.triton_available():
            assert kernels.kernel_for(x32.cuda().half(), qw) == "triton_uniform"


def test_import_and_cpu_call_without_triton():
    """With triton unimportable, casp.kernels imports and the CPU path runs; the Triton module is never loaded."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from casp import kernels\n"
        "from tests.test_kernels_dispatch import _layer\n"
        "qw = _layer()\n"
        "x = torch.randn(2, 72)\n"
        "assert torch.equal(kernels.linear(x, qw), qw.matmul(x))\n"
        "from casp.kernels import uniform_config\n"
        "assert uniform_config.choose_path(1, 2, 128, 32) == 'kmajor'\n"
        "assert 'casp.kernels.triton_uniform' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---- kernel choice and tiling (pure Python; casp.kernels.uniform_config imports without Triton) ----


def test_choose_path_by_batch_and_support():
    for bits in (2, 4, 8):
        # batch 1: the K-major kernel for fp16 at 2/4 bits, the stored-layout gemv for 8 bits and bf16
        assert cfgs.choose_path(1, bits, 128, 32) == ("gemv" if bits == 8 else "kmajor")
        assert cfgs.choose_path(1, bits, 128, 32, half=False) == "gemv"
        assert cfgs.choose_path(4, bits, 128, 32) == "tc"
        assert cfgs.choose_path(64, bits, 128, 32) == "tc"
        assert cfgs.choose_path(65, bits, 128, 32) == "dequant"
    assert cfgs.choose_path(1, 3, 128, 32) == "gemv"
    assert cfgs.choose_path(16, 3, 128, 32) == "dot"  # 3-bit codes straddle words: no fp16 pair decode
    assert cfgs.choose_path(16, 2, 8, 72) == "dot"  # group of 8 codes splits a 16-code word
    assert cfgs.choose_path(16, 2, 100, 1) == "tc"  # one group per channel


@pytest.mark.parametrize("n_units", [1, 7, 64, 344, 1000])
@pytest.mark.parametrize("bu", [1, 4, 32])
@pytest.mark.parametrize("split", [1, 2, 3, 8])
def test_split_sizes_cover_k_without_empty_splits(n_units, bu, split):
    per, s = cfgs.split_sizes(n_units, bu, split)
    assert per % bu == 0 and 1 <= s <= split
    assert (s - 1) * per < n_units <= s * per  # every split has work, together they cover all units


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [8, 48, 64, 128, 4096])
def test_default_configs_are_valid(bits, group):
    uc, uw = cfgs.unit_geometry(bits)
    assert uc * bits == 32 * uw  # a unit is whole words holding whole codes
    for path in ("gemv", "tc", "dot", "dequant"):
        for M in (1, 5, 40):
            cfg = cfgs.pick_config(path, bits, 4096, 4096, M, group)
            assert cfg.bk >= uc and cfg.bk & (cfg.bk - 1) == 0 and cfg.bn & (cfg.bn - 1) == 0
            if path == "tc" and cfgs.tc_supported(bits, group, 4096 // group):
                assert group % cfg.bk == 0 or cfg.bk % uc == 0
    # any chunk of gsub columns lies inside one group
    for bk in (64, 128, 512):
        g = cfgs.gsub(bk, group, 2)
        assert bk % g == 0 and group % g == 0


def test_tuned_table_entries_are_consistent():
    for (path, bits, _N, K, bucket), cfg in cfgs.TUNED.items():
        assert path in ("gemv", "kmajor", "tc", "dot", "dequant") and bucket in (1, 16, 64)
        assert cfg.bk >= cfgs.unit_geometry(bits)[0]
        if path == "kmajor":
            assert bucket == 1 and cfgs.kmajor_ok(bits, 128, K // 128) and cfg.bn >= 128 * cfg.num_warps
        if path == "tc":
            assert cfgs.tc_supported(bits, 128, K // 128) and 128 % cfg.bk == 0


def test_kernel_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        cfgs.KernelConfig(24, 128)
    with pytest.raises(ValueError, match="split"):
        cfgs.KernelConfig(32, 128, split=0)
    assert cfgs.KernelConfig(32, 128).replace(split=4).split == 4
    with pytest.raises(ValueError, match="pdl must be 0, 1 or 2"):
        cfgs.KernelConfig(256, 128, pdl=3)
    c = cfgs.KernelConfig(256, 128, 2, 3, split=16).replace(prefetch=True, pdl=2)
    assert (c.prefetch, c.pdl, c.split) == (True, 2, 16) and "prefetch=True, pdl=2" in repr(c)
    assert "prefetch" not in repr(cfgs.KernelConfig(256, 128))


def test_load_tuned_json_overrides_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(cfgs, "TUNED", dict(cfgs.TUNED))  # the module table is left as it was
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps([
        {"key": ["kmajor", 2, 4096, 11008, 1], "bn": 512, "bk": 128, "num_warps": 4, "num_stages": 3, "split": 8,
         "prefetch": True, "pdl": 2},
        {"key": ["gemv", 4, 77, 96, 1], "bn": 16, "bk": 512, "num_warps": 4, "num_stages": 2, "split": 2},
    ]))  # fmt: skip
    assert cfgs.load_tuned_json(str(path)) == 2
    c = cfgs.pick_config("kmajor", 2, 4096, 11008, 1)
    assert (c.bn, c.num_warps, c.split, c.prefetch, c.pdl) == (512, 4, 8, True, 2)
    g = cfgs.pick_config("gemv", 4, 77, 96, 1)
    assert (g.bn, g.split, g.prefetch, g.pdl) == (16, 2, False, 0)  # older files have no prefetch / pdl keys


_INTERPRET_GEMV = textwrap.dedent(
    """
    import torch
    from casp.kernels import triton_uniform as tu
    from tests.test_kernels_slab import _layer
    worst = 0.0
    # masked rows and a K range split in two and three, 3 bits (codes straddle words), 2 activation rows
    for (N, K, group, M, cfg) in [(40, 576, 128, 1, tu.KernelConfig(16, 256, 2, 2, split=2)),
                                  (33, 200, 40, 2, tu.KernelConfig(16, 128, 1, 2, split=1)),
                                  (64, 1024, 128, 1, tu.KernelConfig(32, 512, 2, 2, split=3))]:
        for bits in (2, 3, 4):
            qw = _layer(N, K, bits, group)
            x = torch.randn(M, K).half()
            b = torch.randn(N).half()
            y = tu.uniform_linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, group, b, "gemv", cfg)
            ref = x.double() @ qw.dequantize(torch.float64).T + b.double()
            worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    assert worst < 3e-3, worst
    print("ok", worst)
    """
)


@needs_triton
def test_stored_layout_gemv_kernel_under_triton_interpreter():
    run_interpreted(_INTERPRET_GEMV)


_INTERPRET_TENSOR_CORE = textwrap.dedent(
    """
    import torch
    from casp.kernels import triton_uniform as tu
    from tests.test_kernels_slab import _layer
    worst = {"tc": 0.0, "dot": 0.0}
    # the tensor-core kernels of 2-64 rows: masked rows and activation rows, K split in one to three, a group
    # inside every tile (tc's factored scales), groups smaller than a tile and 3 bits (dot), one group per row
    for (N, K, group, M, split) in [(40, 576, 128, 3, 2), (33, 200, 40, 20, 1), (64, 256, 256, 5, 3),
                                    (48, 96, 32, 17, 2)]:
        for bits in (2, 3, 4):
            qw = _layer(N, K, bits, group)
            x, b = torch.randn(M, K).half(), torch.randn(N).half()
            ref = x.double() @ qw.dequantize(torch.float64).T + b.double()
            for path in ("tc", "dot"):
                if path == "tc" and not tu.tc_supported(bits, group, qw.n_groups):
                    continue
                cfg = tu.KernelConfig(16, 32 if path == "tc" else 64, 4, 2, bm=16, split=split)
                y = tu.uniform_linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, group, b, path, cfg)
                worst[path] = max(worst[path], float((y.double() - ref).norm() / ref.norm()))
    assert max(worst.values()) < 3e-3, worst
    print("ok", worst)
    """
)


@needs_triton
def test_stored_layout_tensor_core_kernels_under_triton_interpreter():
    run_interpreted(_INTERPRET_TENSOR_CORE)


_COMPILE_TENSOR_CORE = textwrap.dedent(
    """
    from casp.kernels.triton_uniform import _dot_kernel, _tc_kernel
    from tests.triton_interpreter import compile_sm90

    ptrs = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "b_ptr": "*fp16",
            "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    variants = [(_tc_kernel, {"BITS": 2, "UC": 16, "ASM": True, "HAS_BIAS": True, "ONE_GROUP": False,
                              "FACTORED": True, "BM": 16, "BN": 64, "BK": 128, "SPLIT": 4}),
                (_tc_kernel, {"BITS": 4, "UC": 8, "ASM": True, "HAS_BIAS": False, "ONE_GROUP": True,
                              "FACTORED": False, "BM": 64, "BN": 64, "BK": 64, "SPLIT": 1}),
                (_dot_kernel, {"BITS": 3, "UC": 32, "UW": 3, "ASM": True, "ONE_GROUP": False, "HAS_BIAS": True,
                               "BM": 32, "BN": 64, "BK": 128, "GSUB": 64, "SPLIT": 2})]
    for kernel, const in variants:
        c = compile_sm90(kernel, ptrs, const, num_stages=2)  # as KernelConfig launches them
        assert c.asm["cubin"] and "mma" in c.asm["ptx"]
    print("ok")
    """
)


@needs_triton
def test_stored_layout_tensor_core_kernels_compile_for_sm90():
    run_compiled(_COMPILE_TENSOR_CORE)
