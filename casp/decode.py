"""Greedy decoding on a static KV cache, each step replayed from one captured CUDA graph.

At batch 1 a decode step of a compressed model is a few hundred small kernels. Launched one by one from
Python (transformers' ``generate``), their launch overhead exceeds their run time: on the H100 the 2-bit
7B-shaped model ran 13.8 tokens/s eagerly against fp16's 33.0, and 228 tokens/s from a graph
(benchmarks/results/decode_7b_h100.txt). A step has fixed shapes, and so can be captured once and
replayed, when

* the KV cache is transformers' ``StaticCache`` (preallocated for prompt + new tokens),
* the attention mask is a preallocated 4D additive mask over every cache position, which transformers
  uses as given, and which the step itself opens at the position it writes,
* the token, its position and the output index live in device tensors that the step advances in place.

The same step runs eagerly on the CPU (and where ``cuda_graph=False``), which is how the tests check it
against ``generate``. Families whose decode step needs host-side decisions (Qwen2-VL's M-RoPE positions)
say so in their adapter (``ModelAdapter.graph_decode``) and keep ``generate``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import nn

from casp.errors import CaspError


def eos_ids(model: nn.Module) -> tuple[int, ...]:
    """The end-of-sequence token ids of the model's generation config (none -> empty)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


@torch.no_grad()
def static_greedy_generate(
    model: nn.Module,
    inputs: dict,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] = (),
    cuda_graph: bool = True,
    check_every: int = 16,
    stats: dict | None = None,
) -> torch.Tensor:
    """New token ids [1, n <= max_new_tokens] of a greedy continuation of ``inputs`` (one prompt).

    ``inputs`` are the model's own inputs (input_ids, attention_mask, pixel_values, ...). The prompt is
    prefilled eagerly; the decode steps replay one CUDA graph when ``cuda_graph`` and the model is on a
    GPU, else run eagerly. Generation stops after an end-of-sequence token (checked every ``check_every``
    steps, so a graph runs without host synchronization in between) and the tokens after it are dropped.
    With ``stats`` (a dict), the device is synchronized around each phase and the dict receives
    ``prefill_s``, ``setup_s`` (the eager first step and the capture), ``decode_s`` and ``decode_steps``.
    """
    from transformers import StaticCache

    ids = inputs["input_ids"]
    batch, prompt_len = ids.shape
    if batch != 1:
        raise CaspError(f"static decoding takes one prompt at a time, got a batch of {batch}")
    if max_new_tokens < 1:
        raise CaspError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = ids.device
    dtype = model.dtype
    total = prompt_len + max_new_tokens
    clock = _Clock(device, stats)
    cache = StaticCache(config=model.config, max_cache_len=total)

    logits = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1,
                   cache_position=torch.arange(prompt_len, device=device)).logits
    out = torch.zeros(1, max_new_tokens, dtype=torch.long, device=device)
    out[:, 0] = logits[:, -1].argmax(-1)
    clock.lap("prefill_s")

    # Static state of the step: the token to feed, its cache position, the output slot, the mask.
    token = out[:, :1].clone()
    position = torch.full((1,), prompt_len, dtype=torch.long, device=device)
    position_ids = position.view(1, 1)  # a view: advancing the position advances it
    slot = torch.ones(1, dtype=torch.long, device=device)
    mask = torch.full((1, 1, 1, total), torch.finfo(dtype).min, dtype=dtype, device=device)
    prompt_mask = inputs.get("attention_mask")
    visible = prompt_mask[0].bool() if prompt_mask is not None else torch.ones(prompt_len, dtype=torch.bool)
    mask[0, 0, 0, :prompt_len].masked_fill_(visible.to(device), 0.0)

    def step() -> None:
        mask.index_fill_(-1, position, 0.0)  # the new token sees itself
        logits = model(input_ids=token, attention_mask=mask, position_ids=position_ids, cache_position=position,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.index_copy_(1, slot, nxt)
        token.copy_(nxt)
        position.add_(1)
        slot.add_(1)

    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    steps = max_new_tokens - 1
    done = 0
    run = step
    if cuda_graph and device.type == "cuda" and steps >= 2:
        # The first step runs eagerly on a side stream (Triton compiles, workspaces are allocated), then
        # the second is captured; capturing records kernels without running them.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        done = 1
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    clock.lap("setup_s")
    n = done + 1  # tokens in ``out`` so far
    while n < max_new_tokens:
        if eos.numel() and bool(torch.isin(out[0, :n], eos).any()):
            break
        for _ in range(min(check_every, max_new_tokens - n)):
            run()
            n += 1
    clock.lap("decode_s")
    if stats is not None:
        stats["decode_steps"] = n - 1 - done
    new = out[:, :n]
    if eos.numel():
        hits = torch.isin(new[0], eos).nonzero()
        if hits.numel():
            new = new[:, : int(hits[0]) + 1]
    return new


class _Clock:
    """Wall time per phase, with the device synchronized at each lap; does nothing without a stats dict."""

    def __init__(self, device: torch.device, stats: dict | None):
        self.device, self.stats = device, stats
        self.last = self._now() if stats is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, key: str) -> None:
        if self.stats is not None:
            now = self._now()
            self.stats[key] = now - self.last
            self.last = now
