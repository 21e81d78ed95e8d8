"""Idefics3 and SmolVLM (Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration)."""

import dataclasses

from casp.models.base import ModelAdapter


@dataclasses.dataclass(frozen=True)
class Idefics3Adapter(ModelAdapter):
    def _process_images(self, processor, texts, images):
        # The Idefics3 processor takes one list of images per prompt.
        return processor(images=[[img] for img in images], text=texts, return_tensors="pt", padding=True)


ADAPTER = Idefics3Adapter(
    family="idefics3",
    model_types=("idefics3", "smolvlm"),
    model_class="AutoModelForImageTextToText",
    language_model_path="model.text_model",
    vision_paths=(("vision_tower", "model.vision_model"), ("projector", "model.connector")),
    image_placeholder="<image>",
)
