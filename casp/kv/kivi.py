"""Baselines in the same cache machinery: KIVI-style 2-bit cache, and uniform 2-bit per-token cache.

KIVI (Liu et al. 2024): keys quantized per channel (a group = ``group`` consecutive tokens of one
channel, since key outliers live in fixed channels), values per token (``group`` channels of one
token), an fp16 window of recent tokens; no rotation, no saliency. Tokens leave the window in whole
groups, which per-channel grouping needs.

``UniformKVCache`` is AKVQCache with every AKVQ-VL switch off (per-token 2-bit + fp16 window): the
first step of the ablation, not a separate implementation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from casp.kv.cache import AKVQCache, AKVQConfig
from casp.kv.quantizer import (
    SUPPORTED_BITS,
    PackedKV,
    dequantize,
    dequantize_per_channel,
    quantize_per_channel,
    quantize_tokens,
)
from casp.kv.window import QuantizedKVCache, WindowedQuantLayer, text_shape


@dataclasses.dataclass(frozen=True)
class KIVIConfig:
    """bits, group (tokens per key group = channels per value group), residual fp16 tokens, clip ratio."""

    bits: int = 2
    group: int = 32
    residual: int = 128
    clip: float = 1.0
    version: int = 1

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"KIVIConfig.bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group <= 0 or self.group % 4:
            raise ValueError(f"KIVIConfig.group must be a positive multiple of 4, got {self.group}")
        if self.residual < 0:
            raise ValueError(f"KIVIConfig.residual must be >= 0, got {self.residual}")
        if not 0.0 < self.clip <= 1.0:
            raise ValueError(f"KIVIConfig.clip must be in (0, 1], got {self.clip}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class KIVILayer(WindowedQuantLayer):
    """Keys: PackedKV [B, H, d, S/group groups]; values: PackedKV [B, H, S, d/group groups]."""

    def __init__(self, config: KIVIConfig, head_dim: int):
        super().__init__(config.residual, block=config.group)
        self.config = config
        self.value_group = min(config.group, head_dim)
        if head_dim % self.value_group:
            raise ValueError(f"head dim {head_dim} is not a multiple of the KIVI group size {self.value_group}")
        self.qkeys: PackedKV | None = None
        self.qvalues: PackedKV | None = None

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None

    def _store(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        c = self.config
        qk = quantize_per_channel(keys, c.bits, c.group, c.clip)  # groups of `group` tokens
        qv = quantize_tokens(values, c.bits, self.value_group, c.clip)
        self.qkeys = qk if self.qkeys is None else PackedKV.cat([self.qkeys, qk], dim=-1)
        self.qvalues = qv if self.qvalues is None else PackedKV.cat([self.qvalues, qv], dim=2)

    def _load_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, s, d = keys.shape
        g = self.config.group
        step = max(1, self.dequant_slice // (b * h * d * g)) * g  # whole key groups per slice
        for t0 in range(0, s, step):
            t1 = min(s, t0 + step)
            qk, qv = self.qkeys, self.qvalues
            k_part = PackedKV(
                qk.codes[..., t0 // g : t1 // g, :],
                qk.scale[..., t0 // g : t1 // g],
                qk.zero[..., t0 // g : t1 // g],
                qk.bits,
            )
            v_part = PackedKV(qv.codes[:, :, t0:t1], qv.scale[:, :, t0:t1], qv.zero[:, :, t0:t1], qv.bits)
            keys[:, :, t0:t1] = dequantize_per_channel(k_part, self.dtype)
            values[:, :, t0:t1] = dequantize(v_part, self.dtype)

    def _select_store(self, index: torch.Tensor) -> None:
        self.qkeys, self.qvalues = self.qkeys.select(index), self.qvalues.select(index)

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        for p in (self.qkeys, self.qvalues):
            if p is not None:
                yield from p.tensors()


class KIVICache(QuantizedKVCache):
    """KIVI-style quantized cache: ``model.generate(..., past_key_values=KIVICache(model))``."""

    def __init__(self, model: nn.Module, config: KIVIConfig | None = None, adapter=None):
        from casp.models import get_adapter

        config = config or KIVIConfig()
        num_layers, head_dim = text_shape(model, adapter or get_adapter(model))
        super().__init__(layers=[KIVILayer(config, head_dim) for _ in range(num_layers)])
        self.config = config


class UniformKVCache(AKVQCache):
    """Uniform per-token quantization with an fp16 window: AKVQCache with rotation, TSA and PSA off."""

    def __init__(
        self,
        model: nn.Module,
        bits: int = 2,
        group: int = 128,
        residual: int = 128,
        block: int = 32,
        clip: float | None = None,
        adapter=None,
    ):
        config = AKVQConfig(
            bits=bits, group=group, residual=residual, block=block, clip=clip, rotate=False, tsa=False, psa=False
        )
        super().__init__(model, config, adapter)
