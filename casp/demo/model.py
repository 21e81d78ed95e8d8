"""The demo VLM: a real transformers ``LlavaForConditionalGeneration`` sized to train in minutes.

CLIP ViT vision tower (112x112 images, patch 8 -> 14x14 = 196 image tokens; the CLS token is
dropped by ``vision_feature_select_strategy="default"``), LLaVA's two-layer MLP projector, and a
LLaMA language model with grouped-query attention (4 query heads, 2 KV heads, head_dim 64).
The tokenizer is a byte-level BPE trained with ``tokenizers`` on the synthetic world's text, so
any string encodes and decodes exactly. The processor is a stock ``LlavaProcessor`` whose
``CLIPImageProcessor`` is built locally; its chat template renders LLaVA-1.5 style prompts:

    USER: <image>\\n{question} ASSISTANT: {answer}</s>

Nothing is downloaded: everything is built from configs and saved with ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from casp.demo import world

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo-model"

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE)  # ids 0, 1, 2, 3

# CLIP's normalization constants (the processor stores them; training normalizes with the same).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# LLaVA-1.5 style; a message's content may be a string or a list of {"type": "image"|"text"} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- for p in parts if p['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- p['text'] + ' ' -}}{%- endfor -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' -}}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- p['text'] + eos_token -}}{%- endfor -%}"
    "{%- else -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- p['text'] + ' ' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


@dataclasses.dataclass(frozen=True)
class DemoModelConfig:
    """Sizes of the demo VLM. The defaults give about 7M parameters (about 14 MB in fp16)."""

    image_size: int = 112
    patch_size: int = 8
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 768
    text_hidden: int = 256
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 768
    vocab_size: int = 512
    max_positions: int = 512
    tokenizer_scenes: int = 2000  # scenes of world text the BPE is trained on
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.vision_hidden % self.vision_heads:
            raise ValueError("vision_hidden must be a multiple of vision_heads")
        if self.text_hidden % self.text_heads or self.text_heads % self.text_kv_heads:
            raise ValueError("text_hidden must be a multiple of text_heads, text_heads of text_kv_heads")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {self.vocab_size}")
        if self.max_positions < self.num_image_tokens + 64:
            raise ValueError(f"max_positions must leave room for {self.num_image_tokens} image tokens + text")

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def tokenizer_corpus(n_scenes: int) -> list[str]:
    """Deterministic text the tokenizer is trained on: prompts, questions, answers, captions."""
    lines = ["USER: ASSISTANT:", *world.CAPTION_PROMPTS]
    for i in range(n_scenes):
        rng = world.example_rng("train", 10_000_019, i)  # a stream no training example uses
        scene = world.sample_scene(rng)
        lines.extend(world.captions(scene))
        lines.extend(world.sentences(scene))
        for qtype in world.QUESTION_TYPES:
            qa = world.make_question(scene, rng, qtype)
            lines.append(f"USER: {qa.question} ASSISTANT: {qa.answer}")
    return lines


def build_tokenizer(cfg: DemoModelConfig = DemoModelConfig()) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the world's text; adds ``<s>`` in front of every encoded text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(cfg.tokenizer_scenes), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",  # batched generation pads on the left
        model_max_length=cfg.max_positions,
    )


def build_processor(cfg: DemoModelConfig = DemoModelConfig()) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(cfg),
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_config(cfg: DemoModelConfig, vocab_size: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        head_dim=cfg.text_hidden // cfg.text_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=SPECIAL_TOKENS.index(IMAGE),
        image_seq_length=cfg.num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # trained from scratch: the last layer is as good as any, and none is idle
        projector_hidden_act="gelu",
    )


def build_demo_model(
    cfg: DemoModelConfig | None = None, **overrides
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialized demo VLM and its processor (deterministic given ``cfg.seed``).

    ``overrides`` replace fields of ``cfg`` (or of the default config), e.g.
    ``build_demo_model(text_layers=2, text_hidden=64)`` for a tiny test model.
    """
    cfg = dataclasses.replace(cfg or DemoModelConfig(), **overrides)
    processor = build_processor(cfg)
    config = build_config(cfg, vocab_size=len(processor.tokenizer))
    config.text_config.pad_token_id = processor.tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval(), processor


def load_demo_model(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a saved demo model (default: the committed checkpoint) and its processor, offline."""
    from transformers import AutoProcessor

    path = Path(path) if path is not None else DEMO_MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no demo model at {path}: train one with `python -m casp.demo.train --out DIR`")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def pixel_values(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """Normalize uint8 RGB images [B, H, W, 3] exactly as the processor does -> float [B, 3, H, W].

    Images are already at the model's size, so the processor's resize and crop are identities.
    """
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images) if isinstance(images, list) else images))
    return normalize_pixels(x)


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] (any device) -> float32 [B, 3, H, W] normalized with CLIP mean/std."""
    mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
    return (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
