"""Greedy decoding on a static KV cache, each step replayed from one captured CUDA graph.

At batch 1 a decode step of a compressed model is a few hundred small kernels. Launched one by one from
Python (transformers' ``generate``), their launch overhead exceeds their run time: on the H100 the 2-bit
7B-shaped model ran 13.8 tokens/s eagerly against fp16's 33.0, and 228 tokens/s from a graph
(benchmarks/results/decode_7b_h100.txt). A step has fixed shapes, and so can be captured once and
replayed, when

* the KV cache is transformers' ``StaticCache`` (preallocated for prompt + new tokens),
* the attention mask is a preallocated 4D additive mask over every cache position, which transformers
  uses as given, and which the step itself opens at the position it writes,
* the tokens, their positions and the output index live in device tensors that the step advances in place.

A batch is left-padded (as the adapters build it): every row writes the same cache slot per step, its own
position counts only its real tokens, and its mask keeps its pads closed. This is how ``casp eval`` decodes
its batches on a GPU.

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


def graph_decode_applies(model: nn.Module, adapter, past_key_values=None, cuda_graph: bool = True) -> bool:
    """Whether generation takes the CUDA-graph path: model on a GPU, fp16 cache, a family that allows it."""
    param = next(model.parameters(), None)
    on_gpu = param is not None and param.is_cuda
    return cuda_graph and on_gpu and past_key_values is None and getattr(adapter, "graph_decode", False)


@torch.no_grad()
def static_greedy_generate(
    model: nn.Module,
    inputs: dict,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] = (),
    cuda_graph: bool = True,
    check_every: int = 16,
    stats: dict | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """New token ids [B, n <= max_new_tokens] of a greedy continuation of each prompt of ``inputs``.

    ``inputs`` are the model's own inputs (input_ids, attention_mask, pixel_values, ...), a batch left-padded
    as the adapters build it. The prompts are prefilled eagerly; the decode steps replay one CUDA graph when
    ``cuda_graph`` and the model is on a GPU, else run eagerly. As in ``generate``, a row that has emitted an
    end-of-sequence token goes on with ``pad_token_id`` (default: the first end token), and generation stops
    once every row has ended (checked every ``check_every`` steps, so a graph runs without host
    synchronization in between); the steps after the last row ended are dropped.
    With ``stats`` (a dict), the device is synchronized around each phase and the dict receives
    ``prefill_s``, ``setup_s`` (the eager first step and the capture), ``decode_s`` and ``decode_steps``.
    """
    from transformers import StaticCache

    from casp.models import cache_argument

    ids = inputs["input_ids"]
    batch, prompt_len = ids.shape
    if batch < 1 or prompt_len < 1:
        raise CaspError(f"static decoding needs at least one prompt token, got input_ids of shape {tuple(ids.shape)}")
    if max_new_tokens < 1:
        raise CaspError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = ids.device
    dtype = model.dtype
    total = prompt_len + max_new_tokens
    clock = _Clock(device, stats)
    cache = {cache_argument(model): StaticCache(config=model.config, max_cache_len=total)}
    prompt_mask = inputs.get("attention_mask")
    visible = (prompt_mask if prompt_mask is not None else torch.ones_like(ids)).to(device).bool()  # [B, L]
    # Left padding: a row's positions count its real tokens only (pads get 0), as generate's do.
    prompt_positions = (visible.long().cumsum(-1) - 1).masked_fill(~visible, 0)

    logits = model(**inputs, **cache, use_cache=True, logits_to_keep=1, position_ids=prompt_positions,
                   cache_position=torch.arange(prompt_len, device=device)).logits
    out = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
    out[:, 0] = logits[:, -1].argmax(-1)
    clock.lap("prefill_s")

    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    pad = int(eos[0]) if pad_token_id is None and eos.numel() else int(pad_token_id or 0)
    running = ~_is_end(out[:, 0], eos)  # [B]: rows that have not emitted an end token yet

    # Static state of the step: the tokens to feed, the cache slot they fill (shared by the batch), each
    # row's position, the output column, the mask over every cache slot.
    token = out[:, :1].clone()
    cache_position = torch.full((1,), prompt_len, dtype=torch.long, device=device)
    position_ids = prompt_positions[:, -1:] + 1  # [B, 1]
    slot = torch.ones(1, dtype=torch.long, device=device)
    mask = torch.full((batch, 1, 1, total), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask[:, 0, 0, :prompt_len].masked_fill_(visible, 0.0)

    def step() -> None:
        mask.index_fill_(-1, cache_position, 0.0)  # the new tokens see themselves
        logits = model(input_ids=token, attention_mask=mask, position_ids=position_ids, cache_position=cache_position,
                       **cache, use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1)
        if eos.numel():  # fixed at capture: the graph holds either both ops or neither
            nxt = torch.where(running, nxt, pad)
            running.logical_and_(~_is_end(nxt, eos))
        out.index_copy_(1, slot, nxt[:, None])
        token.copy_(nxt[:, None])
        cache_position.add_(1)
        position_ids.add_(1)
        slot.add_(1)

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
        if eos.numel() and not bool(running.any()):
            break
        for _ in range(min(check_every, max_new_tokens - n)):
            run()
            n += 1
    clock.lap("decode_s")
    if stats is not None:
        stats["decode_steps"] = n - 1 - done
    return out[:, : _generated_length(out[:, :n], eos)]


def _is_end(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Which tokens are end tokens: one broadcast compare (torch.isin may sort, which a graph should not hold)."""
    return (tokens.unsqueeze(-1) == eos).any(-1)


def _generated_length(new: torch.Tensor, eos: torch.Tensor) -> int:
    """Columns of ``new`` [B, n] up to the step at which the last row ended (n if one never did)."""
    if not eos.numel():
        return new.shape[1]
    ended = _is_end(new, eos)
    if not bool(ended.any(-1).all()):
        return new.shape[1]
    return int(ended.long().argmax(-1).max()) + 1


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
