"""Round-to-nearest (RTN): per-group asymmetric min-max quantization, the floor every method must beat.

For a group of weights w (one output row, ``group_size`` consecutive input columns) and b bits,
maxq = 2^b - 1:

    xmin = p * min(min(w), 0),   xmax = p * max(max(w), 0)       (p = clipping ratio, 1 = plain min-max)
    s = (xmax - xmin) / maxq,    z = round(-xmin / s)
    q = clamp(round(w / s) + z, 0, maxq),   w_hat = (q - z) * s

The range always contains 0, so z is an integer in [0, maxq] and 0 is represented exactly (zero
padding of a partial last group is therefore free). s is rounded to fp16 *before* the codes are
computed, so the stored (fp16) scales and zeros reproduce w_hat exactly.

With ``clip_search`` the ratio p is chosen per group from a grid in [clip_min_ratio, 1], minimizing
sum_j d_j (w_j - w_hat_j)^2 with d = 1, or d = diag(G) when the Gram matrix G is given. p = 1 is on
the grid and ties keep it, so clipping never does worse than plain min-max under that measure.

The helpers here (:func:`fit_minmax`, :func:`quantize_to_codes`, :func:`dequantize_codes`,
:func:`search_clip`) are shared with GPTQ.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from casp.quant.base import QuantConfig, QuantizationError, check_weight
from casp.quant.packing import SUPPORTED_BITS
from casp.quant.uniform import UniformWeight

_FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal fp16; smaller scales would flush to 0


def validate_uniform_config(cfg) -> None:
    """Checks shared by RTN and GPTQ configs (bits, group_size, clipping grid)."""
    name = type(cfg).__name__
    if cfg.bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}.bits must be one of {SUPPORTED_BITS}, got {cfg.bits!r}")
    if not isinstance(cfg.group_size, int) or cfg.group_size < -1:
        raise ValueError(f"{name}.group_size must be an int >= 1, or -1/0 for one group per output channel")
    if not 0.0 < cfg.clip_min_ratio <= 1.0:
        raise ValueError(f"{name}.clip_min_ratio must be in (0, 1], got {cfg.clip_min_ratio}")
    if cfg.clip_steps < 1:
        raise ValueError(f"{name}.clip_steps must be >= 1, got {cfg.clip_steps}")


@dataclasses.dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest.

    bits: 2, 3, 4 or 8.  group_size: input columns per scale/zero (-1 or 0: one group per output
    channel; the last group may be partial).  clip_search: pick a per-group clipping ratio from
    ``clip_steps`` values evenly spaced in [clip_min_ratio, 1].
    """

    method: ClassVar[str] = "rtn"
    bits: int = 4
    group_size: int = 128
    clip_search: bool = False
    clip_min_ratio: float = 0.2
    clip_steps: int = 41

    def __post_init__(self):
        validate_uniform_config(self)

    def label(self) -> str:
        return f"{self.method}-{self.bits}b-g{self.group_size}"


def compute_dtype(W: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 weights; fp64 stays fp64 (used by the reference tests)."""
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def resolve_group_size(group_size: int, in_features: int) -> int:
    """Effective group size: -1/0 (or anything >= in_features) means one group per output channel."""
    return in_features if group_size <= 0 else min(group_size, in_features)


def clip_ratios(cfg: RTNConfig) -> list[float]:
    """Clipping ratios to try, 1.0 first (so ties keep plain min-max)."""
    return torch.linspace(1.0, cfg.clip_min_ratio, cfg.clip_steps).tolist()


def max_code(bits: int | torch.Tensor) -> int | torch.Tensor:
    """maxq = 2^bits - 1; ``bits`` an int, or an integer tensor (one width per group, e.g. per output row)."""
    return (1 << bits) - 1 if isinstance(bits, int) else torch.pow(2, bits) - 1


def _clamp_codes(q: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    maxq = max_code(bits)
    return q.clamp(0, maxq) if isinstance(maxq, int) else torch.minimum(q.clamp_min(0), maxq.to(q.dtype))


def fit_minmax(
    w: torch.Tensor, bits: int | torch.Tensor, shrink: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max scale and zero of the groups w [..., g] -> (s [...], z [...]).

    Range [shrink * min(w, 0), shrink * max(w, 0)]; s is rounded to fp16 (what is stored) and z is an
    integer in [0, 2^bits - 1]. ``bits``: an int, or an integer tensor of shape [...] (a width per group).
    """
    maxq = max_code(bits)
    xmin = w.amin(-1).clamp(max=0) * shrink
    xmax = w.amax(-1).clamp(min=0) * shrink
    scale = ((xmax - xmin) / maxq).to(torch.float16).to(w.dtype).clamp_min(_FP16_TINY)
    return scale, _clamp_codes(torch.round(-xmin / scale), bits)


def quantize_to_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int | torch.Tensor
) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, 2^bits - 1), as integer-valued floats (s, z and a tensor ``bits``
    broadcast against w)."""
    return _clamp_codes(torch.round(w / scale) + zero, bits)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = (q - z) * s."""
    return (q - zero) * scale


def search_clip(
    w: torch.Tensor, bits: int | torch.Tensor, ratios: list[float], weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipping search: the (s, z) of the ratio minimizing sum_j d_j (w_j - w_hat_j)^2.

    w [..., g] groups, ``weight`` d broadcastable to w (None: d = 1), ``bits`` an int or a tensor [...].
    Returns (s [...], z [...]).
    """
    bits_w = bits[..., None] if isinstance(bits, torch.Tensor) else bits  # broadcast against w
    best_err = best_s = best_z = None
    for p in ratios:
        s, z = fit_minmax(w, bits, p)
        q = quantize_to_codes(w, s[..., None], z[..., None], bits_w)
        dw = dequantize_codes(q, s[..., None], z[..., None]) - w
        err = (dw.square() * weight).sum(-1) if weight is not None else dw.square().sum(-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
            continue
        better = err < best_err  # strict: ties keep the larger ratio
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def quantize_rtn(W: torch.Tensor, G: torch.Tensor | None = None, cfg: RTNConfig | None = None) -> UniformWeight:
    """Round each group of W [N, K] to its own b-bit asymmetric grid (see the module docstring).

    G (optional, [K, K]) is only used to weight the clipping search by diag(G).
    """
    cfg = cfg or RTNConfig()
    if not isinstance(cfg, RTNConfig):
        raise QuantizationError(f"quantize_rtn needs an RTNConfig, got {type(cfg).__name__}")
    check_weight(W, G)
    N, K = W.shape
    g = resolve_group_size(cfg.group_size, K)
    n_groups = -(-K // g)
    pad = n_groups * g - K  # zero padding of a partial last group: 0 is exact, so it changes nothing
    w = F.pad(W.to(compute_dtype(W)), (0, pad)).view(N, n_groups, g)  # [N, G, g]
    if cfg.clip_search:
        d = None if G is None else F.pad(G.diagonal().to(w), (0, pad)).view(n_groups, g)  # [G, g]
        scale, zero = search_clip(w, cfg.bits, clip_ratios(cfg), d)
    else:
        scale, zero = fit_minmax(w, cfg.bits)
    codes = quantize_to_codes(w, scale[..., None], zero[..., None], cfg.bits).view(N, -1)[:, :K]
    return UniformWeight.from_codes(codes.to(torch.uint8), scale, zero, cfg.bits, g)
