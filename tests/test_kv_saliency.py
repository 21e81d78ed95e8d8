import math

import pytest
import torch

from casp.kv.saliency import (
    KVSaliencyProfile,
    attention_by_kind,
    detect_patterns,
    find_pivot_tokens,
    measure_saliency,
    pivot_mask,
)
from casp.models import get_adapter
from tests.fixtures import build, make_image

T = 24
IMAGE = torch.zeros(1, T, dtype=torch.bool)
IMAGE[0, 6:18] = True  # positions 6..17 are image tokens, queries are rows 18..23


def causal_attention(scores: torch.Tensor) -> torch.Tensor:
    """[T, T] key preferences -> [1, 2, T, T] causal softmax attention."""
    mask = torch.ones(T, T).tril().bool()
    return torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1).expand(1, 2, T, T).clone()


def layer_favoring(keys: list[int], weight: float = 6.0) -> torch.Tensor:
    scores = torch.zeros(T, T)
    scores[:, keys] = weight
    return causal_attention(scores)


def test_text_salient_and_pivot_salient_layers():
    tsa = layer_favoring([19, 20, 21])  # text after the image
    psa = layer_favoring([10])  # a pivot token inside the image
    assert detect_patterns([tsa, psa, tsa], IMAGE) == ["TSA", "PSA", "TSA"]


def test_first_tokens_are_left_out():
    scores = torch.zeros(T, T)
    scores[:, 0] = 10.0  # attention sink on BOS (a text token)
    scores[:, 6:18] = 1.0  # image tokens get more than the other text tokens
    attn = causal_attention(scores)
    assert detect_patterns([attn], IMAGE, skip_first=5) == ["PSA"]
    assert detect_patterns([attn], IMAGE, skip_first=0) == ["TSA"]


def test_attention_by_kind_means_and_padding():
    attn = layer_favoring([10])
    text, image = attention_by_kind(attn, IMAGE)
    assert image > text > 0
    valid = torch.ones(1, T, dtype=torch.bool)
    valid[0, 6:18] = False  # every image token is padding: no image mean
    assert math.isnan(attention_by_kind(attn, IMAGE, valid_mask=valid)[1])
    assert detect_patterns([attn], IMAGE, valid_mask=valid) == ["PSA"]  # no image tokens: PSA rule
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        attention_by_kind(attn, IMAGE[:, :5])


def test_pivot_tokens_from_massive_activations():
    torch.manual_seed(0)
    h = torch.randn(40, 64)
    h[3] *= 60
    h[17] *= 30
    assert find_pivot_tokens(h).tolist() == [3, 17]
    assert find_pivot_tokens(h, k=1).tolist() == [3]
    assert find_pivot_tokens(h, ratio=40.0).tolist() == [3]
    assert find_pivot_tokens(torch.randn(40, 64)).numel() == 0  # no massive activation, no pivot
    mask = pivot_mask(torch.stack([h.norm(dim=-1), torch.ones(40)]), k=15, ratio=4.0)
    assert mask[0].nonzero().flatten().tolist() == [3, 17] and not mask[1].any()


def test_profile_json_round_trip(tmp_path):
    profile = KVSaliencyProfile(
        patterns=("TSA", "PSA"), text_attention=(0.2, 0.01), image_attention=(0.1, math.nan), samples=3
    )
    path = profile.save(tmp_path)
    loaded = KVSaliencyProfile.load(tmp_path)
    assert path.name == "casp_kv_profile.json"
    assert loaded.patterns == ("TSA", "PSA") and loaded.samples == 3 and math.isnan(loaded.image_attention[1])
    with pytest.raises(ValueError, match="TSA"):
        KVSaliencyProfile(patterns=("XYZ",))
    with pytest.raises(ValueError, match="entries"):
        KVSaliencyProfile(patterns=("TSA",), text_attention=(1.0, 2.0))
    with pytest.raises(FileNotFoundError, match="kv-analyze"):
        KVSaliencyProfile.load(tmp_path / "missing")


def test_measure_saliency_on_tiny_llava():
    model, processor = build("llava", num_layers=3)
    adapter = get_adapter(model)
    previous = model.config._attn_implementation
    batches = [adapter.build_inputs(processor, ["what color is the circle ?"], [make_image(i)]) for i in range(2)]
    profile = measure_saliency(model, adapter, batches)
    assert model.config._attn_implementation == previous
    assert profile.num_layers == 3 and profile.samples == 2
    assert all(p in ("TSA", "PSA") for p in profile.patterns)
    assert all(t > 0 and i > 0 for t, i in zip(profile.text_attention, profile.image_attention))
    expected = ["TSA" if t > i else "PSA" for t, i in zip(profile.text_attention, profile.image_attention)]
    assert list(profile.patterns) == expected
    assert len(profile.pivot_count) == 3 and all(c >= 0 for c in profile.pivot_count)
    assert all(0.0 <= share <= 1.0 for share in profile.pivot_in_image + profile.pivot_at_first)
    assert KVSaliencyProfile.from_json(profile.to_json()) == profile


def test_analyze_stores_the_profile_that_make_cache_reads(tmp_path):
    from casp.kv import AKVQCache, analyze, make_cache

    model, processor = build("llava", num_layers=3)
    adapter = get_adapter(model)
    batches = [adapter.build_inputs(processor, ["describe the picture ."], [make_image(0)])]
    profile = analyze(model, adapter, batches, model_dir=tmp_path)
    assert (tmp_path / "casp_kv_profile.json").is_file()
    cache = make_cache("akvq", model, adapter, model_dir=tmp_path)
    assert isinstance(cache, AKVQCache) and cache.config.profile == profile
    assert make_cache("fp16", model) is None
    with pytest.raises(ValueError, match="akvq"):
        make_cache("int3", model)
