"""Tiny random-weight models of every supported family, built from configs (no downloads).

``make_tiny(family, directory)`` saves a model plus a locally built tokenizer and image processor, so
that ``AutoProcessor.from_pretrained`` / ``casp`` commands work on a real model directory.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("llama", "llava", "llava_next", "qwen2_vl", "idefics3")

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
            "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
SPECIALS += [f"<row_{i}_col_{j}>" for i in range(1, 4) for j in range(1, 4)]
WORDS = ("the a an is are what which where how many color shape picture image photo describe there in on of "
         "left right above below red green blue yellow white black circle square triangle cat dog yes no "
         "one two three four five USER ASSISTANT User Assistant : ? . , and with background small large").split()

LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )


def _ids(tok) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def build(family: str, num_layers: int = 2, hidden: int = 32):
    """(model, processor) of a tiny random model of ``family`` (text hidden size ``hidden``, 4 heads)."""
    import transformers as tf

    torch.manual_seed(0)
    tok = make_tokenizer()
    text = dict(TEXT, num_hidden_layers=num_layers, hidden_size=hidden, intermediate_size=2 * hidden, **_ids(tok))
    head_dim = hidden // 4
    mrope = [head_dim // 8, head_dim // 8, head_dim // 2 - 2 * (head_dim // 8)]
    image_id = tok.convert_tokens_to_ids("<image>")
    clip = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, image_size=32, patch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "llama":
            return tf.LlamaForCausalLM(tf.LlamaConfig(**text)).eval(), tok
        if family == "llava":
            cfg = tf.LlavaConfig(vision_config=clip, text_config=tf.LlamaConfig(**text), image_token_id=image_id,
                                 vision_feature_layer=-1)
            ip = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
            proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                                     vision_feature_select_strategy="default", image_token="<image>",
                                     chat_template=LLAVA_CHAT_TEMPLATE)
            return tf.LlavaForConditionalGeneration(cfg).eval(), proc
        if family == "llava_next":
            pins = [[32, 32], [32, 64], [64, 32]]
            cfg = tf.LlavaNextConfig(vision_config=clip, text_config=tf.LlamaConfig(**text), image_token_id=image_id,
                                     image_grid_pinpoints=pins, vision_feature_layer=-1)
            ip = tf.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                            image_grid_pinpoints=pins)
            proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                                         num_additional_image_tokens=1, vision_feature_select_strategy="default",
                                         image_token="<image>")
            return tf.LlavaNextForConditionalGeneration(cfg).eval(), proc
        if family == "qwen2_vl":
            from casp.models.qwen2_vl import Qwen2VLInputBuilder

            cfg = tf.Qwen2VLConfig(
                text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": mrope}),
                vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                                   spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
                image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), video_token_id=0,
                **{k: v for k, v in _ids(tok).items() if k != "vocab_size"},
            )
            ip = tf.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56 * 4)
            return tf.Qwen2VLForConditionalGeneration(cfg).eval(), Qwen2VLInputBuilder(tok, ip)
        if family == "idefics3":
            cfg = tf.Idefics3Config(
                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8),
                text_config=dict(text, model_type="llama"), image_token_id=image_id, scale_factor=2,
            )
            ip = tf.Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                           do_image_splitting=False)
            tok.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
            proc = tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4)
            return tf.Idefics3ForConditionalGeneration(cfg).eval(), proc
    raise ValueError(f"unknown family {family}")


def make_tiny(family: str, directory: str | Path, num_layers: int = 2, hidden: int = 32) -> Path:
    """Save a tiny random model of ``family`` (with its processor) into ``directory``; return the path."""
    directory = Path(directory)
    model, processor = build(family, num_layers=num_layers, hidden=hidden)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def make_image(seed: int = 0, size: int = 40) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def write_calibration(directory: str | Path, n: int = 4, with_images: bool = True) -> Path:
    """A LLaVA-conversation JSONL with an image folder (or a plain text file) for calibration."""
    import json

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    questions = ["what color is the circle ?", "how many shapes are there ?", "describe the picture .",
                 "is the square left of the circle ?"]
    if not with_images:
        path = directory / "calib.txt"
        path.write_text("\n\n".join(f"the picture shows a red circle and {q}" for q in questions * n))
        return path
    rows = []
    for i in range(n):
        make_image(i).save(directory / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + questions[i % len(questions)]},
            {"from": "gpt", "value": "a red circle on the left"}]})
    path = directory / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
