"""What casp needs to know about a model family, as data plus a few small methods.

An adapter answers: where are the language model's decoder blocks, which linears are in a block and in
what order they may be compressed, where the vision tower and projector are, how to turn
(image, text) into model inputs with the model's own processor, and which positions are image tokens.
Nothing outside ``casp/models`` knows a module name.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

import torch
from torch import nn

# Order in which the linears of a LLaMA-style block may be compressed (true-sequential GPTQ):
# q,k,v read the same input; o reads attention output; gate,up read the same input; down reads the MLP.
LLAMA_LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    family: str
    model_types: tuple[str, ...]  # config.json "model_type" values this adapter handles
    model_class: str  # transformers class that loads the checkpoint
    language_model_path: str  # dotted path of the module that owns ``.layers``
    vision_paths: tuple[tuple[str, str], ...] = ()  # (role, dotted path): vision tower, projector
    image_placeholder: str | None = None  # text the processor expands into image tokens
    linear_groups: tuple[tuple[str, ...], ...] = LLAMA_LINEAR_GROUPS
    # Whether a decode step is a fixed-shape function of (token, position, static cache), so casp.decode can
    # replay it from a CUDA graph; False where the model derives positions on the host (Qwen2-VL's M-RoPE).
    graph_decode: bool = True

    # ---- structure -------------------------------------------------------------------------------
    @property
    def is_multimodal(self) -> bool:
        return bool(self.vision_paths)

    @property
    def linear_names(self) -> list[str]:
        return [name for group in self.linear_groups for name in group]

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.language_model_path)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def text_config(self, model: nn.Module):
        return model.config.get_text_config()

    def attention(self, block: nn.Module) -> nn.Module:
        return block.self_attn

    def vision_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {role: model.get_submodule(path) for role, path in self.vision_paths}

    def vision_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every nn.Linear of the vision tower and projector, by full module name."""
        found = {}
        for _, path in self.vision_paths:
            for name, module in model.get_submodule(path).named_modules():
                if isinstance(module, nn.Linear):
                    found[f"{path}.{name}" if name else path] = module
        return found

    def block_prefix(self, index: int) -> str:
        return f"{self.language_model_path}.layers.{index}"

    # ---- inputs ----------------------------------------------------------------------------------
    def image_token_id(self, config) -> int | None:
        for key in ("image_token_id", "image_token_index"):
            value = getattr(config, key, None)
            if value is not None:
                return int(value)
        return None

    def image_token_mask(self, model_or_config, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool [B, T]: True where the position holds an image token."""
        config = getattr(model_or_config, "config", model_or_config)
        token = self.image_token_id(config)
        if token is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == token

    def format_prompt(self, processor, prompt: str, has_image: bool, answer: str | None = None) -> str:
        """The prompt as the model was trained to see it (chat template when the processor has one)."""
        content = []
        if has_image:
            content.append({"type": "image"})
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(
                messages, add_generation_prompt=answer is None, tokenize=False
            )
        text = f"{self.image_placeholder}\n{prompt}" if has_image else prompt
        return text if answer is None else f"{text} {answer}"

    def build_inputs(
        self,
        processor,
        prompts: Sequence[str],
        images: Sequence | None = None,
        answers: Sequence[str] | None = None,
        max_length: int | None = None,
    ):
        """Model inputs for a batch of (image, prompt[, answer]) with the model's own processor.

        Batches are left-padded so that generation continues every row from its last token.
        """
        has_images = images is not None and any(img is not None for img in images)
        texts = [
            self.format_prompt(
                processor,
                p,
                has_image=has_images and images[i] is not None,
                answer=None if answers is None else answers[i],
            )
            for i, p in enumerate(prompts)
        ]
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"
        if not has_images:
            return tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
            )
        return self._process_images(processor, texts, list(images))

    def load_processor(self, path):
        """The model's own processor (VLMs) or tokenizer (language models), from a local directory."""
        from transformers import AutoProcessor, AutoTokenizer

        return AutoProcessor.from_pretrained(path) if self.is_multimodal else AutoTokenizer.from_pretrained(path)

    def load_model(self, path, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
        import transformers

        cls = getattr(transformers, self.model_class)
        return cls.from_pretrained(path, dtype=dtype, **kwargs)

    def _process_images(self, processor, texts: list[str], images: list):
        return processor(images=images, text=texts, return_tensors="pt", padding=True)


def cache_argument(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward takes the KV cache: ``cache`` from transformers 5.25 on
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
