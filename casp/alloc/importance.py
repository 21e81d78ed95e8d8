"""End-to-end importance of each linear layer for the bit allocator (optional; DESIGN 3.4).

The allocator minimizes sum_l s_l * e_l(b) where e_l is a layer's relative output error. With a second-order
(diagonal Fisher) view of the loss, an output perturbation dy_l changes the loss by about
1/2 * sum g_l^2 dy_l^2, with g_l the gradient of the loss at that output. If quantization noise is spread
like the output itself, E[dy^2] = e_l * E[y^2], so

    s_l  proportional to  n_l * E[g_l^2] * E[y_l^2]      (n_l = elements of the output per token)

measured with one backward pass of the language-modelling loss per calibration sample. The scores are
normalized to mean 1, so ``s_l = 1`` for all layers is the plain (layer-local) allocation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def fisher_importance(model: nn.Module, batches: Iterable[dict], names: list[str], image_token_id: int | None = None,
                      device: str | torch.device = "cpu") -> dict[str, float]:
    """s_l for each named linear of ``model`` (full module names), from the causal-LM loss on ``batches``.

    The whole model runs on ``device`` (one sample at a time); image-token positions carry no loss.
    """
    g2 = dict.fromkeys(names, 0.0)
    y2 = dict.fromkeys(names, 0.0)
    count = dict.fromkeys(names, 0)
    width = {}

    def hook_for(name):
        def hook(module, args, output):
            width[name] = output.shape[-1]
            y2[name] += float(output.detach().float().pow(2).mean())
            count[name] += 1

            def grad_hook(grad):
                g2[name] += float(grad.detach().float().pow(2).mean())

            output.register_hook(grad_hook)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    # Gradients are needed at the activations only: make the token embeddings the leaf that requires grad.
    handles.append(model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.detach().requires_grad_(True)))
    was_training = model.training
    model.eval()
    original = next(model.parameters()).device
    model.to(device)
    try:
        with torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                labels = batch["input_ids"].clone()
                if image_token_id is not None:
                    labels[labels == image_token_id] = -100
                if "attention_mask" in batch:
                    labels[batch["attention_mask"] == 0] = -100
                loss = model(**batch, labels=labels).loss
                loss.backward()
                model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        model.to(original)
        model.train(was_training)
    raw = {n: width.get(n, 0) * (g2[n] / max(count[n], 1)) * (y2[n] / max(count[n], 1)) for n in names}
    mean = sum(raw.values()) / max(len(raw), 1)
    return {n: (v / mean if mean > 0 else 1.0) for n, v in raw.items()}
