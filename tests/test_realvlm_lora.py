"""LoRA updates of the real-parts VLM's language model (trained by hooks, stored as factors beside the projector,
merged into the fetched weights at load), the question mix, and the feature pipeline; tiny random stand-in."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from casp.demo import world
from casp.errors import ModelLoadError
from casp.models import get_adapter
from casp.realmodels.realvlm import (
    balance_lora,
    load_realvlm,
    lora_tensors,
    merge_lora_state,
    save_realvlm,
    split_lora,
)
from tests.test_realvlm import _parts_of, inputs_for, tiny_standin, tiny_train_config

N_LINEARS = 2 * 7  # the stand-in's 2 decoder blocks x (q, k, v, o, gate, up, down)


def random_factors(model, rank: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if name.startswith("language_model.model.layers.") and isinstance(mod, torch.nn.Linear):
            a = torch.randn(rank, mod.in_features, generator=g)
            b = torch.randn(mod.out_features, rank, generator=g) * 0.05
            out[name] = (a, b)
    return out


def logits(model, processor):
    inputs = inputs_for(processor, get_adapter(model))
    with torch.no_grad():
        return model(**inputs).logits


def test_balance_keeps_the_product_and_evens_the_norms():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 9, generator=g) * 30
    B = torch.randn(7, 4, generator=g) * 1e-4
    A2, B2 = balance_lora(A, B)
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(A2.norm(dim=1), B2.norm(dim=0))
    # a zero component (B starts at 0 in LoRA) stays as it is instead of dividing by zero
    B[:, 0] = 0
    A3, B3 = balance_lora(A, B)
    assert torch.isfinite(A3).all() and torch.equal(B3[:, 0], torch.zeros(7))


def test_hooks_equal_merged_weights_and_removal_restores_the_model():
    from casp.demo.lora import LORA_TARGETS, LoRAHooks, merge_into

    model, processor = tiny_standin()
    before = logits(model, processor)
    lora = LoRAHooks(model, LORA_TARGETS, rank=4, alpha=8.0)
    assert len(lora.names) == N_LINEARS
    torch.testing.assert_close(logits(model, processor), before)  # B = 0: starts at the pretrained model
    with torch.no_grad():
        for b in lora.B:
            b.normal_(0, 0.05)
    hooked = logits(model, processor)
    assert not torch.allclose(hooked, before)
    lora.remove()
    torch.testing.assert_close(logits(model, processor), before)
    merge_into(model, lora.factors())
    torch.testing.assert_close(logits(model, processor), hooked, rtol=1e-4, atol=1e-4)


def test_hooks_only_on_chosen_targets():
    from casp.demo.lora import LoRAHooks

    model, _ = tiny_standin()
    lora = LoRAHooks(model, ("self_attn.q_proj", "mlp.down_proj"), rank=2, alpha=2.0)
    assert sorted(n.removeprefix("language_model.model.layers.") for n in lora.names) == [
        "0.mlp.down_proj",
        "0.self_attn.q_proj",
        "1.mlp.down_proj",
        "1.self_attn.q_proj",
    ]


def test_projector_and_factors_save_load_round_trip(tmp_path):
    """A projector-only directory with LoRA factors: load_realvlm merges them into the fetched LM."""
    from casp.demo.lora import merge_into

    model, processor = tiny_standin(seed=2)
    parts = _parts_of(save_realvlm(model, processor, tmp_path / "whole", include_parts=True), tmp_path)
    factors = random_factors(model)
    merge_into(model, factors)
    model.lora_factors = factors
    out = save_realvlm(model, processor, tmp_path / "m")
    stored = load_file(str(out / "model.safetensors"))
    lora_keys = [k for k in stored if k.startswith("lora.")]
    assert len(lora_keys) == 2 * N_LINEARS and all(stored[k].dtype == torch.float16 for k in lora_keys)
    assert all(k.startswith(("projector.", "lora.")) for k in stored)
    loaded = load_realvlm(out, parts=parts)
    assert loaded.config.lora["rank"] == 3 and len(loaded.config.lora["modules"]) == N_LINEARS
    torch.testing.assert_close(logits(loaded, processor), logits(model, processor), rtol=2e-3, atol=2e-3)
    # re-saving the loaded model (projector only) keeps the updates; a whole save stores merged weights
    again = load_realvlm(save_realvlm(loaded, processor, tmp_path / "again"), parts=parts)
    torch.testing.assert_close(logits(again, processor), logits(loaded, processor), rtol=1e-4, atol=1e-4)
    whole = save_realvlm(loaded, processor, tmp_path / "whole2", include_parts=True)
    assert not any(k.startswith("lora.") for k in load_file(str(whole / "model.safetensors")))
    torch.testing.assert_close(logits(load_realvlm(whole), processor), logits(loaded, processor))


def test_directories_without_factors_load_as_before(tmp_path):
    model, processor = tiny_standin(seed=4)
    parts = _parts_of(save_realvlm(model, processor, tmp_path / "whole", include_parts=True), tmp_path)
    loaded = load_realvlm(save_realvlm(model, processor, tmp_path / "m"), parts=parts)
    assert loaded.lora_factors is None and loaded.config.lora is None
    torch.testing.assert_close(logits(loaded, processor), logits(model, processor))


def test_bad_factors_are_one_clear_error():
    model, _ = tiny_standin()
    state = model.state_dict()
    name = "language_model.model.layers.0.self_attn.q_proj"
    w = state[f"{name}.weight"]
    with pytest.raises(ModelLoadError, match="shape"):
        merge_lora_state(state, {name: (torch.zeros(2, w.shape[1] + 1), torch.zeros(w.shape[0], 2))}, "d")
    with pytest.raises(ModelLoadError, match="no language_model.nope.weight"):
        merge_lora_state(state, {"language_model.nope": (torch.zeros(2, 3), torch.zeros(3, 2))}, "d")
    with pytest.raises(ModelLoadError, match="incomplete"):
        split_lora({f"lora.{name}.A": torch.zeros(2, 3)}, "d")
    entries = lora_tensors({name: (torch.ones(2, 3), torch.ones(4, 2))})
    assert set(split_lora(entries, "d")[1]) == {name}


def test_concat_factors_sums_updates():
    from casp.demo.lora import concat_factors

    g = torch.Generator().manual_seed(0)
    f1 = {"m": (torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g))}
    f2 = {
        "m": (torch.randn(4, 5, generator=g), torch.randn(3, 4, generator=g)),
        "n": (torch.ones(1, 2), torch.ones(2, 1)),
    }
    both = concat_factors(f1, f2)
    a, b = both["m"]
    torch.testing.assert_close(b @ a, f1["m"][1] @ f1["m"][0] + f2["m"][1] @ f2["m"][0])
    assert a.shape == (6, 5) and set(both) == {"m", "n"}


def test_train_with_lora_saves_factors_that_reload_to_the_trained_model(tmp_path):
    """Projector + LoRA training, saved without the frozen parts, reloaded from 'fetched' parts: same model
    as in memory; a second run that starts from it adds its updates (ranks add)."""
    from casp.demo.train_realvlm import train

    model, processor = tiny_standin()
    parts = _parts_of(save_realvlm(model, processor, tmp_path / "whole", include_parts=True), tmp_path)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    tc = tiny_train_config(steps=3, final_eval_n=0, lora_rank=4, lora_lr=0.05, keep_best=False)
    log = train(model, processor, tmp_path / "out", tc, "cpu")
    assert log["trained_parameters_by_part"]["lora"] == 4 * sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if n.startswith("language_model.model.layers.") and isinstance(m, torch.nn.Linear)
    )
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sum(k.startswith("lora.") for k in stored) == 2 * N_LINEARS
    assert all(
        torch.equal(model.vision_tower.state_dict()[k.removeprefix("vision_tower.")], v)
        for k, v in original.items()
        if k.startswith("vision_tower.")
    )
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q], original[q])  # the merged update is in the weights
    loaded = load_realvlm(tmp_path / "out", parts=parts)
    torch.testing.assert_close(logits(loaded, processor), logits(model, processor), rtol=2e-3, atol=2e-3)

    model2, _ = tiny_standin()
    tc2 = tiny_train_config(steps=1, final_eval_n=0, lora_rank=2, init_from=str(tmp_path / "out"))
    train(model2, processor, tmp_path / "out2", tc2, "cpu")
    loaded2 = load_realvlm(tmp_path / "out2", parts=parts)
    assert loaded2.config.lora["rank"] == 6
    torch.testing.assert_close(logits(loaded2, processor), logits(model2, processor), rtol=2e-3, atol=2e-3)


def test_mix_weights_choose_turn_types():
    from casp.demo.train_realvlm import ChatEncoder, conversation_batch, parse_mix

    model, processor = tiny_standin()
    encoder = ChatEncoder(processor.tokenizer, processor.num_image_tokens)
    mix = dict(parse_mix("mc=1"))
    assert mix == {"mc": 1.0}
    scenes = [world.sample_scene(world.example_rng("train", 0, i)) for i in range(4)]
    batch = conversation_batch(encoder, scenes, np.random.default_rng(0), 1, 0, mix)
    rng = np.random.default_rng(0)  # the same stream: one turn per scene, drawn with the mix
    turns = [world.make_turn(scene, rng, mix) for scene in scenes]
    assert {qa.qtype for qa in turns} == {"mc"}
    for row, qa in zip(batch["input_ids"].tolist(), turns):
        ids = encoder.conversation([qa])[0]
        assert row[: len(ids)] == ids
    # mc_answer="text": the same questions, answered with the option's text (the world accepts both)
    text = conversation_batch(encoder, scenes, np.random.default_rng(0), 1, 0, mix, mc_answer="text")
    for row, labels, qa in zip(text["input_ids"].tolist(), text["labels"].tolist(), turns):
        ids, y = encoder.conversation([dataclasses.replace(qa, answer=qa.answers[1])])
        assert row[: len(ids)] == ids and labels[: len(y)] == y


def test_config_rejects_bad_settings():
    from casp.demo.train_realvlm import TrainConfig, parse_mix

    with pytest.raises(ValueError, match="LoRA targets"):
        TrainConfig(lora_targets=("self_attn.qkv",))
    with pytest.raises(ValueError, match="mix"):
        TrainConfig(mix=(("colour", 1.0),))
    with pytest.raises(ValueError, match="lora_rank"):
        TrainConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="mc_answer"):
        TrainConfig(mc_answer="word")
    with pytest.raises(ValueError, match="name=weight"):
        parse_mix("mc:2")


def test_preprocess_is_resize_then_normalize_as_before():
    """The processor's split into a CPU resize and a device normalization gives the same pixels as the
    single-pass preprocessing it replaced (PIL bicubic, /255, (x - mean) / std)."""
    _, processor = tiny_standin()
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (40, 46, 3), dtype=np.uint8) for _ in range(3)]
    ref = []
    for im in ims:
        img = Image.fromarray(im)
        img = img.crop((3, 0, 43, 40)).resize((32, 32), Image.BICUBIC)
        ref.append(np.asarray(img, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    assert torch.equal(processor.preprocess(ims), (x - mean) / std)


def test_feature_time_cap_keeps_a_prefix_of_the_scenes():
    from casp.demo.train_realvlm import train_scene_features

    model, processor = tiny_standin()
    scenes, cells = train_scene_features(model, processor, 7, seed=1, device="cpu", chunk=3, max_seconds=1e-9)
    all_scenes, all_cells = train_scene_features(model, processor, 7, seed=1, device="cpu", chunk=3)
    assert len(scenes) == 3 and cells.shape[0] == 3 and len(all_scenes) == 7
    assert scenes == all_scenes[:3] and torch.equal(cells, all_cells[:3])


def test_eval_writes_every_answer(tmp_path):
    import json

    from casp.demo.train_realvlm import evaluate_dir

    model, processor = tiny_standin()
    out = save_realvlm(model, processor, tmp_path / "m", include_parts=True)
    result = evaluate_dir(out, 6, "cpu", torch.float32, answers=tmp_path / "a.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows] == list(world.QUESTION_TYPES)
    assert np.mean([r["correct"] for r in rows]) == result["exact_match"]["all"]
