"""Qwen2-VL (Qwen2VLForConditionalGeneration): dynamic-resolution ViT, M-RoPE language model.

transformers' Qwen2VLProcessor needs a video processor, which needs torchvision. Where torchvision is
missing, casp builds the same inputs from the image processor and the tokenizer with the model's own
rule: one <|image_pad|> per merged patch (grid_t * grid_h * grid_w / merge_size^2).
"""

import dataclasses
import importlib.util
import inspect

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, BatchFeature

from casp.models.base import ModelAdapter

IMAGE_PAD = "<|image_pad|>"
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclasses.dataclass
class Qwen2VLInputBuilder:
    """Processor stand-in: tokenizer + image processor, expanding image pads like Qwen2VLProcessor."""

    tokenizer: object
    image_processor: object
    chat_template: str | None = None

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
        data = {}
        if images is not None:
            pixels = self.image_processor(images=images, return_tensors="pt")
            merge = self.image_processor.merge_size**2
            expanded = []
            counts = iter(int(g.prod()) // merge for g in pixels["image_grid_thw"])
            for t in text:
                parts = t.split(IMAGE_PAD)
                out = parts[0]
                for part in parts[1:]:
                    out += IMAGE_PAD * next(counts) + part
                expanded.append(out)
            text = expanded
            data.update(pixels)
        tokens = self.tokenizer(text, return_tensors=return_tensors, padding=padding)
        data.update(tokens)
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def save_pretrained(self, path):
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


@dataclasses.dataclass(frozen=True)
class Qwen2VLAdapter(ModelAdapter):
    def format_prompt(self, processor, prompt, has_image, answer=None):
        if getattr(processor, "chat_template", None):
            return super().format_prompt(processor, prompt, has_image, answer)
        text = f"{VISION_BLOCK}{prompt}" if has_image else prompt
        return text if answer is None else f"{text} {answer}"

    def _process_images(self, processor, texts, images):
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        if "mm_token_type_ids" not in inputs and _forward_accepts("mm_token_type_ids"):
            # transformers >= 5.2x computes M-RoPE positions from these (1 = image token).
            image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_id).long()
        return inputs

    def load_processor(self, path):
        if importlib.util.find_spec("torchvision") is not None:
            return AutoProcessor.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return Qwen2VLInputBuilder(tokenizer, AutoImageProcessor.from_pretrained(path))


def _forward_accepts(name: str) -> bool:
    from transformers import Qwen2VLForConditionalGeneration

    return name in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters


ADAPTER = Qwen2VLAdapter(
    family="qwen2_vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    language_model_path="model.language_model",
    vision_paths=(("vision_tower", "model.visual"),),
    image_placeholder=VISION_BLOCK,
    graph_decode=False,  # decode positions are cache position + rope deltas, chosen by host-side checks
)

__all__ = ["ADAPTER", "Qwen2VLInputBuilder"]
