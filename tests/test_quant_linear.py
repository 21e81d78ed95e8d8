"""QuantLinear: forward against the dense reconstruction, dtype/device moves, state_dict round trips."""

import pytest
import torch
from torch import nn

from casp.quant.base import QuantizationError
from casp.quant.gptq import GPTQConfig, quantize_gptq
from casp.quant.linear import QuantLinear
from casp.quant.rtn import RTNConfig, quantize_rtn


def packed(act_order=True, N=24, K=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    X = torch.randn(128, K, generator=g)
    return quantize_gptq(W, X.T @ X, GPTQConfig(bits=3, group_size=32, act_order=act_order))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_equals_dequantized_matmul(act_order, with_bias):
    qw = packed(act_order)
    b = torch.randn(24) if with_bias else None
    layer = QuantLinear.from_weight(qw, b)
    x = torch.randn(2, 5, 80)  # [B, T, K]
    ref = x @ qw.dequantize().T + (0 if b is None else b)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip():
    src = QuantLinear.from_weight(packed(seed=0), torch.randn(24))
    sd = src.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "perm", "bias"}
    # a layer of the same shape and format but other values loads it and then computes the same
    dst = QuantLinear.from_weight(packed(seed=1), torch.zeros(24))
    dst.load_state_dict(sd)
    x = torch.randn(3, 80)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # the loading path of casp.formats: build on the meta device, then assign the stored tensors
    with torch.device("meta"):
        empty = QuantLinear.from_state(
            {k: torch.empty_like(v) for k, v in src.quantized_weight().state().items()}, src.meta, torch.empty(24)
        )
    empty.load_state_dict(sd, assign=True)
    torch.testing.assert_close(empty(x), src(x), rtol=0, atol=0)


def test_dtype_and_device_moves_keep_packed_dtypes():
    layer = QuantLinear.from_weight(packed(), torch.randn(24))
    qweight = layer.qweight.clone()
    x = torch.randn(4, 80)
    ref = layer(x)
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.float32):
        model = nn.Sequential(layer).to(dtype)
        assert model[0].qweight.dtype == torch.int32 and torch.equal(model[0].qweight, qweight)
        assert model[0].perm.dtype == torch.int32
        assert model[0].scales.dtype == torch.float16 and model[0].zeros.dtype == torch.float16
        assert model[0].bias.dtype == dtype
        y = model(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)
    layer.to("cpu")
    assert layer.qweight.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward():
    layer = QuantLinear.from_weight(packed(), torch.randn(24))
    x = torch.randn(4, 80)
    ref = layer(x)
    y = layer.to("cuda", torch.float16)(x.cuda().half())
    torch.testing.assert_close(y.float().cpu(), ref, atol=0.1, rtol=0.02)


def test_quantized_weight_is_a_view_and_repr():
    qw = quantize_rtn(torch.randn(8, 64), None, RTNConfig(bits=2, group_size=32))
    layer = QuantLinear.from_weight(qw)
    view = layer.quantized_weight()
    assert view.qweight.data_ptr() == layer.qweight.data_ptr()
    assert view.meta() == qw.meta()
    r = repr(layer)
    assert "format=uniform" in r and "bits=2" in r and "in_features=64" in r and "out_features=8" in r


def test_bad_inputs_are_rejected():
    qw = packed()
    with pytest.raises(ValueError, match="bias"):
        QuantLinear.from_weight(qw, torch.zeros(5))
    with pytest.raises(QuantizationError, match="scales"):
        QuantLinear.from_state({**qw.state(), "scales": qw.scales[:, :1]}, qw.meta())
