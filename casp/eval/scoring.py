"""Log-likelihood scoring shared by the lm-eval and lmms-eval bridges.

* continuation log-likelihood: log p(c_1..c_m | prompt) = sum_j log p(c_j | prompt, c_<j), and whether
  every c_j is the argmax (the continuation is what greedy decoding would produce);
* rolling log-likelihood of a whole text: the sliding-window sum of casp.eval.ppl, as a total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from casp.eval.ppl import perplexity_of_ids


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.no_grad()
def continuation_logprob(
    model: nn.Module,
    prompt_inputs: Mapping[str, Any],
    continuation_ids: Sequence[int],
) -> tuple[float, bool]:
    """(log p(continuation | prompt), is_greedy) for one unpadded prompt.

    ``prompt_inputs`` are the model inputs of the prompt alone, batch 1 (input_ids [1, T], and
    attention_mask / pixel_values / image_sizes... as the processor made them). The continuation ids
    are appended to input_ids (ones to the attention mask, zeros to other per-token inputs such as
    token type ids); image inputs pass through unchanged.
    """
    device = _model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    cont = torch.as_tensor(list(continuation_ids), dtype=torch.long, device=device)[None]  # [1, m]
    m = cont.shape[1]
    if m == 0:
        return 0.0, True
    inputs = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in prompt_inputs.items()
    }
    prompt_shape = inputs["input_ids"].shape  # [1, T]
    for key, value in inputs.items():
        # Every per-token input grows with the continuation: ids, mask (ones), token types such as
        # Qwen2-VL's mm_token_type_ids (zeros: the continuation is text).
        if isinstance(value, torch.Tensor) and value.shape == prompt_shape and not value.is_floating_point():
            fill = cont if key == "input_ids" else torch.full_like(cont, int(key == "attention_mask"))
            inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)  # [1, T + m]
    logits = _logits(model(**inputs)).float()  # [1, T + m, V]
    pred = logits[0, -m - 1 : -1]  # position T-1+j predicts c_j; [m, V]
    logprobs = torch.log_softmax(pred, dim=-1)
    total = logprobs.gather(-1, cont[0, :, None]).sum().item()
    greedy = bool((pred.argmax(-1) == cont[0]).all())
    return total, greedy


def rolling_logprob(model: nn.Module, token_ids: Sequence[int], prefix_id: int, max_length: int) -> float:
    """Total log-likelihood of every token of ``token_ids``, the first predicted from ``prefix_id``
    (BOS / end-of-text), with sliding windows of ``max_length`` tokens (stride max_length // 2)."""
    ids = torch.tensor([prefix_id, *token_ids], dtype=torch.long)
    if len(token_ids) == 0:
        return 0.0
    out = perplexity_of_ids(model, ids, max_length=max_length, stride=max(1, max_length // 2), progress=False)
    return -out["nll"] * out["n_tokens"]


def cut_at_stop(text: str, until: Sequence[str] | str | None) -> str:
    """``text`` up to the earliest occurrence of any stop string (lm-eval's "until")."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def parse_arg_string(arg_string: str) -> dict[str, Any]:
    """ "pretrained=dir,batch_size=4" -> {"pretrained": "dir", "batch_size": 4} (ints, floats, bools parsed)."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in arg_string.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"model argument {item!r} is not key=value")
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
        elif value.lstrip("-").isdigit():
            out[key] = int(value)
        else:
            out[key] = value
    return out
