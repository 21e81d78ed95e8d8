"""Text generation with any supported model (original or casp-compressed), optionally on a quantized KV cache."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from casp.errors import CaspError
from casp.models import load_model


def open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise CaspError(f"image {str(path)!r} not found")
    # PIL reports unreadable files only by raising; translate at this boundary.
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError:
        raise CaspError(f"{str(path)!r} is not a readable image (PNG/JPEG/...)") from None


@torch.no_grad()
def generate(model, processor, adapter, prompts: list[str], images: list | None = None, max_new_tokens: int = 32,
             past_key_values=None, cuda_graph: bool = True) -> list[str]:
    """Greedy continuation of each prompt (with its image, for VLMs); returns only the new text.

    On a GPU with the fp16 cache the prompts decode through casp.decode (a static cache and one CUDA graph
    replayed per token) where the adapter allows it and ``cuda_graph`` is set; otherwise transformers'
    ``generate`` runs the steps eagerly.
    """
    from casp.decode import eos_ids, graph_decode_applies, static_greedy_generate

    if images is not None and not adapter.is_multimodal:
        raise CaspError(f"this is a text-only {adapter.family} model; drop --image")
    inputs = adapter.build_inputs(processor, prompts, images).to(next(model.parameters()).device)
    tokenizer = getattr(processor, "tokenizer", processor)
    if graph_decode_applies(model, adapter, past_key_values, cuda_graph):
        new = static_greedy_generate(model, dict(inputs), max_new_tokens, eos_ids(model),
                                     pad_token_id=tokenizer.pad_token_id)
    else:
        kwargs = {"past_key_values": past_key_values} if past_key_values is not None else {}
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def generate_from_dir(model_dir, prompt: str, image: str | None = None, max_new_tokens: int = 32,
                      device: str = "cpu", kv: str = "fp16", kv_window: int = 128, cuda_graph: bool = True,
                      dtype: torch.dtype | None = None, batch1_kernel: str = "auto") -> str:
    """``casp generate``: load ``model_dir`` (in ``dtype``; default float16 on a GPU, where the packed-weight
    kernels run, float32 on the CPU) and continue ``prompt``; ``batch1_kernel``: see
    casp.kernels.set_batch1_kernel."""
    from casp.kernels import set_batch1_kernel, triton_available
    from casp.kv.attention import enable_fused_kv_attention
    from casp.kv.methods import make_cache

    if kv_window < 1:
        raise CaspError(f"--kv-window must be at least 1 token, got {kv_window}")
    if max_new_tokens < 1:
        raise CaspError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    model, processor, adapter = load_model(model_dir, dtype=dtype, device=device)
    set_batch1_kernel(model, batch1_kernel)
    images = [open_image(image)] if image else None
    if kv == "akvq" and next(model.parameters()).is_cuda and triton_available():
        enable_fused_kv_attention(model)  # decode steps attend over the packed cache in one Triton kernel
    cache = make_cache(kv, model, adapter, model_dir=model_dir, residual=kv_window)  # None for fp16
    return generate(model, processor, adapter, [prompt], images, max_new_tokens, cache, cuda_graph)[0]
