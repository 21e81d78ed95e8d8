"""The demo VLM: builds from config, processor/encoder agree, forward + generate, save/load, checkpoint."""

import json

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from casp.demo import world
from casp.demo.model import DEMO_MODEL_DIR, DemoModelConfig, build_demo_model, load_demo_model, pixel_values
from casp.demo.train import IGNORE, TrainConfig, TurnEncoder, lr_factor, predict, score, train_batch

TINY = dict(
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate=64,
    text_hidden=32,
    text_layers=2,
    text_heads=4,
    text_kv_heads=2,
    text_intermediate=64,
    tokenizer_scenes=100,
)


@pytest.fixture(scope="module")
def tiny():
    return build_demo_model(**TINY)


def _messages(turns: list[world.QA]) -> list[dict]:
    msgs = []
    for t, qa in enumerate(turns):
        content = ([{"type": "image"}] if t == 0 else []) + [{"type": "text", "text": qa.question}]
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": qa.answer}]})
    return msgs


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DemoModelConfig(patch_size=10)
    with pytest.raises(ValueError, match="text_kv_heads"):
        DemoModelConfig(text_heads=4, text_kv_heads=3)


def test_builds_llava_with_gqa_and_is_deterministic(tiny):
    model, processor = tiny
    assert isinstance(model, LlavaForConditionalGeneration)
    text = model.config.text_config
    assert text.num_attention_heads == 4 and text.num_key_value_heads == 2
    assert model.config.image_token_index == processor.image_token_id == processor.tokenizer.image_token_id
    again, _ = build_demo_model(**TINY)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_default_size_budget():
    cfg = DemoModelConfig()
    assert cfg.num_image_tokens == 196 and cfg.text_layers >= 6
    with torch.device("meta"):
        model, _ = build_demo_model(cfg, tokenizer_scenes=50)
    n = sum(p.numel() for p in model.parameters())
    assert 2 * n < 25e6  # fp16 bytes


@pytest.mark.parametrize("patch", [8, 16])
def test_processor_expands_image_tokens_and_forward_matches(patch):
    model, processor = build_demo_model(**{**TINY, "patch_size": patch})
    ex = world.make_example("test", 0, 1, "count")
    text = processor.apply_chat_template(_messages([ex.qa])[:1], add_generation_prompt=True)
    assert text.startswith("USER: <image>\n") and text.endswith(" ASSISTANT:")
    inputs = processor(images=[Image.fromarray(ex.image)], text=[text], return_tensors="pt")
    n_tokens = (112 // patch) ** 2
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == n_tokens
    assert torch.allclose(inputs["pixel_values"], pixel_values([ex.image]), atol=1e-5)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.logits).all()


def test_turn_encoder_equals_processor_on_multi_turn_chats(tiny):
    _, processor = tiny
    enc = TurnEncoder(processor.tokenizer, 196)
    for i in range(20):
        rng = world.example_rng("test", 9, i)
        scene = world.sample_scene(rng)
        turns = [world.make_turn(scene, rng) for _ in range(1 + i % 3)]
        ids, labels = enc.conversation(turns)
        text = processor.apply_chat_template(_messages(turns))
        ref = processor(images=[Image.fromarray(world.render(scene))], text=[text])["input_ids"][0]
        assert list(ref) == ids
        answers = [t for t, y in zip(ids, labels) if y != IGNORE]
        expected = [tok for qa in turns for tok in enc.answer(qa.answer)]
        assert answers == expected and answers.count(processor.tokenizer.eos_token_id) == len(turns)


def test_train_batch_loss_and_generate(tiny):
    model, processor = tiny
    enc = TurnEncoder(processor.tokenizer, 196)
    b = train_batch(enc, seed=0, start=0, batch=3, max_turns=2, cfg=world.WorldConfig())
    assert b["images"].shape == (3, 112, 112, 3) and b["input_ids"].shape == b["labels"].shape
    out = model(
        input_ids=torch.as_tensor(b["input_ids"]),
        attention_mask=torch.as_tensor(b["attention_mask"]),
        pixel_values=pixel_values(b["images"]),
        labels=torch.as_tensor(b["labels"]),
    )
    assert torch.isfinite(out.loss) and out.loss.item() > 1.0  # untrained: near log(vocab)
    # training drops the mask: right padding under causal attention never reaches a real token
    unmasked = model(
        input_ids=torch.as_tensor(b["input_ids"]), pixel_values=pixel_values(b["images"]),
        labels=torch.as_tensor(b["labels"]),
    )  # fmt: skip
    assert torch.allclose(out.loss, unmasked.loss, atol=1e-5)
    examples = [world.make_example("test", 0, i, world.balanced_type(i)) for i in range(3)]
    preds = predict(model, processor, examples, max_new_tokens=3)
    assert len(preds) == 3 and all(isinstance(p, str) for p in preds)
    assert set(score(examples, preds)) >= {"all"}


def test_lr_schedule_warms_up_and_anneals():
    tc = TrainConfig(warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0.0, 0, tc) == pytest.approx(0.1)
    assert lr_factor(0.0, 100, tc) == pytest.approx(1.0)
    assert lr_factor(1.0, 100, tc) == pytest.approx(0.1)
    assert lr_factor(0.3, 100, tc) > lr_factor(0.6, 100, tc)


def test_save_load_round_trip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc2 = load_demo_model(tmp_path)
    ex = world.make_example("test", 0, 2, "shape")
    text = proc2.apply_chat_template(_messages([ex.qa])[:1], add_generation_prompt=True)
    inputs = proc2(images=[Image.fromarray(ex.image)], text=[text], return_tensors="pt")
    with torch.no_grad():
        a, b = model(**inputs).logits, loaded(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="casp.demo.train"):
        load_demo_model(tmp_path / "missing")


def _logged_accuracy() -> float:
    """Held-out exact match that the committed checkpoint's training log records (0 if absent)."""
    log = DEMO_MODEL_DIR / "training_log.json"
    return json.loads(log.read_text())["final_eval"]["exact_match"]["all"] if log.is_file() else 0.0


def _score_committed(n: int = 30) -> dict[str, float]:
    model, processor = load_demo_model()
    examples = [world.make_example("test", 123, i, world.balanced_type(i)) for i in range(n)]
    return score(examples, predict(model, processor, examples, batch=n))


needs_checkpoint = pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="no committed checkpoint"
)


@needs_checkpoint
def test_committed_checkpoint_is_small_safe_and_matches_its_log():
    files = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".pth")) for name in files)
    assert sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir()) < 25e6
    assert json.loads((DEMO_MODEL_DIR / "config.json").read_text())["model_type"] == "llava"
    em = _score_committed()
    # 30 fresh questions: within sampling noise of what the log recorded on 600, and far above chance
    assert em["all"] >= min(_logged_accuracy() - 0.2, 0.8) and em["all"] >= 0.35, em


@needs_checkpoint
def test_committed_checkpoint_answers_test_questions():
    em = _score_committed()
    assert em["all"] >= 0.8, em
