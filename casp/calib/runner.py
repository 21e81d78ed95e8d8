"""Layer-wise calibration: stream the calibration set through the decoder one block at a time.

1. Capture the inputs of block 0 (hidden states plus everything the block needs: position
   embeddings, masks, position ids; Qwen2-VL's M-RoPE positions arrive here already applied).
2. For each block i: move it to the compute device, let the caller observe/compress it through a
   :class:`BlockContext` (Gram matrices X^T X of any of its linears, attention maps), then recompute
   the block's outputs with the (possibly compressed) block, so later blocks see the errors of earlier
   ones (as GPTQ does), move it back to CPU, go on.

Only one block sits on the compute device at a time; activations are kept on CPU between blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from casp.errors import CalibrationDataError
from casp.models.base import ModelAdapter


@dataclasses.dataclass
class BlockInput:
    hidden: torch.Tensor  # [1, T, D] on CPU
    kwargs: dict  # everything else the block's forward received (tensors on CPU)
    image_mask: torch.Tensor  # [T] bool: image-token positions


class _Catcher(nn.Module):
    """Stands in for the decoder stack's only layer and records what it is called with."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def forward(self, hidden_states, *args, **kwargs):
        # the cache argument (``cache`` since transformers 5.25, ``past_key_values`` before) is not replayed
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        self.store.append((hidden_states, args, kwargs))
        return hidden_states


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: ModelAdapter, inputs: Iterable[dict], device: torch.device | str = "cpu"
) -> list[BlockInput]:
    """Run the model up to its first decoder block for each input batch; return block-0 inputs on CPU.

    The decoder stack is swapped for a single recording layer, so only the embeddings, the vision
    tower and the projector run (on ``device``); the decoder blocks themselves stay where they are.
    """
    lm = adapter.language_model(model)
    layers = lm.layers
    store: list = []
    lm.layers = nn.ModuleList([_Catcher(store)])
    moved = _move_except_layers(model, layers, device)
    captured = []
    try:
        for batch in inputs:
            store.clear()
            model(**_to(dict(batch), device), use_cache=False)
            hidden, args, kwargs = store[0]
            mask = adapter.image_token_mask(model, batch["input_ids"])[0]
            captured.append(BlockInput(hidden.cpu(), _to(kwargs, "cpu"), mask.cpu()))
    finally:
        lm.layers = layers
        if moved:
            _move_except_layers(model, layers, "cpu")
    return captured


def _move_except_layers(model: nn.Module, layers: nn.ModuleList, device) -> bool:
    """Move everything but the decoder blocks (embeddings, vision tower, norms, head) to ``device``."""
    if torch.device(device).type == "cpu" and next(model.parameters()).device.type == "cpu":
        return False
    layer_params = {id(p) for p in layers.parameters()}
    for module in model.modules():
        for _name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in layer_params:
                param.data = param.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buf.to(device)
    return True


class BlockContext:
    """What a block-compression callback may ask of the block it is given."""

    def __init__(self, index: int, block: nn.Module, inputs: list[BlockInput], device, adapter: ModelAdapter):
        self.index = index
        self.block = block
        self.inputs = inputs
        self.device = device
        self.adapter = adapter

    def forward_all(self, hooks: dict[str, Callable] | None = None, keep_outputs: bool = False):
        """Run every calibration input through the block with optional forward hooks by module name."""
        from casp.quant.linear import dense_weights

        handles = [self.block.get_submodule(name).register_forward_hook(fn) for name, fn in (hooks or {}).items()]
        outputs = []
        try:
            with torch.no_grad(), dense_weights(self.block):  # compressed layers unpack once per pass
                for item in self.inputs:
                    out = self.block(_to(item.hidden, self.device), **_to(item.kwargs, self.device))
                    out = out[0] if isinstance(out, tuple) else out
                    if keep_outputs:
                        outputs.append(out.cpu())
        finally:
            for h in handles:
                h.remove()
        return outputs

    def grams(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """G = X^T X (fp32, on the compute device) of the inputs of each named linear, over all tokens.

        Linears that read the same tensor (q,k,v) share one accumulation.
        """
        names = list(names)
        grams: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook_for(name):
            def hook(module, args, output):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                if not torch.isfinite(x).all():
                    raise CalibrationDataError(
                        f"NaN/Inf activations at the input of {self.adapter.block_prefix(self.index)}.{name}; "
                        "the model overflows in this dtype: calibrate in float32 or bfloat16"
                    )
                g = x.T @ x
                grams[name] = grams[name] + g if name in grams else g
                counts[name] = counts.get(name, 0) + x.shape[0]

            return hook

        self.forward_all({name: hook_for(name) for name in names})
        self.token_counts = counts
        return grams


@dataclasses.dataclass
class LayerwiseResult:
    outputs: list[torch.Tensor]  # hidden states after the last processed block, per input


def run_layerwise(
    model: nn.Module,
    adapter: ModelAdapter,
    block_inputs: list[BlockInput],
    on_block: Callable[[BlockContext], None] | None = None,
    device: torch.device | str = "cpu",
    start: int = 0,
    replay: Callable[[int, nn.Module], None] | None = None,
    progress: bool = True,
    desc: str = "blocks",
) -> LayerwiseResult:
    """Walk the decoder blocks in order, calling ``on_block`` on each with its calibration inputs.

    Blocks before ``start`` are only replayed (``replay(i, block)`` may restore an already compressed
    block first; then its outputs are recomputed), which is how an interrupted compression resumes.
    """
    layers = adapter.decoder_layers(model)
    current = block_inputs
    bar = tqdm(range(len(layers)), desc=desc, disable=not progress, unit="block")
    for i in bar:
        block = layers[i]
        if i < start and replay is not None:
            replay(i, block)
        block.to(device)
        ctx = BlockContext(i, block, current, device, adapter)
        if i >= start and on_block is not None:
            on_block(ctx)
        outputs = ctx.forward_all(keep_outputs=True)
        block.to("cpu")
        current = [dataclasses.replace(item, hidden=out) for item, out in zip(current, outputs)]
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return LayerwiseResult([item.hidden for item in current])
