import dataclasses
import gc
import math

import pytest
import torch
import transformers as tf

from casp.kv import (
    AKVQCache,
    AKVQConfig,
    KIVICache,
    KIVIConfig,
    KVSaliencyProfile,
    PackedKV,
    UniformKVCache,
    ablation_configs,
)
from casp.kv.cache import LOW, SALIENT, AKVQLayer
from casp.models import get_adapter
from tests.fixtures import build, make_image


def tiny_llama(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def walk_nbytes(obj, seen=None) -> int:
    """Independent count: every tensor reachable from the object's attributes, each storage once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(walk_nbytes(v, seen) for v in obj)
    if isinstance(obj, dict):
        return sum(walk_nbytes(v, seen) for v in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(walk_nbytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("casp"):
        return sum(walk_nbytes(v, seen) for v in vars(obj).values())
    return 0


# ---- memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda m: AKVQCache(m, AKVQConfig(residual=16, block=8)),
        lambda m: UniformKVCache(m, residual=16),
        lambda m: KIVICache(m, KIVIConfig(residual=16, group=8)),
    ],
)
def test_memory_bytes_counts_every_stored_tensor(make):
    model = tiny_llama(layers=3)
    cache = make(model)
    ids = torch.randint(0, 96, (2, 70))
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=9,
        do_sample=False,
        past_key_values=cache,
        pad_token_id=0,
    )
    assert cache.get_seq_length() == 78
    assert cache.memory_bytes() == walk_nbytes(cache) > 0
    assert cache.memory_bytes() < cache.dense_bytes()


def long_run(cache_factory, tokens=1024):
    """fp16 bytes / cache bytes after ``tokens`` tokens of K/V with head dim 128, as in LLaVA / Qwen2-VL."""
    model = tiny_llama(layers=2, hidden=256, heads=2, kv_heads=2)
    cache = cache_factory(model)
    torch.manual_seed(0)
    for layer_idx in range(2):
        k, v = torch.randn(2, 1, 2, tokens, 128, dtype=torch.float16)
        cache.update(k, v, layer_idx)  # the fp16 path a GPU model takes, without the CPU fp16 forward
    fp16_bytes = 2 * 2 * tokens * 2 * 128 * 2  # K and V, 2 layers, 2 heads, dim 128, fp16
    assert cache.dense_bytes() == fp16_bytes
    return fp16_bytes / cache.memory_bytes(), cache


def test_two_bit_cache_is_over_4x_smaller_than_fp16_at_1024_tokens():
    ratio, cache = long_run(lambda m: UniformKVCache(m, bits=2, residual=128))
    assert cache.layers[0].keys.shape[-2] == 128  # the fp16 window is counted
    assert ratio >= 4.0, ratio
    kivi_ratio, _ = long_run(lambda m: KIVICache(m))
    assert kivi_ratio >= 3.4, kivi_ratio  # a scale and zero per 32 elements: 3.46x with the window


def test_akvq_memory_ratio_long_context():
    profile = KVSaliencyProfile(patterns=("PSA", "PSA"))
    cache = AKVQCache(tiny_llama(layers=2, hidden=256, heads=2, kv_heads=2), AKVQConfig(profile=profile))
    hidden = torch.randn(1, 2048, 256)
    hidden[0, [0, 7, 900]] *= 100  # three pivot tokens stay fp16
    for layer in cache.layers:
        layer.set_pivots(hidden, 15, 4.0)
    ratio, _ = long_run(lambda m: cache, tokens=2048)
    assert cache.layers[0].num_kept == 3
    assert ratio >= 4.0, ratio


# ---- generation ----------------------------------------------------------------------------------------


def test_eight_bit_cache_generates_the_fp16_tokens():
    model = tiny_llama(layers=2, seed=3)
    ids = torch.randint(0, 96, (1, 40))
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    cfg = AKVQConfig(bits=8, salient_bits=8, residual=8, block=8)
    cache = AKVQCache(model, cfg)
    out = model.generate(ids, past_key_values=cache, **kwargs)
    assert cache.layers[0].stored >= 48  # most of the sequence really went through 8-bit storage
    assert torch.equal(out, ref)
    kivi = KIVICache(model, KIVIConfig(bits=8, group=8, residual=8))
    assert torch.equal(model.generate(ids, past_key_values=kivi, **kwargs), ref)


def test_prefill_sees_its_own_tokens_exactly_and_decoding_the_quantized_past():
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 41))
    ref = model(ids).logits
    cache = AKVQCache(model, AKVQConfig(bits=2, residual=0, block=8))
    torch.testing.assert_close(model(ids[:, :40], past_key_values=cache).logits, ref[:, :40])
    step = model(ids[:, 40:], past_key_values=cache).logits[:, -1]
    assert (step - ref[:, -1]).abs().max() > 1e-4  # attended over a 2-bit past


@pytest.mark.parametrize("family", ["llama", "llava", "llava_next", "qwen2_vl", "idefics3"])
def test_generation_on_tiny_models(family):
    model, processor = build(family, num_layers=3)
    adapter = get_adapter(model)
    images = None if family == "llama" else [make_image(0, size=56), make_image(1, size=56)]
    inputs = adapter.build_inputs(processor, ["what color is the circle ?", "describe the picture ."], images)
    n_image = int(adapter.image_token_mask(model, inputs["input_ids"]).sum())
    assert (n_image > 0) == (family != "llama")
    kwargs = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    ref = model.generate(**inputs, **kwargs)
    for cache in (
        AKVQCache(model, AKVQConfig(residual=4, block=4, pivot_ratio=1.0)),
        KIVICache(model, KIVIConfig(residual=4, group=4)),
        UniformKVCache(model, residual=4, block=4),
    ):
        out = model.generate(**inputs, past_key_values=cache, **kwargs)
        assert out.shape == ref.shape
        assert cache.layers[0].stored > 0
        if isinstance(cache, AKVQCache):
            assert int(cache.image_mask.sum()) == n_image  # learned from the prefill input_ids
        if isinstance(cache, AKVQCache) and not isinstance(cache, UniformKVCache):
            psa = [layer for layer in cache.layers if layer.mode == "psa"]
            assert psa and all(layer.pivots is not None and layer.pivots.any() for layer in psa)


# ---- precision classes ---------------------------------------------------------------------------------


def run_layer(layer, b=2, h=2, t=48, d=16, seed=0):
    torch.manual_seed(seed)
    k, v = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    k_out, _ = layer.update(k, v)
    torch.testing.assert_close(k_out, k)  # prefill states come back exactly
    k_hat, v_hat = layer.update(torch.randn(b, h, 1, d), torch.randn(b, h, 1, d))
    return k, v, k_hat[:, :, :t], v_hat[:, :, :t]


def test_tsa_layer_keeps_text_at_salient_bits_and_images_at_low_bits():
    layer = AKVQLayer(AKVQConfig(bits=2, salient_bits=8, residual=8, block=8, rotate=False), "tsa", False, 16)
    image = torch.zeros(2, 48, dtype=torch.bool)
    image[0, 4:30] = True
    image[1, 10:20] = True
    layer.image_mask = image
    k, _, k_hat, _ = run_layer(layer)
    assert layer.stored == 40
    cls = layer.token_class.T  # [B, S]
    assert torch.equal(cls == LOW, image[:, :40]) and torch.equal(cls == SALIENT, ~image[:, :40])
    err = (k_hat - k).abs().amax(dim=(1, 3))  # [B, T]
    text = ~image.clone()
    text[:, 40:] = False
    assert err[text].max() < 0.05 < err[image].min()  # 8-bit text vs 2-bit image tokens
    assert torch.equal(k_hat[:, :, 40:], k[:, :, 40:])  # the fp16 window


def test_psa_layer_keeps_pivot_tokens_exact():
    layer = AKVQLayer(AKVQConfig(bits=2, residual=8, block=8), "psa", True, 16)
    hidden = torch.randn(2, 48, 32)
    hidden[0, 3] *= 100
    hidden[1, 25] *= 100
    hidden[1, 0] *= 50
    layer.set_pivots(hidden, k=15, ratio=4.0)
    assert layer.pivots.sum() == 3
    k, v, k_hat, v_hat = run_layer(layer)
    assert layer.num_kept == 3 and bool((layer.token_class == LOW).all())
    for b, t in ((0, 3), (1, 25), (1, 0)):
        assert torch.equal(k_hat[b, :, t], k[b, :, t]) and torch.equal(v_hat[b, :, t], v[b, :, t])
    assert (k_hat[0, :, 5] - k[0, :, 5]).abs().max() > 1e-3


def test_batch_selection_and_reordering_match_a_fresh_slice():
    def make():
        layer = AKVQLayer(AKVQConfig(bits=2, residual=8, block=8), "psa", True, 16)
        hidden = torch.randn(2, 48, 32, generator=torch.Generator().manual_seed(5))
        hidden[0, 3] *= 100
        hidden[1, 30] *= 100
        layer.set_pivots(hidden, 15, 4.0)
        return layer

    full = make()
    run_layer(full)
    step = torch.randn(2, 2, 1, 16)
    k_full, _ = full.update(step, step)
    sel = make()
    run_layer(sel)
    sel.batch_select_indices(torch.tensor([1]))
    k_sel, _ = sel.update(step[1:], step[1:])
    torch.testing.assert_close(k_sel, k_full[1:])
    rev = make()
    run_layer(rev)
    rev.reorder_cache(torch.tensor([1, 0]))
    k_rev, _ = rev.update(step.flip(0), step.flip(0))
    torch.testing.assert_close(k_rev, k_full.flip(0))
    rep = make()
    run_layer(rep)
    rep.batch_repeat_interleave(2)
    k_rep, _ = rep.update(step.repeat_interleave(2, 0), step.repeat_interleave(2, 0))
    torch.testing.assert_close(k_rep, k_full.repeat_interleave(2, 0))


def test_window_flushes_whole_blocks():
    layer = AKVQLayer(AKVQConfig(residual=16, block=8), "uniform", False, 16)
    x = torch.randn(1, 2, 100, 16)
    layer.update(x, x)
    assert (layer.stored, layer.keys.shape[-2], layer.get_seq_length()) == (80, 20, 100)
    for _ in range(4):
        layer.update(x[:, :, :1], x[:, :, :1])
    assert (layer.stored, layer.keys.shape[-2]) == (88, 16)
    assert isinstance(layer.k_rows[LOW], PackedKV) and layer.k_rows[LOW].shape == (88, 2, 16)


# ---- wiring --------------------------------------------------------------------------------------------


def test_hooks_are_removed_on_close_and_when_the_cache_is_dropped():
    model = tiny_llama(layers=3)
    before = len(model._forward_pre_hooks), len(model.model.layers[2]._forward_pre_hooks)
    cache = AKVQCache(model)
    assert len(model._forward_pre_hooks) == before[0] + 1
    assert len(model.model.layers[2]._forward_pre_hooks) == before[1] + 1  # PSA layer: pivot hook
    cache.close()
    assert (len(model._forward_pre_hooks), len(model.model.layers[2]._forward_pre_hooks)) == before
    cache = AKVQCache(model)
    del cache
    gc.collect()
    assert (len(model._forward_pre_hooks), len(model.model.layers[2]._forward_pre_hooks)) == before


def test_prepare_takes_an_explicit_image_mask():
    model = tiny_llama()
    cache = AKVQCache(model, AKVQConfig(residual=4, block=4))
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, 5:20] = True
    cache.prepare(image_mask=mask)
    model(torch.randint(0, 96, (1, 30)), past_key_values=cache)
    assert torch.equal(cache.layers[0].token_class[:, 0] == LOW, mask[0, :24])  # layer 0 is TSA by default
    with pytest.raises(ValueError, match="before the prefill"):
        cache.prepare(image_mask=mask)


def test_ablation_is_config_flags_of_one_class():
    configs = ablation_configs()
    assert list(configs) == ["uniform", "+rotation", "+TSA", "+PSA"]
    model = tiny_llama(layers=3)
    modes = {name: [layer.mode for layer in AKVQCache(model, cfg).layers] for name, cfg in configs.items()}
    assert modes["uniform"] == modes["+rotation"] == ["uniform"] * 3
    assert modes["+TSA"] == ["tsa", "tsa", "uniform"] and modes["+PSA"] == ["tsa", "tsa", "psa"]
    profile = KVSaliencyProfile(patterns=("PSA", "TSA", "PSA"))
    assert [la.mode for la in AKVQCache(model, AKVQConfig(profile=profile)).layers] == ["psa", "tsa", "psa"]
    with pytest.raises(ValueError, match="another model"):
        AKVQCache(model, AKVQConfig(profile=KVSaliencyProfile(patterns=("PSA",))))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=3), "bits"),
        (dict(salient_bits=16), "salient_bits"),
        (dict(residual=-1), "residual"),
        (dict(clip=0.0), "clip"),
        (dict(group=6), "group"),
        (dict(profile="x.json"), "KVSaliencyProfile"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AKVQConfig(**kwargs)


@pytest.mark.parametrize("kind", ["tsa", "kivi"])
def test_sliced_dequantization_matches_one_shot(kind):
    def make():
        if kind == "kivi":
            from casp.kv.kivi import KIVILayer

            return KIVILayer(KIVIConfig(residual=8, group=8), 16)
        layer = AKVQLayer(AKVQConfig(bits=2, salient_bits=4, residual=8, block=8), "tsa", True, 16)
        image = torch.zeros(2, 48, dtype=torch.bool)
        image[0, 4:30] = True
        image[1, 13:21] = True
        layer.image_mask = image
        return layer

    one, sliced = make(), make()
    sliced.dequant_slice = 2 * 2 * 16 * 8  # a few tokens per slice, not aligned with the class runs
    _, _, k1, v1 = run_layer(one)
    _, _, k2, v2 = run_layer(sliced)
    assert one.stored == 40
    torch.testing.assert_close(k1, k2, atol=0, rtol=0)
    torch.testing.assert_close(v1, v2, atol=0, rtol=0)


def test_bisect_batch_finds_the_largest_batch_that_runs():
    from casp.kv.bench import bisect_batch

    limit, calls = 137, []

    def run(b):
        calls.append(b)
        return {"batch": b} if b <= limit else None

    assert bisect_batch(run, {"batch": 32}, 32, 300, 0.0, max_runs=20)["batch"] == limit
    assert max(calls) < 300 and len(calls) <= 9
    within = bisect_batch(run, {"batch": 32}, 32, 300, 1 / 16, max_runs=20)["batch"]
    assert limit - limit // 16 - 1 <= within <= limit
    assert bisect_batch(lambda b: None, None, 0, 8, 0.0, max_runs=20) is None  # nothing fits


def test_transformers_quantized_cache_baseline_when_available():
    """transformers' own quantized cache joins the baselines where this transformers has a usable backend."""
    from transformers import cache_utils

    from casp.kv.bench import cache_methods, continuation_nll

    model = tiny_llama()
    adapter = get_adapter(model)
    methods = cache_methods(model, adapter, ablation=False)
    if not hasattr(cache_utils, "Fp8QuantizedLayer"):
        assert not any(name.startswith("transformers-fp8") for name in methods)
        return
    assert "transformers-fp8" in methods
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    prefix = {"input_ids": ids[:, :24], "attention_mask": torch.ones(1, 24, dtype=torch.long)}
    fp16 = continuation_nll(model, prefix, ids[:, 24:], methods["fp16"])
    fp8 = continuation_nll(model, prefix, ids[:, 24:], methods["transformers-fp8"])
    assert math.isfinite(fp8) and abs(fp8 - fp16) < 0.05 * fp16  # 8-bit: close to the unquantized cache


def test_kv_bench_reports_the_median_of_repeated_largest_batch_runs(monkeypatch):
    """--repeats: the largest batch is re-run, the median run is reported and every pairing of runs is listed."""
    import types

    from casp.kv import bench

    row = {"batch": 8, "tokens_per_s": 100.0, "decode_tokens_per_s": 1.0, "peak_gb": 1.0, "cache_gb": 1.0,
           "seconds": 1.0, "prefill_s": 0.5}  # fmt: skip
    speeds = iter([90.0, 120.0])
    monkeypatch.setattr(bench, "try_batch", lambda *a, **k: dict(row, tokens_per_s=next(speeds)))
    args = types.SimpleNamespace(repeats=3, prompt_len=16, gen=4)
    top = bench.median_of_runs(None, None, dict(row), args, (0, 4), 0, lambda m: None)
    assert top["tokens_per_s"] == 100.0 and top["tokens_per_s_runs"] == [90.0, 100.0, 120.0]
    res = {
        "device": "x", "torch": "x", "transformers": "x", "model": "x", "prompt_len": 16, "image_tokens": 4, "gen": 4,
        "batch": 8, "prefill_chunk": 0, "repeats": 3,
        "methods": {
            "fp16": {"fixed": None, "max": dict(row, tokens_per_s_runs=[50.0, 40.0])},
            "akvq-2bit": {"fixed": None, "max": top},
        },
    }  # fmt: skip
    text = bench.efficiency_table(res)
    assert "median of 3 runs" in text
    assert "every pairing gives 1.80x to 3.00x" in text
