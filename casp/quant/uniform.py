"""The "uniform" packed format: b-bit integer codes with per-group fp16 scales and zeros.

RTN and GPTQ both produce it; the Triton kernels read it. For a weight [N, K] (docs: formats.md):

* ``qweight`` int32 [N, ceil(K/32)*b]: codes packed as in :mod:`casp.quant.packing`;
* ``scales``, ``zeros`` float16 [N, ceil(K / group_size)]: stored column j is in group j // group_size
  (the last group may be partial);
* ``perm`` int32 [K], only with act-order: stored column j holds original input feature perm[j].

Dequantization: w[n, j] = (q[n, j] - zeros[n, j // g]) * scales[n, j // g], then columns are put
back in the original order, W = W_stored[:, argsort(perm)].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from casp.quant.base import QuantizationError, QuantizedWeight
from casp.quant.packing import check_bits, pack_codes, packed_words, unpack_codes

_META_KEYS = ("format", "shape", "bits", "group_size", "act_order")


class UniformWeight(QuantizedWeight):
    """Packed b-bit weight with group-wise asymmetric scales and zeros (optionally act-order permuted)."""

    format = "uniform"

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        shape: tuple[int, int],
        bits: int,
        group_size: int,
        perm: torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
    ):
        N, K = (int(s) for s in shape)
        check_bits(bits)
        if not 1 <= group_size <= K:
            raise QuantizationError(f"group_size must be in [1, in_features={K}], got {group_size}")
        n_groups = -(-K // group_size)
        _check("qweight", qweight, (N, packed_words(K, bits)), integer=True)
        _check("scales", scales, (N, n_groups), integer=False)
        _check("zeros", zeros, (N, n_groups), integer=False)
        if perm is not None:
            _check("perm", perm, (K,), integer=True)
        self.qweight, self.scales, self.zeros, self.perm = qweight, scales, zeros, perm
        self._shape = (N, K)
        self.bits, self.group_size = int(bits), int(group_size)
        self.info = dict(info or {})  # provenance (e.g. GPTQ's damp_used), carried in meta

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        perm: torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
    ) -> UniformWeight:
        """Build from integer codes [N, K] (stored column order) and per-group scales/zeros [N, G]."""
        scales, zeros = scales.to(torch.float16), zeros.to(torch.float16)
        if not (torch.isfinite(scales).all() and torch.isfinite(zeros).all()):
            raise QuantizationError(
                "scales or zeros overflow float16 (weights larger than ~65504 * (2^bits - 1) in a group); "
                "rescale the layer before quantizing"
            )
        return cls(
            pack_codes(codes, bits),
            scales,
            zeros,
            tuple(codes.shape),
            bits,
            group_size,
            None if perm is None else perm.to(torch.int32),
            info,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def codes(self) -> torch.Tensor:
        """Unpacked codes [N, K] (uint8) in stored column order."""
        return unpack_codes(self.qweight, self.bits, self._shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K = self._shape
        g = self.group_size
        q = F.pad(self.codes().float(), (0, self.n_groups * g - K)).view(N, self.n_groups, g)
        w = (q - self.zeros.float()[..., None]) * self.scales.float()[..., None]  # [N, G, g]
        w = w.view(N, -1)[:, :K]
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm.long())]  # back to the original input-feature order
        return w.to(dtype)

    def state(self) -> dict[str, torch.Tensor]:
        s = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.perm is not None:
            s["perm"] = self.perm
        return s

    def meta(self) -> dict[str, Any]:
        return {
            **self.info,
            "format": self.format,
            "shape": list(self._shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "act_order": self.perm is not None,
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> UniformWeight:
        missing = [k for k in _META_KEYS if k not in meta]
        if missing:
            raise QuantizationError(f"uniform weight meta lacks {missing}; got keys {sorted(meta)}")
        if meta["format"] != cls.format:
            raise QuantizationError(f"meta names format {meta['format']!r}, expected {cls.format!r}")
        wanted = {"qweight", "scales", "zeros"} | ({"perm"} if meta["act_order"] else set())
        if set(state) != wanted:
            raise QuantizationError(
                f"uniform weight state must hold exactly {sorted(wanted)} "
                f"(act_order={meta['act_order']}), got {sorted(state)}"
            )
        info = {k: v for k, v in meta.items() if k not in _META_KEYS}
        return cls(
            state["qweight"],
            state["scales"],
            state["zeros"],
            tuple(meta["shape"]),
            meta["bits"],
            meta["group_size"],
            state.get("perm"),
            info,
        )


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], integer: bool) -> None:
    if tuple(t.shape) != shape:
        raise QuantizationError(f"uniform weight tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    if integer and t.dtype != torch.int32:
        raise QuantizationError(f"uniform weight tensor {name!r} must be int32, got {t.dtype}")
    if not integer and not t.is_floating_point():
        raise QuantizationError(f"uniform weight tensor {name!r} must be floating point (float16), got {t.dtype}")
