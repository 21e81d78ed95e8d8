"""LoRA for the real-parts VLM's language model: trainable rank-r updates of frozen linears (forward hooks), and
merging trained factors into the weights.

Used by the trainer (casp.demo.train_realvlm); the saved factors are merged into the fetched SmolLM2 at load by
casp.realmodels.realvlm.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LORA_TARGETS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LM_BLOCKS = "language_model.model.layers."  # LoRA goes on the decoder blocks' linears only


class LoRAHooks(nn.Module):
    """Trainable rank-r updates of frozen linears, y = W x + s B (A x) with s = alpha / r, added by forward
    hooks: the model keeps its modules and state-dict keys, and removing the hooks restores it exactly.

    A [r, in] starts kaiming-uniform and B [out, r] at zero, so training starts from the pretrained model
    (as in LoRA, Hu et al. 2021). ``factors()`` returns (A, s B) per module: the update is B' A.
    """

    def __init__(self, model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.names: list[str] = []
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        self._handles = []
        for name, module in model.named_modules():
            if not (name.startswith(LM_BLOCKS) and any(name.endswith("." + t) for t in targets)):
                continue
            if not isinstance(module, nn.Linear):
                raise TypeError(f"LoRA target {name} is a {type(module).__name__}, not an nn.Linear")
            w = module.weight
            a = torch.empty(rank, module.in_features, device=w.device, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(module.out_features, rank, device=w.device)))
            self._handles.append(module.register_forward_hook(self._hook(len(self.names))))
            self.names.append(name)
        if not self.names:
            raise ValueError(f"no linear of the language model's blocks matches the LoRA targets {targets}")

    def _hook(self, i: int):
        def add_update(module, args, out):
            x = args[0]  # [..., in]
            return out + nn.functional.linear(nn.functional.linear(x, self.A[i]), self.B[i]) * self.scale

        return add_update

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module name: (A [r, in], s B [out, r])} in fp32 on the CPU."""
        return {
            n: (a.detach().float().cpu(), (b.detach().float() * self.scale).cpu())
            for n, a, b in zip(self.names, self.A, self.B)
        }

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def merge_into(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """W <- W + B A for every module in ``factors`` (in place; as load_realvlm does to the fetched weights)."""
    from casp.realmodels.realvlm import merge_lora

    modules = dict(model.named_modules())
    for name, (A, B) in factors.items():
        w = modules[name].weight
        w.copy_(merge_lora(w, A.to(w.device), B.to(w.device)).to(w.dtype))


def concat_factors(first: dict, second: dict) -> dict:
    """Factors of the sum of two updates: B1 A1 + B2 A2 = [B1 B2] [A1; A2] (ranks add)."""
    out = dict(first)
    for name, (a, b) in second.items():
        if name in out:
            a0, b0 = out[name]
            out[name] = (torch.cat([a0.float(), a.float()]), torch.cat([b0.float(), b.float()], dim=1))
        else:
            out[name] = (a, b)
    return out
