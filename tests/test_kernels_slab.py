"""The slab layout (casp/kernels/slab_layout.py), its batch-1 kernels' dispatch, and the 7B decode benchmark's
CPU smoke run. The Triton kernels themselves run under Triton's CPU interpreter when triton is installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from casp.kernels import slab_layout as sl
from casp.kernels import uniform_config as cfgs
from casp.quant.uniform import UniformWeight
from tests.triton_interpreter import needs_triton, run_compiled, run_interpreted

ROOT = Path(__file__).resolve().parents[1]


def _layer(N=24, K=200, bits=2, group=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = -(-K // group)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = torch.rand(N, G, generator=g) * 0.01 + 0.002
    zeros = torch.randint(0, 1 << bits, (N, G), generator=g).half()
    return UniformWeight.from_codes(codes, scales, zeros, bits, group)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("K", "group"), [(200, 40), (576, 128), (100, 100), (256, 64), (96, 48), (75, 75)])
def test_repack_matches_the_slab_formula(bits, K, group):
    qw = _layer(K=K, bits=bits, group=group)
    wpg = sl.slab_words(bits, group, K)
    if wpg is None:
        assert group % (32 // bits) and group < K
        return
    words = sl.repack_slabs(qw.qweight, bits, K, wpg)
    cpw = 32 // bits
    S = cpw * wpg
    T = sl.n_slabs(K, bits, wpg)
    assert words.shape == (24, T * wpg) and words.dtype == torch.int32
    codes = qw.codes().long()
    # slow reference: field J of word v of slab t holds column t*S + 2*(v + J*wpg) in its low half (bits
    # [J*b, J*b + b)) and the next column in its high half (bits [16 + J*b, ...))
    u = words.long() & 0xFFFFFFFF
    for t in range(T):
        for v in range(wpg):
            for J in range(cpw // 2):
                for h in range(2):
                    k = t * S + 2 * (v + J * wpg) + h
                    want = codes[:, k] if k < K else torch.zeros(24, dtype=torch.long)
                    got = (u[:, t * wpg + v] >> (16 * h + J * bits)) & ((1 << bits) - 1)
                    assert torch.equal(got, want), (t, v, J, h)
    assert torch.equal(sl.unpack_slabs(words, bits, K, wpg), codes)
    # a slab never crosses a group boundary
    assert group >= K or group % S == 0


@pytest.mark.parametrize("chunk", [1, 1152, 2880])  # codes: 1, 2 and 5 rows of 576
def test_repack_in_row_chunks_equals_one_pass(monkeypatch, chunk):
    """The repack bounds its temporary memory by working through the rows in chunks (1 row, 2, 5 ...)."""
    qw = _layer(N=37, K=576, bits=2, group=128)
    whole = sl.repack_slabs(qw.qweight, 2, 576, 8)
    monkeypatch.setattr(sl, "REPACK_CHUNK", chunk)
    assert torch.equal(sl.repack_slabs(qw.qweight, 2, 576, 8), whole)


def test_slab_words_choices():
    assert sl.slab_words(2, 128, 4096) == 8 and sl.slab_words(4, 128, 4096) == 16 and sl.slab_words(8, 128, 4096) == 32
    assert sl.slab_words(2, 4096, 4096) == 8  # one group per row
    assert sl.slab_words(2, 48, 96) == 1  # 48 codes = 3 words: slabs of one word
    assert sl.slab_words(2, 8, 72) is None  # a group splits a word
    assert sl.slab_words(3, 128, 4096) is None  # 3-bit codes straddle words
    for bits, group, n_groups in ((2, 128, 32), (4, 8, 9), (2, 8, 9), (3, 128, 32), (8, 100, 1)):
        ok = cfgs.slab_ok(bits, group, n_groups)
        assert ok == (sl.slab_words(bits, group, group * n_groups if n_groups > 1 else group) is not None)


def test_cached_slabs_reused_and_invalidated_by_inplace_update():
    qw = _layer(bits=4, group=40)
    a = sl.cached_slabs(qw.qweight, 4, 200, 8)
    assert sl.cached_slabs(qw.qweight, 4, 200, 8) is a
    qw.qweight.copy_(_layer(bits=4, group=40, seed=1).qweight)  # load_state_dict-style in-place update
    b = sl.cached_slabs(qw.qweight, 4, 200, 8)
    assert b is not a and torch.equal(b, sl.repack_slabs(qw.qweight, 4, 200, 8))


def test_choose_path_m1_selects_slab_where_it_applies():
    assert cfgs.choose_path(1, 2, 128, 32) == cfgs.GEMV_M1
    assert cfgs.choose_path(1, 2, 128, 32, m1="slab16") == "slab16"
    assert cfgs.choose_path(1, 4, 128, 32, m1="slab") == "slab"
    assert cfgs.choose_path(1, 3, 128, 32, m1="slab16") == "gemv"  # 3 bits: stored layout
    assert cfgs.choose_path(1, 2, 8, 9, m1="slab16") == "gemv"  # group splits a word
    assert cfgs.choose_path(4, 2, 128, 32, m1="slab16") == "tc"  # batch > 1 unchanged
    with pytest.raises(ValueError, match="M = 1 kernel"):
        cfgs.choose_path(1, 2, 128, 32, m1="fast")


_INTERPRET = textwrap.dedent(
    """
    import torch
    from casp.kernels import triton_uniform as tu
    from tests.test_kernels_slab import _layer
    worst = 0.0
    # (N, K, group, config): masked tiles, a K range split in two, an odd K (one group), and an EVEN layer
    # (whole tiles, no masks, the last prefetch clamped); stages 3 = Triton's pipelined loop instead of the prefetch
    cases = [(24, 200, 40, (16, 256, 2, 2)), (40, 576, 128, (16, 256, 2, 3)), (33, 75, 75, (16, 256, 1, 2)),
             (64, 1024, 128, (64, 512, 2, 2)), (32, 512, 128, (32, 256, 1, 2)), (64, 1024, 128, (32, 256, 2, 3))]
    for (N, K, group, (bn, bk, split, stages)) in cases:
        for bits in (2, 4, 8):
            qw = _layer(N, K, bits, group)
            if not tu.cfgs.slab_ok(bits, group, qw.n_groups):
                continue
            for path in ("slab", "slab16"):
                x = torch.randn(1, K).half()
                b = torch.randn(N).half()
                y = tu.uniform_linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, group, b, path,
                                      tu.KernelConfig(bn, bk, num_stages=stages, split=split))
                ref = x.double() @ qw.dequantize(torch.float64).T + b.double()
                worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    assert worst < 3e-3, worst
    print("ok", worst)
    """
)


@needs_triton
def test_slab_kernels_under_triton_interpreter():
    run_interpreted(_INTERPRET)


def test_decode_7b_tiny_smoke(tmp_path):
    out = tmp_path / "decode.txt"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_7b.py"), "--tiny", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "casp 2-bit g128" in text and "casp mix 2/4-bit g128" in text
    assert "same argmax True" in text and "rel 0.0e+00" in text  # CPU: QuantLinear runs the torch path


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("casp_bench_kernels", ROOT / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernels_benchmark_plans_without_triton():
    """benchmarks/kernels.py builds its task list (paths x configs) in pure Python, for every mode it runs in."""
    kb = _bench_module()
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    m1 = ("gemv", "slab", "slab16")
    modes = [
        ((2, 4), (1,), False, m1, {"slab", "slab16"}),  # old vs new at batch 1, the slab paths swept
        ((2, 3, 4), (1, 4, 16, 2048), True, ("gemv",), set()),  # the full --sweep
        ((2, 3, 4), (1, 4, 16, 2048), False, m1, set()),  # tuned/default configs
    ]
    for bits, batches, sweep, m1_paths, sweep_paths in modes:
        tasks = kb.plan_tasks(shapes, bits, batches, sweep, m1_paths, sweep_paths)
        assert tasks
        for _n, K, b, _g, M, path, cfg, _dt, _act in tasks:
            assert isinstance(cfg, cfgs.KernelConfig) and cfg.bk >= cfgs.unit_geometry(b)[0]
            if M == 1 and len(m1_paths) > 1:
                assert path in m1_paths and (path == "gemv" or cfgs.slab_ok(b, 128, K // 128))
    swept = kb.plan_tasks(shapes, (2,), (1,), False, m1, {"slab16"})
    assert sum(t[5] == "slab16" for t in swept) == len(shapes) * len(kb.SWEEP["slab16"])


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("K", "group"), [(576, 128), (100, 100), (256, 64), (96, 32)])
def test_kmajor_layout_is_the_slab_layout_transposed(bits, K, group):
    qw = _layer(N=20, K=K, bits=bits, group=group, seed=K + bits)
    wpg = sl.slab_words(bits, group, K)
    kw = sl.repack_kmajor(qw.qweight, bits, K, wpg)
    assert kw.shape == (sl.n_slabs(K, bits, wpg) * wpg, 20) and kw.is_contiguous()
    assert torch.equal(sl.unpack_slabs(kw.t(), bits, K, wpg), qw.codes().to(torch.int64))


def test_pack_scale_zero_halves_and_code_shift():
    qw = _layer(N=6, K=256, bits=2, group=64)
    sz = sl.pack_scale_zero(qw.scales, qw.zeros, pre=4)
    assert sz.shape == (qw.n_groups, 6) and sz.dtype == torch.int32
    halves = sz.t().contiguous().view(torch.float16).view(6, qw.n_groups, 2)
    assert torch.equal(halves[..., 0], (qw.scales.float() * 16).half())  # low half: scale * 2^pre (exact)
    assert torch.equal(halves[..., 1], (qw.zeros.float() / 16).half())  # high half: zero * 2^-pre
    assert sl.kmajor_code_shift(qw.scales) == 4
    assert sl.kmajor_code_shift(torch.full((2, 2), 5000.0).half()) == 0  # 5000 * 16 would overflow fp16


def test_cached_kmajor_reused_and_invalidated():
    qw = _layer(N=8, K=256, bits=4, group=64)
    a = sl.cached_kmajor(qw.qweight, qw.scales, qw.zeros, 4, 64, 256)
    assert sl.cached_kmajor(qw.qweight, qw.scales, qw.zeros, 4, 64, 256) is a
    qw.scales.mul_(2)  # new scales: a fresh packed copy
    b = sl.cached_kmajor(qw.qweight, qw.scales, qw.zeros, 4, 64, 256)
    assert b is not a and torch.equal(b.sz, sl.pack_scale_zero(qw.scales, qw.zeros, b.pre))
    assert getattr(qw.qweight, "_casp_slab", None) is None  # its own cache: the slab one is untouched


def test_kernel_copy_bytes_counts_the_repacked_copies():
    from casp.quant.linear import QuantLinear

    qw = _layer(N=8, K=256, bits=4, group=64)
    model = torch.nn.Sequential(QuantLinear.from_weight(qw))
    assert sl.kernel_copy_bytes(model) == 0
    layer = model[0]
    slabs = sl.cached_slabs(layer.qweight, 4, 256, 8)
    kw = sl.cached_kmajor(layer.qweight, layer.scales, layer.zeros, 4, 64, 256)
    words, sz = kw.words, kw.sz
    # 8 rows x 256 4-bit codes = 256 words per layout, plus 4 groups x 8 rows of (scale, zero) pairs
    assert sl.kernel_copy_bytes(model) == 4 * (slabs.numel() + words.numel() + sz.numel()) == 4 * (256 + 256 + 32)


def test_choose_path_kmajor_only_for_fp16_and_2_or_4_bits():
    assert cfgs.choose_path(1, 2, 128, 32, m1="kmajor") == "kmajor"
    assert cfgs.choose_path(1, 4, 128, 32, m1="kmajor") == "kmajor"
    assert cfgs.choose_path(1, 2, 128, 32, m1="kmajor", half=False) == "gemv"  # bf16: half2 products need fp16
    assert cfgs.choose_path(1, 8, 128, 32, m1="kmajor") == "gemv"
    assert cfgs.choose_path(1, 3, 128, 32, m1="kmajor") == "gemv"
    assert cfgs.choose_path(4, 2, 128, 32, m1="kmajor") == "tc"


_INTERPRET_KMAJOR = textwrap.dedent(
    """
    import torch
    from casp.kernels import triton_uniform as tu
    from tests.test_kernels_slab import _layer
    worst = 0.0
    # (N, K, group, rows M, (bn, bk, warps, split, stages)): masked rows and columns, one group per row, K split
    # in two and three, half a slab per step, 3 activation rows, Triton's pipelined loop (stages 3), an EVEN layer
    cases = [(40, 576, 128, 1, (16, 64, 1, 2, 3)), (33, 75, 75, 1, (16, 128, 1, 1, 2)),
             (64, 1024, 128, 3, (64, 128, 2, 2, 2)), (32, 512, 128, 1, (32, 64, 1, 3, 2)),
             (64, 1024, 128, 1, (32, 128, 2, 3, 3)), (48, 96, 32, 2, (16, 128, 1, 1, 2))]
    for (N, K, group, M, (bn, bk, warps, split, stages)) in cases:
        for bits in (2, 4):
            qw = _layer(N, K, bits, group)
            if not tu.cfgs.kmajor_ok(bits, group, qw.n_groups):
                continue
            x = torch.randn(M, K).half()
            b = torch.randn(N).half()
            y = tu.uniform_linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, group, b, "kmajor",
                                  tu.KernelConfig(bn, bk, warps, stages, split=split))
            ref = x.double() @ qw.dequantize(torch.float64).T + b.double()
            worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    assert worst < 3e-3, worst
    print("ok", worst)
    """
)


@needs_triton
def test_kmajor_kernel_under_triton_interpreter():
    run_interpreted(_INTERPRET_KMAJOR)


_COMPILE_KMAJOR = textwrap.dedent(
    """
    from casp.kernels.triton_kmajor import _kmajor_gemv_kernel as kernel
    from tests.triton_interpreter import compile_sm90
    types = {"x_ptr": "*i32", "w_ptr": "*i32", "sz_ptr": "*i32", "b_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32",
             "cnt_ptr": "*i32"}
    for bits, bk, bn, warps, stages, even, prefetch, pdl in (
            (2, 8, 512, 4, 2, True, False, 0), (4, 16, 512, 4, 3, True, False, 0), (2, 4, 256, 2, 2, False, False, 0),
            (4, 8, 1024, 8, 2, False, False, 0), (2, 8, 256, 2, 3, True, True, 1), (4, 8, 256, 2, 3, True, True, 2),
            (2, 8, 512, 4, 3, True, False, 2)):
        const = {"BITS": bits, "WPG": 8 if bits == 2 else 16, "BK": bk, "BN": bn, "PRE": 4, "TWO": bits == 4,
                 "ASM": True, "EVEN": even, "HAS_BIAS": not even, "SPLIT": 4, "STAGES": stages,
                 "PREFETCH": prefetch, "PDL": pdl, "PF": 64}
        compiled = compile_sm90(kernel, types, const, num_warps=warps, num_stages=stages, launch_pdl=pdl > 0)
        assert compiled.asm["cubin"]
        ptx = compiled.asm["ptx"]
        assert "fma.rn.f16x2" in ptx  # the half2 decode, not the interpreter's fp32 one
        # the L2 bulk prefetch of words and scales, and the PDL trigger + wait, only where asked for
        assert ("cp.async.bulk.prefetch.L2.global" in ptx) == prefetch
        assert ptx.count("griddepcontrol.wait") == ptx.count("griddepcontrol.launch_dependents") == (pdl > 0)
        if prefetch and pdl:  # the prefetches go out before the wait for the previous kernel
            assert ptx.index("cp.async.bulk.prefetch") < ptx.index("griddepcontrol.wait")
    print("ok")
    """
)


@needs_triton
def test_kmajor_kernel_compiles_for_sm90():
    run_compiled(_COMPILE_KMAJOR)
