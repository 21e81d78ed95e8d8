"""LLaVA-NeXT (LlavaNextForConditionalGeneration): LLaVA with any-resolution image tiles."""

from casp.models.base import ModelAdapter

ADAPTER = ModelAdapter(
    family="llava_next",
    model_types=("llava_next",),
    model_class="LlavaNextForConditionalGeneration",
    language_model_path="model.language_model",
    vision_paths=(("vision_tower", "model.vision_tower"), ("projector", "model.multi_modal_projector")),
    image_placeholder="<image>",
)
