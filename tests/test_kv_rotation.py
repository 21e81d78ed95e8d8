import pytest
import torch
import transformers as tf

from casp.hadamard import hadamard_matrix
from casp.kv import AKVQCache, AKVQConfig, fold_value_rotation, is_value_rotation_folded, rotate, rotate_qk
from casp.kv.cache import AKVQLayer
from casp.kv.quantizer import dequantize, quantize_tokens
from casp.models import get_adapter


def tiny_llama(bias: bool = False, kv_heads: int = 2, layers: int = 2):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        attention_bias=bias,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def test_rotation_is_orthogonal_and_its_own_inverse():
    h = hadamard_matrix(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16))
    x = torch.randn(3, 16)
    torch.testing.assert_close(rotate(x), x @ h)
    torch.testing.assert_close(rotate(rotate(x)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotate(x, h), rotate(x))


def test_rotated_queries_and_keys_keep_attention_scores():
    q, k = torch.randn(2, 4, 7, 32, dtype=torch.float64), torch.randn(2, 4, 9, 32, dtype=torch.float64)
    qh, kh = rotate_qk(q, k)
    torch.testing.assert_close(qh @ kh.transpose(-1, -2), q @ k.transpose(-1, -2))
    assert (kh - k).abs().max() > 0.1  # it did rotate


def test_cache_key_rotation_equals_rotating_the_query():
    """The cache returns deq(quant(K H)) H^T; scores against it equal (QH) deq(quant(KH))^T."""
    torch.manual_seed(0)
    b, h, t, d = 1, 2, 40, 16
    k, v, q = torch.randn(b, h, t, d), torch.randn(b, h, t, d), torch.randn(b, h, 1, d)
    layer = AKVQLayer(AKVQConfig(bits=2, residual=0, block=8, tsa=False, psa=False), "uniform", False, d)
    layer.update(k, v)
    k_hat, _ = layer.update(torch.randn(b, h, 1, d), torch.randn(b, h, 1, d))
    deq_rot = dequantize(quantize_tokens(rotate(k).permute(2, 0, 1, 3), 2, 16, 0.8), torch.float32)
    deq_rot = deq_rot.permute(1, 2, 0, 3)  # [B, H, T, d], quantized in the rotated space
    torch.testing.assert_close(q @ k_hat[:, :, :t].transpose(-1, -2), rotate(q) @ deq_rot.transpose(-1, -2))


def test_rotation_lowers_2bit_key_error_with_outlier_channels():
    torch.manual_seed(0)
    k = torch.randn(256, 4, 128)
    k[..., 3] *= 20  # a fixed outlier channel, as in LLM keys
    plain = dequantize(quantize_tokens(k, 2, 128, 0.8), torch.float32)
    rotated = rotate(dequantize(quantize_tokens(rotate(k), 2, 128, 0.8), torch.float32))
    assert (rotated - k).pow(2).mean() < 0.5 * (plain - k).pow(2).mean()


@pytest.mark.parametrize("bias", [False, True])
def test_folded_value_rotation_keeps_logits_gqa(bias):
    model = tiny_llama(bias=bias, kv_heads=2)  # 4 query heads read 2 KV heads
    if bias:
        for block in model.model.layers:
            torch.nn.init.normal_(block.self_attn.v_proj.bias)
    ids = torch.randint(0, 96, (2, 12))
    before = model(ids).logits
    v_before = model.model.layers[0].self_attn.v_proj.weight.clone()
    fold_value_rotation(model)
    assert is_value_rotation_folded(model)
    assert (model.model.layers[0].self_attn.v_proj.weight - v_before).abs().max() > 1e-3
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already folded"):
        fold_value_rotation(model)


def test_folded_values_come_out_rotated():
    model = tiny_llama()
    x = torch.randn(1, 5, 64)
    attn = model.model.layers[0].self_attn
    v = attn.v_proj(x).view(1, 5, 2, 16)
    fold_value_rotation(model)
    torch.testing.assert_close(attn.v_proj(x).view(1, 5, 2, 16), rotate(v), atol=1e-5, rtol=1e-5)


def test_cache_rotation_alone_keeps_logits_before_quantization():
    """With everything in the fp16 window nothing is quantized: rotation on must change nothing."""
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 20))
    ref = model(ids).logits
    cache = AKVQCache(model, AKVQConfig(residual=64, rotate=True))
    torch.testing.assert_close(model(ids, past_key_values=cache).logits, ref)


def test_online_and_folded_value_rotation_agree():
    """Rotating V inside the cache (unfolded model) gives what folding gives, at 4 bits."""
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (1, 48))
    cfg = AKVQConfig(bits=4, residual=0, block=16, tsa=False, psa=False)
    results = []
    for folded in (False, True):
        model = tiny_llama()
        ref = model(ids).logits[:, 32:]
        if folded:
            fold_value_rotation(model)
        cache = AKVQCache(model, cfg, get_adapter(model))
        assert all(layer.rotate_values != folded for layer in cache.layers)
        model(ids[:, :32], past_key_values=cache)
        results.append(model(ids[:, 32:], past_key_values=cache).logits)
        assert 0 < (results[-1] - ref).abs().max() < 0.05  # quantized, but close
    torch.testing.assert_close(results[0], results[1], atol=2e-3, rtol=0)


def test_rotation_rejects_non_power_of_two_head_dim():
    cfg = tf.LlamaConfig(
        vocab_size=32, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    model = tf.LlamaForCausalLM(cfg).eval()  # head dim 12
    with pytest.raises(ValueError, match="power-of-two"):
        AKVQCache(model, AKVQConfig(group=4))
    AKVQCache(model, AKVQConfig(group=4, rotate=False))  # fine without rotation
