"""LLaMA-family language models (LlamaForCausalLM): text only."""

from casp.models.base import ModelAdapter

ADAPTER = ModelAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    model_class="AutoModelForCausalLM",
    language_model_path="model",
)
