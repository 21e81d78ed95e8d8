"""LLaVA-1.5 (LlavaForConditionalGeneration): CLIP vision tower, MLP projector, LLaMA language model."""

from casp.models.base import ModelAdapter

ADAPTER = ModelAdapter(
    family="llava",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    language_model_path="model.language_model",
    vision_paths=(("vision_tower", "model.vision_tower"), ("projector", "model.multi_modal_projector")),
    image_placeholder="<image>",
)
