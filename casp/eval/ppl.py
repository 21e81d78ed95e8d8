"""Perplexity of a causal language model on a text, with a sliding window.

The token stream x_0..x_{N-1} is scored in chunks of ``stride`` new tokens. The chunk of targets
[start, stop) is predicted from the window x[max(0, stop - max_length) : stop], so every target
after the first window sees at least ``max_length - stride`` tokens of context, and every token
x_1..x_{N-1} is scored exactly once (x_0 has no context):

    ppl = exp( -(1 / (N - 1)) * sum_{t=1}^{N-1} log p(x_t | x_{max(0, stop_t - max_length)} .. x_{t-1}) )

Works for any model whose forward takes ``input_ids`` and returns logits [B, T, V] (a plain tensor,
a tuple whose first item is the logits, or an output with ``.logits``): a causal LM, or a VLM called
without images (its language model then runs alone).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from casp.eval.errors import EvalError

DEFAULT_MAX_LENGTH = 2048


def get_tokenizer(processor: Any) -> Any:
    """The text tokenizer of a processor (or the tokenizer itself)."""
    return getattr(processor, "tokenizer", None) or processor


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits


def model_max_length(model: nn.Module) -> int:
    """max_position_embeddings of the (language) model config, capped at DEFAULT_MAX_LENGTH."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    n = getattr(text_config, "max_position_embeddings", None)
    return min(int(n), DEFAULT_MAX_LENGTH) if n else DEFAULT_MAX_LENGTH


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def perplexity_of_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_length: int | None = None,
    stride: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Sliding-window perplexity of one token stream ``input_ids`` [N] (see the module docstring).

    Returns {"ppl", "nll" (mean per token, nats), "n_tokens" (scored), "max_length", "stride"}.
    """
    ids = input_ids.reshape(-1)
    n = ids.numel()
    max_length = max_length or model_max_length(model)
    stride = stride or max(1, max_length // 2)
    if max_length < 2:
        raise EvalError(f"perplexity: max_length must be >= 2, got {max_length}")
    if not 1 <= stride < max_length:
        raise EvalError(f"perplexity: stride must be in [1, max_length); got stride={stride}, max_length={max_length}")
    if n < 2:
        raise EvalError(f"perplexity: the text has {n} token(s); at least 2 are needed")
    device = _device(model)
    total_nll = 0.0
    starts = range(1, n, stride)
    for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        stop = min(start + stride, n)
        begin = max(0, stop - max_length)  # begin <= start - 1 because stride < max_length
        window = ids[begin:stop].unsqueeze(0).to(device)  # [1, W]
        logits = _logits(model(input_ids=window)).float()  # [1, W, V]
        # logits at window position p predict token begin + p + 1; targets are start..stop-1.
        pred = logits[0, start - 1 - begin : stop - 1 - begin]  # [stop - start, V]
        targets = window[0, start - begin : stop - begin]
        total_nll += torch.nn.functional.cross_entropy(pred, targets, reduction="sum").item()
    mean_nll = total_nll / (n - 1)
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "n_tokens": n - 1,
        "max_length": max_length,
        "stride": stride,
    }


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    max_length: int | None = None,
    stride: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Sliding-window perplexity of ``text`` (tokenized once, with the tokenizer's special tokens)."""
    if not text.strip():
        raise EvalError("perplexity: the text is empty")
    ids = get_tokenizer(tokenizer)(text, return_tensors="pt")["input_ids"][0]
    return perplexity_of_ids(model, ids, max_length=max_length, stride=stride, progress=progress)


def run_ppl(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    max_length: int | None = None,
    stride: int | None = None,
    limit_chars: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a UTF-8 text file: the task runner behind ``--task ppl:FILE``."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: text file not found")
    text = path.read_text(encoding="utf-8")
    if limit_chars is not None:
        text = text[:limit_chars]
    if not text.strip():
        raise EvalError(f"{path}: the text file is empty")
    t0 = time.perf_counter()
    out = perplexity(model, tokenizer, text, max_length=max_length, stride=stride, progress=progress)
    return {"task": "ppl", "file": str(path), **out, "seconds": time.perf_counter() - t0}
