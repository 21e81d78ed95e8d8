"""RTN and GPTQ against slow, plainly written references; the uniform format; the quantizer registry."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from casp.quant import config_from_dict, make_config, quantize, weight_from_state
from casp.quant.base import QuantizationError
from casp.quant.gptq import GPTQConfig, quantize_gptq, quantize_gptq_candidates
from casp.quant.rtn import RTNConfig, quantize_rtn
from casp.quant.uniform import UniformWeight

FP16_TINY = torch.finfo(torch.float16).tiny


def ref_fit(group: torch.Tensor, bits: int):
    """Min-max over [min(w, 0), max(w, 0)], scale rounded to fp16, integer zero (per row of ``group``)."""
    maxq = 2**bits - 1
    xmin = group.min(1).values.clamp(max=0)
    xmax = group.max(1).values.clamp(min=0)
    scale = ((xmax - xmin) / maxq).half().to(group.dtype).clamp_min(FP16_TINY)
    return scale, torch.round(-xmin / scale).clamp(0, maxq)


def ref_quant(w, scale, zero, bits):
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return q, (q - zero) * scale


def reference_rtn(W, bits, gs):
    Q = torch.empty_like(W)
    for j0 in range(0, W.shape[1], gs):
        scale, zero = ref_fit(W[:, j0 : j0 + gs], bits)
        for j in range(j0, min(j0 + gs, W.shape[1])):
            Q[:, j] = ref_quant(W[:, j], scale, zero, bits)[1]
    return Q


def reference_gptq(W, G, bits, gs, damp, act_order):
    """Column by column OBS: quantize w_j, then W_F -= (w_j - q_j) / [H_F^-1]_00 * [H_F^-1]_{0,:}, with
    H_F^-1 the exact inverse of the Hessian of the columns not yet quantized (no Cholesky, no blocks)."""
    W, H = W.double().clone(), G.double().clone()
    K = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * H.diagonal().mean() * torch.eye(K, dtype=H.dtype)
    Q, codes = torch.zeros_like(W), torch.zeros_like(W)
    for j in range(K):
        if j % gs == 0:
            scale, zero = ref_fit(W[:, j : j + gs], bits)
        codes[:, j], Q[:, j] = ref_quant(W[:, j], scale, zero, bits)
        Hinv = torch.linalg.inv(H[j:, j:])
        W[:, j:] -= torch.outer(W[:, j] - Q[:, j], Hinv[0] / Hinv[0, 0])
    return Q[:, torch.argsort(perm)], codes


def correlated(n_samples, K, seed, uneven=True):
    """Activations with correlated features (X = Z L), optionally uneven channel scales, and X^T X."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(K, K, generator=g) / K**0.5 + 0.3 * torch.eye(K)
    X = torch.randn(n_samples, K, generator=g) @ L
    if uneven:  # a few channels carry most of the energy, as in LLM activations
        X = X * torch.exp(torch.randn(K, generator=g))
    return X, X.T @ X


def weight(N, K, seed):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K,gs", [(100, 32), (64, 64), (70, -1), (33, 1)])
def test_rtn_matches_reference(bits, K, gs):
    W = weight(6, K, bits)
    qw = quantize_rtn(W, None, RTNConfig(bits=bits, group_size=gs))
    ref = reference_rtn(W.double(), bits, K if gs <= 0 else gs)
    torch.testing.assert_close(qw.dequantize(torch.float64), ref, atol=1e-6, rtol=1e-6)


def test_rtn_error_decreases_with_bits():
    W = weight(32, 256, 0)
    errs = [(quantize_rtn(W, None, RTNConfig(bits=b)).dequantize() - W).square().sum() for b in (2, 3, 4, 8)]
    assert all(a > 2 * b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_rtn_clip_search_never_worse(bits, seed):
    W = weight(16, 192, seed) ** 3  # heavy tails: clipping pays off
    _, G = correlated(64, 192, seed)

    def err(qw, d):
        return ((qw.dequantize() - W).square() * d).sum(1)  # per row; every group improves, so every row does

    ones = torch.ones(192)
    plain = quantize_rtn(W, None, RTNConfig(bits=bits, group_size=64))
    clipped = quantize_rtn(W, None, RTNConfig(bits=bits, group_size=64, clip_search=True))
    assert (err(clipped, ones) <= err(plain, ones) + 1e-6).all()
    assert err(clipped, ones).sum() < (0.9 if bits == 2 else 1.0) * err(plain, ones).sum()
    weighted = quantize_rtn(W, G, RTNConfig(bits=bits, group_size=64, clip_search=True))
    d = G.diagonal()
    assert (err(weighted, d) <= err(plain, d) * (1 + 1e-6)).all()


def test_rtn_group_size_resolution_and_partial_group():
    W = weight(4, 576, 0)  # SmolLM2's hidden size: 4 full groups of 128 + one of 64
    qw = quantize_rtn(W, None, RTNConfig(bits=4, group_size=128))
    assert qw.scales.shape == (4, 5) and qw.meta()["group_size"] == 128
    # the partial last group is quantized exactly as if it were a matrix of its own
    tail = quantize_rtn(W[:, 512:], None, RTNConfig(bits=4, group_size=64))
    torch.testing.assert_close(qw.dequantize()[:, 512:], tail.dequantize(), rtol=0, atol=0)
    for gs in (-1, 0, 1000):
        per_channel = quantize_rtn(W, None, RTNConfig(bits=4, group_size=gs))
        assert per_channel.scales.shape == (4, 1) and per_channel.group_size == 576


def test_configs_validate():
    with pytest.raises(ValueError, match="bits"):
        RTNConfig(bits=5)
    with pytest.raises(ValueError, match="group_size"):
        RTNConfig(group_size=-2)
    with pytest.raises(ValueError, match="damp"):
        GPTQConfig(damp=-0.1)
    with pytest.raises(ValueError, match="block_size"):
        GPTQConfig(block_size=0)
    with pytest.raises(ValueError, match="clip_min_ratio"):
        GPTQConfig(clip_min_ratio=0.0)


# ---------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [128, 5, 1])
def test_gptq_matches_exact_obs_reference(act_order, block_size):
    """8x32, group 8, one dead input; block 5 makes groups straddle blocks (pending lazy updates)."""
    W = weight(8, 32, 3)
    _, G = correlated(200, 32, 3)
    G[5, :] = 0
    G[:, 5] = 0
    cfg = GPTQConfig(bits=3, group_size=8, damp=0.01, block_size=block_size, act_order=act_order)
    Q_ref, codes_ref = reference_gptq(W, G, 3, 8, 0.01, act_order)

    qw = quantize_gptq(W.double(), G.double(), cfg)  # fp64 in, fp64 compute: agreement to rounding error
    assert torch.equal(qw.codes().double(), codes_ref)
    torch.testing.assert_close(qw.dequantize(torch.float64), Q_ref, atol=1e-12, rtol=0)
    assert (qw.dequantize()[:, 5] == 0).all()

    qw32 = quantize_gptq(W, G, cfg)  # fp32 compute
    torch.testing.assert_close(qw32.dequantize(torch.float64), Q_ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("group_size,block_size", [(8, 5), (16, 16), (-1, 7)])
def test_gptq_candidates_equal_one_run_per_width(clip_search, group_size, block_size):
    """The stacked multi-width pass gives, for every width, exactly the codes/scales/zeros of its own run."""
    W = weight(12, 48, 4).double()
    _, G = correlated(300, 48, 4)
    base = GPTQConfig(group_size=group_size, block_size=block_size, clip_search=clip_search, clip_steps=5)
    cfgs = base.candidates((2, 3, 4, 8))
    many = quantize_gptq_candidates(W, G.double(), cfgs)
    for c, qw in zip(cfgs, many):
        one = quantize_gptq(W, G.double(), c)
        assert qw.bits == c.bits
        assert torch.equal(qw.codes(), one.codes())
        torch.testing.assert_close(qw.dequantize(torch.float64), one.dequantize(torch.float64), atol=0, rtol=0)
    errs = [torch.linalg.norm(W - q.dequantize(torch.float64)) for q in many]
    assert errs == sorted(errs, reverse=True)  # more bits, less error


def test_gptq_per_channel_act_order_stores_no_permutation():
    """With one scale per row, act-order changes only the processing order: codes come back unpermuted, and
    no permutation is stored (it would cost 16 / out_features bits per weight)."""
    W, (_, G) = weight(8, 32, 5), correlated(200, 32, 5)
    qw = quantize_gptq(W.double(), G.double(), GPTQConfig(bits=3, group_size=-1, act_order=True))
    assert qw.perm is None
    Q_ref, _ = reference_gptq(W, G, 3, 32, 0.01, True)
    torch.testing.assert_close(qw.dequantize(torch.float64), Q_ref, atol=1e-12, rtol=0)
    plain = quantize_gptq(W, G, GPTQConfig(bits=3, group_size=8, act_order=True))
    assert plain.perm is not None and qw.bits_per_weight() < plain.bits_per_weight()


def test_gptq_candidates_reject_configs_that_differ_beyond_bits():
    W, (_, G) = weight(4, 16, 0), correlated(50, 16, 0)
    with pytest.raises(QuantizationError, match="differ only in bits"):
        quantize_gptq_candidates(W, G, [GPTQConfig(bits=2), GPTQConfig(bits=3, group_size=8)])
    with pytest.raises(QuantizationError, match="at least one"):
        quantize_gptq_candidates(W, G, [])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(bits, act_order):
    X, G = correlated(384, 128, bits, uneven=False)
    W = weight(64, 128, 10 + bits)
    gptq = quantize_gptq(W, G, GPTQConfig(bits=bits, group_size=32, act_order=act_order))
    rtn = quantize_rtn(W, None, RTNConfig(bits=bits, group_size=32))

    def out_err(qw):
        return torch.linalg.norm((W - qw.dequantize()) @ X.T)

    assert out_err(gptq) < 0.8 * out_err(rtn), (out_err(gptq), out_err(rtn))


def test_act_order_helps_when_few_channels_dominate():
    X, G = correlated(384, 128, 2, uneven=True)
    W = weight(64, 128, 12)

    def out_err(qw):
        return torch.linalg.norm((W - qw.dequantize()) @ X.T)

    rtn = out_err(quantize_rtn(W, None, RTNConfig(bits=2, group_size=32)))
    plain = out_err(quantize_gptq(W, G, GPTQConfig(bits=2, group_size=32, act_order=False)))
    ordered = out_err(quantize_gptq(W, G, GPTQConfig(bits=2, group_size=32, act_order=True)))
    assert ordered < 0.8 * plain and plain < rtn


def test_gptq_clip_search_runs_and_helps_on_average():
    X, G = correlated(256, 128, 0)
    W = weight(32, 128, 0) ** 3
    base = quantize_gptq(W, G, GPTQConfig(bits=2, group_size=32))
    clip = quantize_gptq(W, G, GPTQConfig(bits=2, group_size=32, clip_search=True))
    e = [torch.linalg.norm((W - q.dequantize()) @ X.T) for q in (base, clip)]
    assert e[1] < e[0]


def test_act_order_round_trip_restores_column_order():
    _, G = correlated(256, 96, 1)
    W = weight(16, 96, 1)
    qw = quantize_gptq(W, G, GPTQConfig(bits=8, group_size=32, act_order=True))
    perm = qw.perm.long()
    assert not torch.equal(perm, torch.arange(96))  # really permuted
    assert torch.equal(torch.sort(perm).values, torch.arange(96))
    # 8 bits: the reconstruction is close to W in the original order; the stored order is far off
    stored = UniformWeight(qw.qweight, qw.scales, qw.zeros, qw.shape, 8, 32).dequantize()
    assert torch.linalg.norm(qw.dequantize() - W) < 0.02 * torch.linalg.norm(W)
    assert torch.linalg.norm(stored - W) > 0.5 * torch.linalg.norm(W)
    # stored column j holds original feature perm[j]: x[..., perm] @ W_stored^T == x @ W^T
    x = torch.randn(3, 96)
    torch.testing.assert_close(x[:, perm] @ stored.T, x @ qw.dequantize().T, atol=1e-4, rtol=1e-4)


def test_gptq_raises_damping_instead_of_crashing():
    W = weight(4, 16, 0)
    G = torch.eye(16)
    G[0, 0] = -0.5  # not a Gram matrix: needs damp >= 1 * mean(diag) to factorize
    qw = quantize_gptq(W, G, GPTQConfig(bits=4, group_size=8))
    assert qw.meta()["damp_used"] == pytest.approx(1.0)
    assert torch.isfinite(qw.dequantize()).all()


def test_gptq_input_checks_and_low_precision_inputs():
    W = weight(8, 32, 0)
    _, G = correlated(64, 32, 0)
    with pytest.raises(QuantizationError, match="Gram matrix"):
        quantize_gptq(W, None, GPTQConfig())
    with pytest.raises(QuantizationError, match="in_features"):
        quantize_gptq(W, G[:16, :16], GPTQConfig())
    with pytest.raises(QuantizationError, match="GPTQConfig"):
        quantize_gptq(W, G, RTNConfig())
    Wb = W.bfloat16()
    a = quantize_gptq(Wb, G, GPTQConfig(bits=2, group_size=16))
    b = quantize_gptq(Wb.float(), G, GPTQConfig(bits=2, group_size=16))
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


# ---------------------------------------------------------------- format


def test_bits_per_weight_counts_scales_zeros_and_perm():
    W = weight(64, 512, 0)
    _, G = correlated(128, 512, 0)
    assert quantize_rtn(W, None, RTNConfig(bits=2, group_size=128)).bits_per_weight() == 2.25
    assert quantize_gptq(W, G, GPTQConfig(bits=2, act_order=False)).bits_per_weight() == 2.25
    # act-order adds one int32 per input column: 32 / out_features bits per weight
    assert quantize_gptq(W, G, GPTQConfig(bits=2, act_order=True)).bits_per_weight() == 2.25 + 32 / 64
    assert quantize_rtn(W, None, RTNConfig(bits=3, group_size=128)).bits_per_weight() == 3.25


def test_state_meta_round_trip_through_safetensors(tmp_path):
    _, G = correlated(128, 80, 0)
    qw = quantize_gptq(weight(24, 80, 0), G, GPTQConfig(bits=3, group_size=32))
    save_file(qw.state(), tmp_path / "w.safetensors")
    back = weight_from_state(load_file(tmp_path / "w.safetensors"), qw.meta())
    assert isinstance(back, UniformWeight) and back.meta() == qw.meta()
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert {k: v.dtype for k, v in qw.state().items()} == {
        "qweight": torch.int32,
        "scales": torch.float16,
        "zeros": torch.float16,
        "perm": torch.int32,
    }


def test_from_state_rejects_bad_tensors():
    qw = quantize_rtn(weight(8, 64, 0), None, RTNConfig(bits=4, group_size=32))
    state, meta = qw.state(), qw.meta()
    with pytest.raises(QuantizationError, match=r"'scales' has shape \(8, 3\), expected \(8, 2\)"):
        UniformWeight.from_state({**state, "scales": torch.zeros(8, 3, dtype=torch.float16)}, meta)
    with pytest.raises(QuantizationError, match=r"'qweight' has shape \(8, 4\), expected \(8, 8\)"):
        UniformWeight.from_state({**state, "qweight": state["qweight"][:, :4]}, meta)
    with pytest.raises(QuantizationError, match="'qweight' must be int32"):
        UniformWeight.from_state({**state, "qweight": state["qweight"].long()}, meta)
    with pytest.raises(QuantizationError, match="perm"):
        UniformWeight.from_state(state, {**meta, "act_order": True})
    with pytest.raises(QuantizationError, match="lacks"):
        UniformWeight.from_state(state, {"format": "uniform"})


# ---------------------------------------------------------------- registry


def test_registry_dispatch_and_config_round_trip():
    W = weight(8, 64, 0)
    _, G = correlated(64, 64, 0)
    cfg = make_config("gptq", bits=3, group_size=32)
    assert isinstance(cfg, GPTQConfig) and cfg.label() == "gptq-3b-g32"
    assert config_from_dict(cfg.to_dict()) == cfg
    qw = quantize(W, G, cfg)
    assert torch.equal(qw.qweight, quantize_gptq(W, G, cfg).qweight)
    assert torch.equal(
        quantize(W, None, make_config("rtn", bits=2)).qweight, quantize_rtn(W, None, RTNConfig(2)).qweight
    )


def test_registry_errors_name_the_known_choices():
    with pytest.raises(QuantizationError, match=r"unknown quantization method 'foo'.*'gptq'"):
        make_config("foo")
    with pytest.raises(ValueError, match="no field"):
        make_config("rtn", group=3)
    with pytest.raises(QuantizationError, match=r"unknown packed weight format 'bar'.*'uniform'"):
        weight_from_state({}, {"format": "bar"})
    with pytest.raises(ValueError, match="method"):
        config_from_dict({"bits": 2})
