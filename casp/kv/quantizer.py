"""Dynamic asymmetric uniform quantization of KV-cache tensors, stored packed.

Per group of ``g`` consecutive elements along the last dimension (AKVQ-VL: 128 channels of one
token and one head; KIVI keys: 32 tokens of one channel, see :func:`quantize_per_channel`):

    [a, c] = clip * [min(x), max(x)]          (range shrunk by the clip ratio)
    s = (c - a) / (2^n - 1)                    (rounded up to fp16, so it is exactly what is stored)
    z = -round(a / s)
    q = clamp(round(x / s) + z, 0, 2^n - 1)
    x^ = s (q - z)

so |x - x^| <= s/2 for every x inside [a, c]. Codes are packed 8/n per byte (uint8, little-endian
inside a byte: code i of a byte sits at bits [i n, i n + n)); scales and zero points are fp16.
"""

from __future__ import annotations

import dataclasses

import torch

SUPPORTED_BITS = (2, 4, 8)
# s is floored at max|[a, c]| / 2^10 so that |z| <= 1025 stays an exact fp16 integer, and at a tiny
# absolute value so that a constant group (c == a) still has a positive, fp16-representable scale.
_REL_SCALE_FLOOR = 2.0**-10
_ABS_SCALE_FLOOR = 1e-7


def default_clip(bits: int) -> float:
    """AKVQ-VL's clip ratios: 0.8 at 2 bits (outliers are clamped), 1.0 from 4 bits on."""
    return 0.8 if bits <= 2 else 1.0


@dataclasses.dataclass(frozen=True)
class PackedKV:
    """Quantized tensor of logical shape [..., G * group], groups along the last dimension.

    codes: uint8 [..., G, group * bits / 8]; scale, zero: fp16 [..., G].
    Leading dimensions are free (e.g. [tokens, heads]); :meth:`cat` and :meth:`select` work on dim 0.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    @property
    def group(self) -> int:
        return self.codes.shape[-1] * 8 // self.bits

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-2], self.codes.shape[-2] * self.group)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.scale, self.zero)

    def select(self, index: torch.Tensor) -> PackedKV:
        """Rows ``index`` of dim 0 (a LongTensor)."""
        return PackedKV(self.codes[index], self.scale[index], self.zero[index], self.bits)

    def to(self, device: torch.device | str) -> PackedKV:
        return PackedKV(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.bits)

    @staticmethod
    def cat(parts: list[PackedKV], dim: int = 0) -> PackedKV:
        """Concatenate along a leading dimension, or along the group dimension with ``dim=-1``."""
        if len({p.bits for p in parts}) != 1:
            raise ValueError("PackedKV.cat needs parts of one bit width")
        code_dim = -2 if dim == -1 else dim
        return PackedKV(
            torch.cat([p.codes for p in parts], dim=code_dim),
            torch.cat([p.scale for p in parts], dim=dim),
            torch.cat([p.zero for p in parts], dim=dim),
            parts[0].bits,
        )


def kernel_layout_ok(head_dim: int, bits: int, group: int) -> bool:
    """The Triton KV kernels (casp.kernels.triton_kv_quant / triton_kv_dequant) handle this layout: 2/4/8 bits,
    a power-of-two head dim >= 16 and quantization groups of whole 32-bit words."""
    return bits in (2, 4, 8) and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and group * bits % 32 == 0


def _check(x: torch.Tensor, bits: int, group: int, clip: float) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"KV quantization supports bits in {SUPPORTED_BITS}, got {bits}")
    if group <= 0 or group % (8 // bits):
        raise ValueError(f"group must be a positive multiple of {8 // bits} at {bits} bits, got {group}")
    if x.shape[-1] % group:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the group size {group}")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio must be in (0, 1], got {clip}")
    if not x.is_floating_point():
        raise ValueError(f"KV quantization needs a floating-point tensor, got {x.dtype}")


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (each < 2^bits) -> uint8 [..., n * bits / 8]."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, device=q.device, dtype=torch.int32)
    q = q.to(torch.int32).view(*q.shape[:-1], q.shape[-1] // per, per)
    return (q << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [..., m] -> uint8 [..., m * 8 / bits]."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    q = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def quantize_tokens(x: torch.Tensor, bits: int, group: int, clip: float | None = None) -> PackedKV:
    """Quantize ``x`` [..., C] per group of ``group`` consecutive elements of the last dimension."""
    clip = default_clip(bits) if clip is None else clip
    _check(x, bits, group, clip)
    qmax = 2**bits - 1
    xg = x.float().reshape(*x.shape[:-1], x.shape[-1] // group, group)  # [..., G, g]
    a = xg.amin(dim=-1) * clip
    c = xg.amax(dim=-1) * clip
    s = (c - a) / qmax
    floor = torch.maximum(a.abs(), c.abs()) * _REL_SCALE_FLOOR
    s = torch.maximum(s, floor).clamp_min(_ABS_SCALE_FLOOR)
    # Round the scale *up* to fp16: then (c - a) / s <= 2^n - 1 and the s/2 error bound holds exactly.
    s16 = s.to(torch.float16)
    # s16 > 0, so the next fp16 up is the bit pattern + 1 (no nextafter: not every device has it for half).
    s16 = torch.where(s16.float() < s, (s16.view(torch.int16) + 1).view(torch.float16), s16)
    s = s16.float()
    z = -torch.round(a / s)
    q = torch.clamp(torch.round(xg / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, qmax).to(torch.uint8)
    return PackedKV(pack_codes(q, bits), s16, z.to(torch.float16), bits)


def dequantize(p: PackedKV, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """x^ = s (q - z), shape [..., G * group], computed in ``dtype``."""
    q = unpack_codes(p.codes, p.bits).to(dtype)  # [..., G, g]
    x = (q - p.zero.to(dtype).unsqueeze(-1)) * p.scale.to(dtype).unsqueeze(-1)
    return x.reshape(*x.shape[:-2], -1)


def quantize_per_channel(x: torch.Tensor, bits: int, group: int, clip: float | None = None) -> PackedKV:
    """KIVI key quantization: ``x`` [..., T, C] grouped along tokens (``group`` tokens per channel).

    The result is laid out [..., C, T / group, ...]; T must be a multiple of ``group``.
    """
    return quantize_tokens(x.transpose(-1, -2), bits, group, clip)


def dequantize_per_channel(p: PackedKV, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Inverse of :func:`quantize_per_channel`: returns [..., T, C]."""
    return dequantize(p, dtype).transpose(-1, -2)
