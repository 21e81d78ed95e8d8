"""Decode attention over the packed AKVQ store (casp.kv.attention): the torch reference against plain softmax
attention over the dequantized cache, layer by layer and in generation. The Triton kernel's own checks
are in test_kv_attention_triton.py."""

import pytest
import torch
import transformers as tf

from casp.kv import AKVQCache, AKVQConfig, UniformKVCache
from casp.kv.attention import (
    FUSED_ATTENTION,
    LAZY_LAYER_ATTR,
    DenseSegment,
    PackedSegment,
    Partial,
    decode_attention,
    dense_partial,
    enable_fused_kv_attention,
    key_valid_from_mask,
    layer_decode_attention,
    merge_partials,
    packed_partial_reference,
)
from casp.kv.cache import AKVQLayer
from casp.kv.quantizer import dequantize, quantize_tokens
from casp.models import get_adapter
from tests.fixtures import build, make_image

FP32 = {"atol": 2e-5, "rtol": 2e-5}


def softmax_attention(q, k, v, valid, scale):
    """Obviously-correct reference: q [B, Hq, D], k/v [B, Hkv, T, D], valid [B, T] or None -> [B, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1).double(), v.repeat_interleave(g, dim=1).double()
    s = torch.einsum("bhd,bhtd->bht", q.double(), k) * scale
    if valid is not None:
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", torch.softmax(s, dim=-1), v)


def test_merge_of_split_partials_is_softmax_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
    valid = torch.rand(2, 30) > 0.3
    valid[:, 12:20] = False  # one split sees no valid token at all
    parts = [dense_partial(q, k[:, :, a:b], v[:, :, a:b], valid[:, a:b], 0.5) for a, b in ((0, 12), (12, 20), (20, 30))]
    assert torch.isinf(parts[1].m).all() and (parts[1].l == 0).all()
    torch.testing.assert_close(merge_partials(parts).double(), softmax_attention(q, k, v, valid, 0.5), **FP32)


@pytest.mark.parametrize("bits,group", [(2, 16), (4, 8), (8, 16)])
def test_packed_reference_is_softmax_over_gathered_dequantized_rows(bits, group):
    torch.manual_seed(bits)
    n, hkv, d, b, length = 37, 2, 16, 3, 21
    k, v = quantize_tokens(torch.randn(n, hkv, d), bits, group), quantize_tokens(torch.randn(n, hkv, d), bits, group)
    idx = torch.randint(0, n, (b, length), dtype=torch.int32)
    idx[0, 3::4] = -1
    q = torch.randn(b, 4, d)
    part = packed_partial_reference(q, k, v, idx, 0.25)
    rows = idx.clamp_min(0).long()
    kd = dequantize(k, torch.float32)[rows].transpose(1, 2)  # [B, Hkv, L, D]
    vd = dequantize(v, torch.float32)[rows].transpose(1, 2)
    ref = softmax_attention(q, kd, vd, idx >= 0, 0.25)
    torch.testing.assert_close(merge_partials([part]).double(), ref, **FP32)


def test_decode_attention_rotates_the_query_for_rotated_keys_and_the_output_for_rotated_values():
    from casp.hadamard import hadamard_matrix

    torch.manual_seed(1)
    h = hadamard_matrix(16, dtype=torch.float32)
    kx, vx = torch.randn(20, 2, 16), torch.randn(20, 2, 16)
    k, v = quantize_tokens(kx @ h, 4, 16), quantize_tokens(vx @ h, 4, 16)
    idx = torch.arange(20, dtype=torch.int32).expand(1, 20).contiguous()
    seg = PackedSegment(k, v, idx, idx.clone())
    q = torch.randn(1, 2, 16)
    out = decode_attention(q, [seg], [], 0.3, hadamard=h, rotate_keys=True, rotate_values=True)
    k_back = (dequantize(k, torch.float32) @ h).transpose(0, 1).unsqueeze(0)  # the torch path's K^ = deq H^T
    v_back = (dequantize(v, torch.float32) @ h).transpose(0, 1).unsqueeze(0)
    torch.testing.assert_close(out.double(), softmax_attention(q, k_back, v_back, None, 0.3), **FP32)


def test_key_valid_from_bool_and_additive_masks():
    bool_mask = torch.tensor([[True, False, True, True]]).view(1, 1, 1, 4)
    add_mask = torch.zeros(1, 1, 1, 4).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    for mask in (bool_mask, add_mask):
        assert key_valid_from_mask(mask, 4).tolist() == [[True, False, True, True]]
    assert key_valid_from_mask(None, 4) is None


# ---- layers: the fused path equals softmax over what the torch path returns --------------------------------


def make_layer_pair(mode: str, rotate_values: bool, **cfg):
    config = AKVQConfig(**{"bits": 2, "salient_bits": 4, "residual": 8, "block": 4, **cfg})
    return [AKVQLayer(config, mode, rotate_values, 16) for _ in range(2)]


@pytest.mark.parametrize(
    "mode,rotate_values,cfg",
    [
        ("uniform", False, {"rotate": False}),
        ("tsa", False, {}),
        ("tsa", True, {"salient_bits": 8}),  # an 8-bit class runs in the reference even where the kernel exists
        ("psa", True, {}),
        ("psa", False, {"residual": 0, "block": 1}),  # every token quantized at once
    ],
)
def test_layer_decode_attention_matches_softmax_over_the_dequantized_cache(mode, rotate_values, cfg):
    torch.manual_seed(2)
    torch_layer, fused_layer = make_layer_pair(mode, rotate_values, **cfg)
    b, hkv, hq, t, d = 3, 2, 4, 30, 16
    image = torch.zeros(b, t, dtype=torch.bool)
    image[0, 5:20], image[1, 2:9], image[2, 10:25] = True, True, True
    hidden = torch.randn(b, t, 8)
    hidden[0, 0] *= 50
    hidden[1, 12] *= 50
    hidden[2, [3, 17]] *= 50
    for layer in (torch_layer, fused_layer):
        layer.image_mask = image
        layer.set_pivots(hidden, k=15, ratio=4.0)
    fused_layer.fused_decode = True
    k, v = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    torch_layer.update(k, v)
    fused_layer.update(k, v)
    pad = torch.ones(b, t + 12, dtype=torch.bool)
    pad[1, :4] = False  # left padding of row 1
    for step in range(12):  # crosses several block boundaries (stores deferred on the fused layer)
        kn, vn, q = torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hq, 1, d)
        k_all, v_all = torch_layer.update(kn, vn)
        k_tag, _ = fused_layer.update(kn, vn)
        assert getattr(k_tag, LAZY_LAYER_ATTR) is fused_layer and k_tag.shape == kn.shape
        length = t + step + 1
        mask = pad[:, :length].view(b, 1, 1, length)
        out = layer_decode_attention(fused_layer, q, mask, 0.25)
        ref = softmax_attention(q[:, :, 0], k_all, v_all, pad[:, :length], 0.25)
        torch.testing.assert_close(out[:, :, 0].double(), ref, **FP32)
    assert fused_layer.stored > 0
    if mode == "psa":
        assert fused_layer.num_kept == 4
    assert fused_layer.get_seq_length() == torch_layer.get_seq_length() == t + 12


def test_fused_decode_never_dequantizes_the_store(monkeypatch):
    torch_layer, fused_layer = make_layer_pair("uniform", False)
    fused_layer.fused_decode = True
    fused_layer.update(torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16))

    def boom(*args):
        raise AssertionError("the fused path dequantized the store")

    monkeypatch.setattr(fused_layer, "_load_into", boom)
    for _ in range(6):
        fused_layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
        layer_decode_attention(fused_layer, torch.randn(1, 2, 1, 16), None, 0.25)


def test_window_buffer_appends_in_place_and_memory_counts_it():
    layer = make_layer_pair("uniform", False)[1]
    layer.fused_decode = True
    layer.update(torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16))
    assert (layer.stored, layer.keys.shape[-2]) == (12, 8)
    layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    buffer = layer._kbuf
    assert buffer.shape[-2] == 12 and layer.keys.data_ptr() == buffer.data_ptr()
    for _ in range(3):
        layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert layer._kbuf is buffer and (layer.stored, layer.keys.shape[-2]) == (12, 12)  # a block due, not yet stored
    layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert layer._kbuf is buffer and (layer.stored, layer.keys.shape[-2]) == (16, 9)
    assert any(t is buffer for t in layer.tensors())


# ---- generation --------------------------------------------------------------------------------------------


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def generate(model, inputs, make_cache, n=16):
    cache = make_cache()
    out = model.generate(
        **inputs,
        past_key_values=cache,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out, cache


@pytest.mark.parametrize("folded", [False, True])
def test_fused_generation_gives_the_torch_path_tokens_on_tiny_llama(folded):
    from casp.kv import fold_value_rotation

    model = tiny_llama()
    if folded:
        fold_value_rotation(model)
    ids = torch.randint(3, 96, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    inputs = {"input_ids": ids, "attention_mask": mask}
    image = torch.zeros(3, 40, dtype=torch.bool)
    image[:, 8:28] = True

    def make():
        cache = AKVQCache(model, AKVQConfig(residual=8, block=4, pivot_ratio=1.5))
        cache.prepare(image_mask=image)
        return cache

    ref, ref_cache = generate(model, inputs, make)
    assert not any(layer.fused_decode for layer in ref_cache.layers)
    enable_fused_kv_attention(model)
    assert model.config._attn_implementation == FUSED_ATTENTION
    out, cache = generate(model, inputs, make)
    assert all(layer.fused_decode for layer in cache.layers)
    assert sum(layer.num_kept for layer in cache.layers) > 0  # PSA pivots took the kept-token path
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=0)

    # the uniform baseline (a subclass) and fused=False on the same model
    def uniform(fused):
        cache = UniformKVCache(model, residual=8, block=4)
        cache.fused = fused
        return cache

    base, base_cache = generate(model, inputs, lambda: uniform(False))
    fused, fused_cache = generate(model, inputs, lambda: uniform(None))
    assert not base_cache.layers[0].fused_decode and fused_cache.layers[0].fused_decode
    assert torch.equal(base.sequences, fused.sequences)


def test_casp_kv_attention_is_sdpa_at_prefill_and_without_a_quantized_cache():
    model = tiny_llama(seed=1)
    ids = torch.randint(3, 96, (2, 24))
    ref = model(ids).logits
    enable_fused_kv_attention(model)
    torch.testing.assert_close(model(ids).logits, ref)
    plain, _ = generate(tiny_llama(seed=1), {"input_ids": ids}, lambda: tf.DynamicCache(), n=6)
    fused, _ = generate(model, {"input_ids": ids}, lambda: tf.DynamicCache(), n=6)
    assert torch.equal(plain.sequences, fused.sequences)


def test_fused_true_needs_the_casp_kv_attention():
    model = tiny_llama()
    cache = AKVQCache(model, AKVQConfig(residual=8, block=4), fused=True)
    with pytest.raises(ValueError, match="enable_fused_kv_attention"):
        model(torch.randint(3, 96, (1, 12)), past_key_values=cache)


def test_fused_generation_on_tiny_llava():
    model, processor = build("llava", num_layers=3)
    adapter = get_adapter(model)
    images = [make_image(0, size=56), make_image(1, size=56)]
    inputs = adapter.build_inputs(processor, ["what color is the circle ?", "describe the picture ."], images)
    make = lambda: AKVQCache(model, AKVQConfig(residual=4, block=4, pivot_ratio=1.0))
    ref, _ = generate(model, inputs, make, n=8)
    enable_fused_kv_attention(model)
    out, cache = generate(model, inputs, make, n=8)
    assert all(layer.fused_decode for layer in cache.layers) and cache.layers[0].stored > 0
    assert int(cache.image_mask.sum()) > 0
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=0)


def test_decode_segments_of_a_tsa_layer_cover_every_token_once():
    layer = make_layer_pair("tsa", False)[1]
    image = torch.zeros(2, 26, dtype=torch.bool)
    image[0, 3:15], image[1, 6:10] = True, True
    layer.image_mask = image
    layer.update(torch.randn(2, 2, 26, 16), torch.randn(2, 2, 26, 16))
    packed, dense = layer.decode_segments()
    assert len(packed) == 2 and len(dense) == 1  # text 4-bit, image 2-bit; the window
    seen = torch.zeros(2, layer.get_seq_length(), dtype=torch.long)
    for seg in packed:
        for row in range(2):
            pos = seg.pos[row][seg.idx[row] >= 0].long()
            seen[row, pos] += 1
    for seg in dense:
        seen.scatter_add_(1, seg.pos.long(), torch.ones_like(seg.pos, dtype=torch.long))
    assert bool((seen == 1).all())
    assert isinstance(packed[0], PackedSegment) and isinstance(dense[0], DenseSegment)
    out = merge_partials([dense_partial(torch.randn(2, 2, 16), dense[0].k, dense[0].v, None, 1.0)])
    assert out.shape == (2, 2, 16)


def test_partial_is_a_plain_triple():
    p = Partial(torch.zeros(1, 1, 1), torch.ones(1, 1, 1), torch.ones(1, 1, 1, 4))
    assert merge_partials([p]).tolist() == [[[1.0, 1.0, 1.0, 1.0]]]


# ---- the benchmark's chunked prefill ----------------------------------------------------------------------


def test_chunked_prefill_loop_gives_generate_tokens_and_pivots_cover_every_chunk():
    from casp.kv.bench import greedy_chunked

    model = tiny_llama(seed=4)
    ids = torch.randint(3, 96, (2, 45))
    ref = model.generate(ids, max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0)[:, 45:]
    new, prefill_s, decode_s = greedy_chunked(model, tf.DynamicCache(), ids, 7, chunk=16)
    assert torch.equal(new, ref) and prefill_s > 0 and decode_s > 0
    enable_fused_kv_attention(model)
    cache = AKVQCache(model, AKVQConfig(residual=8, block=4, pivot_ratio=1.0, pivots=2))
    greedy_chunked(model, cache, ids, 5, chunk=16)
    psa = [layer for layer in cache.layers if layer.mode == "psa"]
    assert psa and all(layer.pivots.shape[1] == 45 for layer in psa)  # 16 + 16 + 13: each chunk's pivots
    assert all(int(layer.pivots[:, 16:].sum()) > 0 for layer in psa)
