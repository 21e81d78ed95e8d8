"""QuIP#-style quantization: randomized Hadamard incoherence processing + LDLQ onto the E8P codebook.

Following Tseng et al. 2024 (QuIP#, arXiv 2402.04396), for a weight W [N, K] and Gram matrix
G = X^T X [K, K]:

1. Incoherence: random sign diagonals D_N, D_K and orthogonal transforms T_N, T_K
   (:func:`casp.hadamard.kron_transform`: Sylvester Hadamard for powers of two, Hadamard (x) Paley
   or DCT factors otherwise, no padding):
       W' = T_N D_N W D_K T_K^T,      G' = T_K D_K G D_K T_K^T,
   so that y = W x = D_N T_N^T W' (T_K D_K x) and tr(dW G dW^T) = tr(dW' G' dW'^T).
2. Scale: per output row n, s_n = scale_mult * rms(W'_n); the codebook approximates Z = W' / s.
3. LDLQ (block GPTQ): H = G' + damp * mean(diag G') I, H^{-1} = U^T U (U upper Cholesky). For each
   block b of 8 columns, left to right: Q_b = E8P(Z_b) (nearest codeword, plus the residual stage),
   E_b = (Z_b - Q_b) U_bb^{-1}, Z_r <- Z_r - E_b U_br for the columns r right of b. This is the
   optimal linear feedback for fixed block errors (block LDL of H), with lazy batch updates every
   ``block_size`` columns.
4. Bits: 2 = E8P only (16-bit code per 8 weights). 3 = E8P + a 1-bit residual stage: the residual
   r = Z_b - c1 is coded by its signs, c2 = sign(r) in {+-1}^8 (8-bit code), reconstruction
   c1 + c2 / resid_scale. 4 = E8P + E8P on the scaled residual: c2 = E8P(resid_scale * r),
   reconstruction c1 + c2 / resid_scale. resid_scale is fixed per bit width (stored in meta).

Stored: codes int16 [N, K/8] (uint16 bit pattern, layout in :mod:`casp.quant.e8p`), codes2 for 3/4
bits (uint8 sign bits / int16 E8P), scales fp16 [N], signs su int8 [K] (D_K) and sv int8 [N] (D_N).
in_features must be a multiple of 8 (every LMM layer is); out_features is unrestricted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from casp.hadamard import kron_factor, kron_transform
from casp.quant.base import QuantConfig, QuantizationError, QuantizedWeight, check_weight
from casp.quant.e8p import CODE_DIM, e8p_decode, e8p_encode, e8p_source

# Stage-2 codebook scale relative to stage 1 (module docstring). Chosen with scale_mult = 1.0 on a
# synthetic 128x512 layer with correlated activations (benchmarks/codebook_quantizers.py's
# generator): grid 3.0-5.0 gave the lowest error at 4.0 for 3 bits and 3.5 for 4 bits; likewise
# scale_mult 1.0 was best of 0.8-1.2 at 2 bits (0.00707 vs 0.00782 at 0.9, 0.0110 at 0.8).
RESID_SCALE = {3: 4.0, 4: 3.5}
_FP16_TINY = torch.finfo(torch.float16).tiny


@dataclasses.dataclass(frozen=True)
class QuIPConfig(QuantConfig):
    """QuIP#-style E8P quantization.

    bits: 2 (E8P), 3 (E8P + 1-bit sign residual) or 4 (E8P + E8P residual).  seed: random signs D.
    damp: LDLQ damping relative to mean(diag G').  scale_mult: row scale = scale_mult * rms(W' row).
    block_size: columns per lazy LDLQ update (a multiple of 8).
    """

    method: ClassVar[str] = "quip"
    bits: int = 2
    seed: int = 0
    damp: float = 0.01
    scale_mult: float = 1.0
    block_size: int = 128

    def __post_init__(self):
        if self.bits not in (2, 3, 4):
            raise ValueError(f"QuIPConfig.bits must be 2, 3 or 4, got {self.bits!r}")
        if not self.damp >= 0:
            raise ValueError(f"QuIPConfig.damp must be >= 0, got {self.damp}")
        if not self.scale_mult > 0:
            raise ValueError(f"QuIPConfig.scale_mult must be > 0, got {self.scale_mult}")
        if self.block_size < CODE_DIM or self.block_size % CODE_DIM:
            raise ValueError(f"QuIPConfig.block_size must be a positive multiple of 8, got {self.block_size}")

    def label(self) -> str:
        return f"quip-e8p-{self.bits}b"


def _random_signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.int8)


def _decode_rotated(codes, codes2, scales, bits: int, resid_scale: float) -> torch.Tensor:
    """W' [N, K] = s * (c1 + c2 / resid_scale) from the stored codes (fp32)."""
    N, J = codes.shape
    src = e8p_source(codes.device)
    q = e8p_decode(codes, src)
    if bits == 3:
        bit = torch.arange(CODE_DIM, device=codes.device, dtype=torch.int32)
        neg = (codes2.to(torch.int32)[..., None] >> bit) & 1
        q = q + (1 - 2 * neg).float() / resid_scale
    elif bits == 4:
        q = q + e8p_decode(codes2, src) / resid_scale
    return q.reshape(N, J * CODE_DIM) * scales.float()[:, None]


def _encode_block(z: torch.Tensor, bits: int, resid_scale: float, src: torch.Tensor):
    """Quantize 8-column blocks z [N, 8] -> (codes, codes2 or None, reconstruction [N, 8])."""
    c1, q = e8p_encode(z, source=src)
    if bits == 2:
        return c1, None, q
    r = z - q
    if bits == 3:
        neg = r < 0
        bit = torch.arange(CODE_DIM, device=z.device)
        c2 = (neg.to(torch.int32) << bit).sum(-1).to(torch.uint8)
        return c1, c2, q + (1 - 2 * neg.float()) / resid_scale
    c2, q2 = e8p_encode(r * resid_scale, source=src)
    return c1, c2, q + q2 / resid_scale


def _rotate_in(W: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """W' = T_N D_N W D_K T_K^T (fp32)."""
    Wr = kron_transform(W * su.float()[None, :])  # rows: T_K D_K w
    return kron_transform((Wr * sv.float()[:, None]).T.contiguous()).T.contiguous()


def _rotate_out(Wr: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """W = D_N T_N^T W' T_K D_K, the inverse of :func:`_rotate_in` (fp32)."""
    W = kron_transform(Wr, transpose=True)  # rows: W' T_K
    W = kron_transform(W.T.contiguous(), transpose=True).T  # T_N^T (.)
    return W * sv.float()[:, None] * su.float()[None, :]


def quantize_quip(W: torch.Tensor, G: torch.Tensor | None, cfg: QuIPConfig) -> QuIPWeight:
    """Quantize W [N, K] with incoherence processing + LDLQ onto E8P (see the module docstring).

    G None means data-free (H = I: LDLQ reduces to nearest-codeword rounding of W').
    Runs on W's device; fp32 internally.
    """
    check_weight(W, G)
    N, K = W.shape
    if K % CODE_DIM:
        raise QuantizationError(f"QuIP# E8P codes 8 input features at a time; in_features={K} is not a multiple of 8")
    dev = W.device
    gen = torch.Generator().manual_seed(cfg.seed)
    su = _random_signs(K, gen).to(dev)
    sv = _random_signs(N, gen).to(dev)
    Wr = _rotate_in(W.float(), su, sv)  # [N, K]
    if G is None:
        H = torch.eye(K, device=dev)
    else:
        Gs = G.float().to(dev) * su.float()[:, None] * su.float()[None, :]
        H = kron_transform(kron_transform(Gs).T.contiguous())  # T_K D G D T_K^T (symmetric)
        H = 0.5 * (H + H.T)
    H = H + cfg.damp * H.diagonal().mean().clamp_min(1e-12) * torch.eye(K, device=dev)
    dead = H.diagonal() <= 0
    H[dead, dead] = 1.0

    rms = Wr.pow(2).mean(dim=1).sqrt()
    # fp16 first, so the stored scales reproduce exactly; kept >= the smallest normal fp16 (zero rows)
    scales = (cfg.scale_mult * rms).clamp(min=_FP16_TINY, max=torch.finfo(torch.float16).max).to(torch.float16)
    Z = Wr / scales.float()[:, None]

    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # H^{-1} = U^T U
    resid_scale = RESID_SCALE.get(cfg.bits, 0.0)
    J = K // CODE_DIM
    codes = torch.empty(N, J, dtype=torch.int16, device=dev)
    codes2 = None
    if cfg.bits == 3:
        codes2 = torch.empty(N, J, dtype=torch.uint8, device=dev)
    elif cfg.bits == 4:
        codes2 = torch.empty(N, J, dtype=torch.int16, device=dev)
    bs = cfg.block_size
    src = e8p_source(dev)
    for i0 in range(0, K, bs):
        i1 = min(i0 + bs, K)
        Zb = Z[:, i0:i1].clone()
        Eb = torch.zeros_like(Zb)
        for j0 in range(0, i1 - i0, CODE_DIM):
            j1 = j0 + CODE_DIM
            c1, c2, q = _encode_block(Zb[:, j0:j1], cfg.bits, resid_scale, src)
            g = (i0 + j0) // CODE_DIM
            codes[:, g] = c1
            if codes2 is not None:
                codes2[:, g] = c2
            Ubb = U[i0 + j0 : i0 + j1, i0 + j0 : i0 + j1]
            # E_b = (Z_b - Q_b) U_bb^{-1}  (solve E U_bb = D, U_bb upper triangular)
            E = torch.linalg.solve_triangular(Ubb, Zb[:, j0:j1] - q, upper=True, left=False)
            Eb[:, j0:j1] = E
            Zb[:, j1:] -= E @ U[i0 + j0 : i0 + j1, i0 + j1 : i1]
        Z[:, i1:] -= Eb @ U[i0:i1, i1:]
    return QuIPWeight(codes, codes2, scales, su, sv, cfg.bits, resid_scale)


class QuIPWeight(QuantizedWeight):
    """E8P codes of the incoherence-processed weight W' plus the signs that undo the transform."""

    format: ClassVar[str] = "quip"

    def __init__(self, codes, codes2, scales, su, sv, bits: int, resid_scale: float):
        self.codes = codes  # int16 [N, K/8]
        self.codes2 = codes2  # None (2 bit), uint8 [N, K/8] (3 bit) or int16 [N, K/8] (4 bit)
        self.scales = scales  # fp16 [N]
        self.su = su  # int8 [K], D_K
        self.sv = sv  # int8 [N], D_N
        self.bits = bits
        self.resid_scale = float(resid_scale)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1] * CODE_DIM)

    def rotated(self) -> torch.Tensor:
        """W' = s * decode(codes) [N, K] (fp32), the weight in the incoherent basis."""
        return _decode_rotated(self.codes, self.codes2, self.scales, self.bits, self.resid_scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = D_N T_N^T W' T_K D_K, the dense weight in the original basis."""
        return _rotate_out(self.rotated(), self.su, self.sv).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T computed as D_N T_N^T (W' (T_K D_K x)) with fast transforms on the activations."""
        N, K = self.shape
        if x.shape[-1] != K:
            raise QuantizationError(f"input has {x.shape[-1]} features, the layer expects {K}")
        xf = x.float() * self.su.float().to(x.device)
        xr = kron_transform(xf)
        C = _decode_rotated(self.codes, self.codes2, torch.ones_like(self.scales), self.bits, self.resid_scale)
        yr = (xr @ C.to(x.device).T) * self.scales.float().to(x.device)
        y = kron_transform(yr, transpose=True) * self.sv.float().to(x.device)
        return y.to(x.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        s = {"codes": self.codes, "scales": self.scales, "su": self.su, "sv": self.sv}
        if self.codes2 is not None:
            s["codes2"] = self.codes2
        return s

    def meta(self) -> dict[str, Any]:
        N, K = self.shape
        return {
            "format": self.format,
            "shape": [N, K],
            "bits": self.bits,
            "codebook": "e8p",
            "resid_scale": self.resid_scale,
            "transform_in": list(kron_factor(K)),
            "transform_out": list(kron_factor(N)),
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> QuIPWeight:
        if meta.get("format") != cls.format:
            raise QuantizationError(f"expected format 'quip', got {meta.get('format')!r}")
        N, K = (int(v) for v in meta["shape"])
        bits = int(meta["bits"])
        if bits not in (2, 3, 4) or K % CODE_DIM:
            raise QuantizationError(f"bad quip meta: bits={bits}, shape={[N, K]}")
        for side, n in (("transform_in", K), ("transform_out", N)):
            if side in meta and list(meta[side]) != list(kron_factor(n)):
                raise QuantizationError(
                    f"quip {side} {meta[side]} differs from this casp version's {list(kron_factor(n))}; "
                    "re-quantize the layer with this version"
                )
        need = {
            "codes": ((N, K // CODE_DIM), torch.int16),
            "scales": ((N,), torch.float16),
            "su": ((K,), torch.int8),
            "sv": ((N,), torch.int8),
        }
        if bits == 3:
            need["codes2"] = ((N, K // CODE_DIM), torch.uint8)
        elif bits == 4:
            need["codes2"] = ((N, K // CODE_DIM), torch.int16)
        for name, (shape, dtype) in need.items():
            t = state.get(name)
            if t is None:
                raise QuantizationError(f"quip state is missing tensor {name!r}")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise QuantizationError(
                    f"quip tensor {name!r} has shape {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}"
                )
        return cls(
            state["codes"],
            state.get("codes2"),
            state["scales"],
            state["su"],
            state["sv"],
            bits,
            float(meta.get("resid_scale", RESID_SCALE.get(bits, 0.0))),
        )
