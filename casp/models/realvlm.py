"""The real-parts VLM (casp.realmodels.realvlm): EfficientNet-Lite0 trunk, MLP projector, SmolLM2 (LLaMA).

Its decoder blocks are the LlamaForCausalLM's layers, so the LLaMA block structure (q,k,v | o | gate,up |
down) applies unchanged. Importing this module registers the model with transformers' AutoConfig and
AutoModelForImageTextToText, which is how casp's compressed-checkpoint loader rebuilds it.
"""

import dataclasses

import torch

from casp.models.base import ModelAdapter
from casp.realmodels import realvlm as _realvlm  # registers model_type "casp_realvlm"


@dataclasses.dataclass(frozen=True)
class RealVLMAdapter(ModelAdapter):
    def load_processor(self, path):
        return _realvlm.RealVLMProcessor.from_pretrained(path)

    def load_model(self, path, dtype: torch.dtype = torch.float32, **kwargs):
        # Frozen parts absent from a projector-only directory come from the local cache (fetch_parts).
        return _realvlm.load_realvlm(path, dtype=dtype, attn_implementation=kwargs.get("attn_implementation"))


ADAPTER = RealVLMAdapter(
    family="realvlm",
    model_types=(_realvlm.MODEL_TYPE,),
    model_class="AutoModelForImageTextToText",
    language_model_path="language_model.model",
    vision_paths=(("vision_tower", "vision_tower"), ("projector", "projector")),
    image_placeholder=_realvlm.IMAGE_TOKEN,
)
