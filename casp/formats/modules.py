"""The compressed-layer table: how each replaced linear is described in a checkpoint and rebuilt.

Entry of one linear (JSON, in config.json's quantization_config["layers"]):
  {"kind": "quant", "weight": <QuantizedWeight.meta()>, "bias": bool}
  {"kind": "lowrank", "rank": r, "A": <meta>, "B": <meta>, "bias": bool}
Tensors live in safetensors under the module's name: "<name>.<packed tensor>" for quant,
"<name>.A.<tensor>" / "<name>.B.<tensor>" for low-rank, "<...>.bias" for the bias.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from casp.errors import CheckpointError
from casp.lowrank.module import LowRankLinear
from casp.quant.linear import QuantLinear


def describe(module: nn.Module) -> dict[str, Any]:
    """The table entry of a compressed module."""
    if isinstance(module, QuantLinear):
        return {"kind": "quant", "weight": module.meta, "bias": module.bias is not None}
    if isinstance(module, LowRankLinear) and isinstance(module.A, QuantLinear) and isinstance(module.B, QuantLinear):
        return {"kind": "lowrank", "rank": module.rank, "A": module.A.meta, "B": module.B.meta,
                "bias": module.A.bias is not None}
    raise CheckpointError(f"cannot describe a {type(module).__name__} as a compressed layer")


def _take(tensors: dict[str, torch.Tensor], prefix: str, meta: dict, name: str) -> tuple[dict, torch.Tensor | None]:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix):] != "bias"}
    if not state:
        raise CheckpointError(f"checkpoint has no tensors for compressed layer {name!r} (expected keys {prefix}*); "
                              "the safetensors files do not match config.json: re-run casp compress")
    return state, tensors.get(prefix + "bias")


def build(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild the compressed module ``name`` from its entry and the checkpoint tensors (full names)."""
    kind = entry.get("kind")
    if kind == "quant":
        state, bias = _take(tensors, f"{name}.", entry["weight"], name)
        return QuantLinear.from_state(state, entry["weight"], bias)
    if kind == "lowrank":
        state_b, _ = _take(tensors, f"{name}.B.", entry["B"], name)
        state_a, bias = _take(tensors, f"{name}.A.", entry["A"], name)
        A = QuantLinear.from_state(state_a, entry["A"], bias)
        return LowRankLinear(A, QuantLinear.from_state(state_b, entry["B"]))
    raise CheckpointError(f"layer {name!r} has unknown kind {kind!r} in quantization_config "
                          "(expected quant or lowrank)")


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
