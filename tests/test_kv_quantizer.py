import pytest
import torch

from casp.kv.quantizer import (
    PackedKV,
    default_clip,
    dequantize,
    dequantize_per_channel,
    pack_codes,
    quantize_per_channel,
    quantize_tokens,
    unpack_codes,
)


def reference_quantize(x: torch.Tensor, bits: int, group: int, clip: float):
    """Slow, obviously-correct per-group loop: returns (x_hat, scale, in_range mask)."""
    flat = x.float().reshape(-1, group)
    out = torch.empty_like(flat)
    scales, inside = [], torch.zeros_like(flat, dtype=torch.bool)
    for i, g in enumerate(flat):
        a, c = float(g.min()) * clip, float(g.max()) * clip
        s = (c - a) / (2**bits - 1)
        s = float(torch.tensor(max(s, 1e-7)).half().float())  # fp16 scale, as stored
        if s < (c - a) / (2**bits - 1):  # rounded up, like the real quantizer
            s = float(torch.nextafter(torch.tensor(s).half(), torch.tensor(float("inf")).half()).float())
        z = -round(a / s)
        for j, v in enumerate(g.tolist()):
            q = min(max(round(v / s) + z, 0), 2**bits - 1)
            out[i, j] = s * (q - z)
            inside[i, j] = a <= v <= c
        scales.append(s)
    return out.reshape(x.shape), torch.tensor(scales), inside.reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_and_size(bits):
    q = torch.randint(0, 2**bits, (3, 5, 32), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 32 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), q)


def test_pack_layout_little_endian_in_byte():
    q = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack_codes(q, 2).item() == 1 | (2 << 2) | (3 << 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_within_half_step_inside_clipped_range(bits):
    torch.manual_seed(bits)
    x = torch.randn(6, 4, 64) * 3 + torch.randn(6, 4, 1)
    group, clip = 32, default_clip(bits)
    p = quantize_tokens(x, bits, group, clip)
    x_hat = dequantize(p, torch.float32)
    s = p.scale.float().repeat_interleave(group, dim=-1)
    xg = x.reshape(6, 4, 2, group)
    lo = (xg.amin(-1, keepdim=True) * clip).expand_as(xg).reshape(x.shape)
    hi = (xg.amax(-1, keepdim=True) * clip).expand_as(xg).reshape(x.shape)
    inside = (x >= lo) & (x <= hi)
    err = (x - x_hat).abs()
    assert inside.float().mean() > 0.5
    assert bool((err[inside] <= s[inside] / 2 * (1 + 1e-5) + 1e-6).all())
    # outside the clipped range the value is clamped to the range's end, never beyond
    assert bool((err[~inside] <= (x - x.clamp(lo, hi)).abs()[~inside] + s[~inside] / 2 + 1e-5).all())


@pytest.mark.parametrize("bits", [2, 4])
def test_matches_slow_reference(bits):
    torch.manual_seed(0)
    x = torch.randn(4, 16) * 2
    p = quantize_tokens(x, bits, 8, clip=0.9)
    ref, scales, _ = reference_quantize(x, bits, 8, 0.9)
    torch.testing.assert_close(p.scale.float().flatten(), scales)
    torch.testing.assert_close(dequantize(p, torch.float32), ref, atol=1e-5, rtol=0)


def test_storage_is_really_packed():
    x = torch.randn(10, 2, 128, dtype=torch.float16)
    p = quantize_tokens(x, 2, 128, None)
    assert p.codes.dtype == torch.uint8 and p.scale.dtype == torch.float16 and p.zero.dtype == torch.float16
    assert p.codes.nbytes == x.numel() * 2 // 8
    assert p.nbytes == x.numel() // 4 + 20 * 2 * 2
    assert p.shape == (10, 2, 128) and p.group == 128


def test_more_bits_less_error():
    x = torch.randn(64, 128)
    errs = [(dequantize(quantize_tokens(x, b, 128, 1.0), torch.float32) - x).pow(2).mean() for b in (2, 4, 8)]
    assert errs[0] > 4 * errs[1] > 16 * errs[2]


def test_constant_and_offset_groups_are_exact_enough():
    x = torch.full((2, 32), 7.25)
    assert torch.allclose(dequantize(quantize_tokens(x, 2, 32, 1.0), torch.float32), x, atol=1e-2)
    y = 1000 + torch.rand(2, 32)  # tiny range far from zero: the zero point must stay exact in fp16
    p = quantize_tokens(y, 4, 32, 1.0)
    assert (dequantize(p, torch.float32) - y).abs().max() <= p.scale.float().max() / 2 + 1e-3


def test_per_channel_groups_along_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 8)  # [B, H, T, C]
    x[..., 5] *= 50  # an outlier channel only spoils its own groups
    p = quantize_per_channel(x, 2, 32, 1.0)
    assert p.codes.shape == (2, 3, 8, 2, 8)  # [B, H, C, T/32, 32*2/8]
    x_hat = dequantize_per_channel(p, torch.float32)
    assert x_hat.shape == x.shape
    err = (x_hat - x).abs()
    assert err[..., :5].max() < 1.0 < err[..., 5].max()


def test_cat_and_select():
    a, b = quantize_tokens(torch.randn(3, 16), 2, 8), quantize_tokens(torch.randn(2, 16), 2, 8)
    c = PackedKV.cat([a, b])
    assert c.shape == (5, 16)
    torch.testing.assert_close(dequantize(c.select(torch.tensor([3, 0])), torch.float32)[1], dequantize(a)[0].float())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=3, group=8), "bits"),
        (dict(bits=2, group=6), "multiple"),
        (dict(bits=2, group=7), "multiple"),
        (dict(bits=2, group=8, clip=1.5), "clip"),
    ],
)
def test_bad_arguments_give_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_tokens(torch.randn(2, 16), **kwargs)
