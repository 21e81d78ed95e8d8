"""AQLM-style additive quantization (Egiazarian et al. 2024, arXiv 2401.06118).

A weight W [N, K] is split into groups of g = 8 consecutive input weights; group j of row n is

    W_hat[n, j] = s_n * sum_{m=1..M} C_m[b_{n,j,m}],     C_m in R^{2^B x g},  b in [0, 2^B)

(M codebooks of 2^B codewords each, one fp16 scale per output channel). The codes cost M*B/g bits
per weight; codebooks (M * 2^B * g fp16) and scales (N fp16) are counted in ``storage_bits``.

The objective is the G-weighted output error  L = tr((W - W_hat) G (W - W_hat)^T), G = X^T X.
Alternating minimization, until the relative improvement of L drops below ``tolerance``:

1. Init: residual k-means on the groups of W / s (s = row RMS): codebook m is k-means of what the
   first m-1 codebooks leave.
2. Codes: for each group j (left to right) and each codebook m in turn, with R = W - W_hat,
   g_j = (R G)[:, j] and v the group's current unscaled sum, the new sum v' minimizes
       f(v') = s^2 v'^T G_jj v' - 2 s v'^T (g_j + s G_jj v)
   (exactly L's change, all other groups fixed). Each step is a [N, beam, 2^B] score matrix, all
   rows at once. With ``beam_size`` > 1 the M codebooks of a group are searched by beam search
   (keep the ``beam_size`` best partial code tuples, as AQLM does; tuples reached twice are not
   merged, so duplicates may occupy beam slots); beam 1 is greedy coordinate descent. L never
   increases. 65536-entry codebooks (1x16) are scored in row chunks.
3. Scales: closed form per row, s_n = (W_n G V_n^T) / (V_n G V_n^T) with V the unscaled sums.
4. Codebooks: L is quadratic in (C_1..C_M); solved by ``cg_iters`` steps of Jacobi-preconditioned
   conjugate gradient on the normal equations A^T(A(C) G) = A^T(W G) (A: codebooks -> W_hat),
   warm-started from the current codebooks. Matrix-free: each step is one gather, one [N,K]x[K,K]
   matmul and one scatter-add. Unused codewords keep their values.

Stored (format "aqlm"): codes [N, K/g, M] as uint8 when B <= 8, else int16 holding the uint16 bit
pattern (read back as ``codes.int() & 0xFFFF``); codebooks fp16 [M, 2^B, g]; scales fp16 [N].
After the last round the codebooks are rounded to fp16 and the scales refit against them, so the
stored tensors are exactly what was optimized.

Block-wise fine-tuning of codebooks/scales against the fp16 block outputs (AQLM's "global" step)
is not implemented here: it needs the model, so it belongs in the calibration driver.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from casp.quant.base import QuantConfig, QuantizationError, QuantizedWeight, check_weight

PRESETS = {"1x16": (1, 16), "2x8": (2, 8), "2x12": (2, 12), "3x8": (3, 8), "4x8": (4, 8)}
BITS_PRESET = {1: (1, 8), 2: (2, 8), 3: (2, 12), 4: (4, 8)}  # bits -> (M, B) when only bits is given


_CG_RTOL = 1e-5  # relative (preconditioned) residual at which the codebook CG stops


def _score_elems(device: torch.device) -> int:
    """Elements of one [rows, beam, 2^B] score block: rows are chunked to stay below it."""
    return 1 << (27 if device.type == "cuda" else 22)


# Cheap search settings (greedy codes, 3 alternations, short init and CG): the benchmarks' AQLM on a 2-core CPU,
# and where a sensitivity pass quantizes every layer at several code rates. Pass as quant_options.
FAST_SEARCH = {"beam_size": 1, "max_iters": 3, "kmeans_iters": 5, "cg_iters": 10}


@dataclasses.dataclass(frozen=True)
class AQLMConfig(QuantConfig):
    """Additive codebook quantization (see the module docstring).

    num_codebooks (M) and codebook_bits (B, 2^B codewords of ``group`` = 8 dims each). bits is the
    code rate M*B/group; give either bits alone (2 -> 2x8, 3 -> 2x12, 4 -> 4x8, 1 -> 1x8) or M and B
    (bits is then derived, or must match). Use :meth:`preset` for "1x16", "2x8", "2x12", "3x8", "4x8".
    beam_size: beam width of the code search (1 = greedy).  max_iters: alternation rounds.
    tolerance: stop when L improves by less than this fraction.  cg_iters: codebook CG steps per
    round.  kmeans_iters: init iterations.  damp: added to G as damp * mean(diag G) I.  seed: init.
    """

    method: ClassVar[str] = "aqlm"
    bits: int | None = None
    num_codebooks: int | None = None
    codebook_bits: int | None = None
    group: int = 8
    beam_size: int = 1
    max_iters: int = 10
    tolerance: float = 1e-3
    cg_iters: int = 20
    kmeans_iters: int = 10
    damp: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        M, B, bits = self.num_codebooks, self.codebook_bits, self.bits
        if self.group < 1:
            raise ValueError(f"AQLMConfig.group must be >= 1, got {self.group}")
        if M is None and B is None:
            if (bits or 2) not in BITS_PRESET:
                raise ValueError(f"AQLMConfig.bits must be one of {sorted(BITS_PRESET)} without M/B, got {bits}")
            M, B = BITS_PRESET[bits or 2]
            if self.group != 8:
                raise ValueError("with a group other than 8, give num_codebooks and codebook_bits explicitly")
        elif M is None or B is None:
            if bits is None:
                raise ValueError("AQLMConfig: give both num_codebooks and codebook_bits, or bits")
            if M is None:
                M = bits * self.group // B
            else:
                B = bits * self.group // M
        if not (isinstance(M, int) and 1 <= M <= 8):
            raise ValueError(f"AQLMConfig.num_codebooks must be an int in [1, 8], got {M}")
        if not (isinstance(B, int) and 1 <= B <= 16):
            raise ValueError(f"AQLMConfig.codebook_bits must be an int in [1, 16], got {B}")
        if (M * B) % self.group:
            raise ValueError(
                f"M*B = {M * B} code bits per group of {self.group} is not a whole number of bits per "
                "weight; choose M and B with M*B a multiple of the group size"
            )
        derived = M * B // self.group
        if bits is not None and bits != derived:
            raise ValueError(
                f"AQLMConfig.bits={bits} does not match {M}x{B} codebooks on groups of {self.group} "
                f"({derived} bits); leave bits out or fix it"
            )
        for name, lo in (("beam_size", 1), ("max_iters", 0), ("cg_iters", 0), ("kmeans_iters", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"AQLMConfig.{name} must be >= {lo}, got {getattr(self, name)}")
        if not (self.tolerance >= 0 and self.damp >= 0):
            raise ValueError("AQLMConfig.tolerance and damp must be >= 0")
        object.__setattr__(self, "num_codebooks", M)
        object.__setattr__(self, "codebook_bits", B)
        object.__setattr__(self, "bits", derived)

    @classmethod
    def preset(cls, name: str, **kw: Any) -> AQLMConfig:
        """AQLMConfig for "MxB" codebooks, e.g. preset("2x8"), preset("1x16", beam_size=1)."""
        if name not in PRESETS:
            raise ValueError(f"unknown AQLM preset {name!r}; choose one of {sorted(PRESETS)}")
        M, B = PRESETS[name]
        return cls(num_codebooks=M, codebook_bits=B, **kw)

    def replace(self, **changes: Any) -> AQLMConfig:
        """Like dataclasses.replace; a new ``bits`` alone picks that bit width's preset codebooks."""
        if "bits" in changes and "num_codebooks" not in changes and "codebook_bits" not in changes:
            changes = {**changes, "num_codebooks": None, "codebook_bits": None}
        return dataclasses.replace(self, **changes)

    def candidates(self, bits: tuple[int, ...] = (2, 3, 4)) -> list[QuantConfig]:
        """One config per bit width for the allocator: 2 -> 2x8, 3 -> 2x12, 4 -> 4x8 (1 -> 1x8).

        2x8 over 1x16 at 2 bits: its codebooks are 128x smaller (65536 vs 8.4M bits, which is 0.5
        bit/weight on a 4096x4096 layer) and its search is 128x cheaper; 2x12 at 3 bits as in the
        CASP paper's code. Search settings (beam, iterations, seed) are kept.
        """
        return [self.replace(bits=b) for b in bits if b in BITS_PRESET]

    def label(self) -> str:
        return f"aqlm-{self.num_codebooks}x{self.codebook_bits}"


# ----------------------------------------------------------------------------- solver pieces


def _unscaled(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """V[n, j] = sum_m C_m[b_{n,j,m}]: codebooks [M, 2^B, g], codes [N, J, M] (int64) -> [N, J, g]."""
    V = codebooks[0][codes[..., 0]]
    for m in range(1, codebooks.shape[0]):
        V = V + codebooks[m][codes[..., m]]
    return V


def _adjoint(Y: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, n_codes: int) -> torch.Tensor:
    """A^T(Y): for each codebook m, scatter-add s_n * Y[n, j] into row b_{n,j,m}. Y [N, J, g]."""
    N, J, g = Y.shape
    sY = (s[:, None, None] * Y).reshape(N * J, g)
    out = Y.new_zeros(codes.shape[-1], n_codes, g)
    for m in range(codes.shape[-1]):
        out[m].index_add_(0, codes[..., m].reshape(-1), sY)
    return out


def _kmeans(X: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Plain Lloyd k-means of the rows of X [P, g] into k centroids; empty clusters keep their value.

    With k >= P every point gets its own centroid (exact) and the spare ones are jittered copies.
    """
    P = X.shape[0]
    if k >= P:
        pick = torch.randint(0, P, (k - P,), generator=gen).to(X.device)
        noise = torch.randn(k - P, X.shape[1], generator=gen).to(X.device) * X.std().clamp_min(1e-8) * 0.1
        return torch.cat([X, X[pick] + noise])
    C = X[torch.randperm(P, generator=gen)[:k].to(X.device)]
    for _ in range(iters):
        a = _nearest(X, C)
        sums = torch.zeros_like(C).index_add_(0, a, X)
        cnt = torch.zeros(k, device=X.device, dtype=X.dtype).index_add_(0, a, torch.ones_like(a, dtype=X.dtype))
        C = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None], C)
    return C


def _nearest(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of C for every row of X (chunked over X)."""
    cn = C.pow(2).sum(-1)
    step = max(1, _score_elems(X.device) // C.shape[0])
    return torch.cat([(cn - 2 * X[i : i + step] @ C.T).argmin(-1) for i in range(0, X.shape[0], step)])


def _init(Wg: torch.Tensor, s: torch.Tensor, cfg: AQLMConfig, gen: torch.Generator):
    """Residual k-means on the groups of W / s: codebooks [M, 2^B, g] and codes [N, J, M]."""
    N, J, g = Wg.shape
    k = 1 << cfg.codebook_bits
    R = (Wg / s[:, None, None]).reshape(N * J, g)
    n_train = min(R.shape[0], max(64 * k, 1 << 14), 1 << 20)
    sample = torch.randperm(R.shape[0], generator=gen)[:n_train].to(R.device)
    books, codes = [], []
    for _ in range(cfg.num_codebooks):
        C = _kmeans(R[sample], k, cfg.kmeans_iters, gen)
        a = _nearest(R, C)
        R = R - C[a]
        books.append(C)
        codes.append(a.reshape(N, J))
    return torch.stack(books), torch.stack(codes, dim=-1)


def _update_codes(W, G, codebooks, codes, s, beam: int) -> torch.Tensor:
    """One sweep of (beam-searched) coordinate descent on the codes; returns new codes [N, J, M]."""
    N, J, M = codes.shape
    g = codebooks.shape[-1]
    k = codebooks.shape[1]
    codes = codes.clone()
    V = _unscaled(codebooks, codes)  # [N, J, g]
    R = W - s[:, None] * V.reshape(N, J * g)  # [N, K]
    s2 = s * s
    rows_per_chunk = max(1, _score_elems(W.device) // (beam * k))
    for j in range(J):
        cols = slice(j * g, (j + 1) * g)
        Gjj = G[cols, cols]
        qc = torch.einsum("mcd,de,mce->mc", codebooks, Gjj, codebooks)  # c^T G_jj c  [M, 2^B]
        v_old = V[:, j]  # [N, g]
        t = R @ G[:, cols] + s[:, None] * (v_old @ Gjj)  # [N, g]
        new = torch.empty(N, M, dtype=codes.dtype, device=codes.device)
        new_v = torch.empty_like(v_old)
        for r0 in range(0, N, rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, N)
            bc, bv = _beam_group(codebooks, qc, Gjj, codes[r0:r1, j], v_old[r0:r1], t[r0:r1], s[r0:r1], s2[r0:r1], beam)
            new[r0:r1], new_v[r0:r1] = bc, bv
        R[:, cols] -= s[:, None] * (new_v - v_old)
        V[:, j] = new_v
        codes[:, j] = new
    return codes


def _beam_group(codebooks, qc, Gjj, cur, v_cur, t, s, s2, beam: int):
    """Beam search over the M codebooks of one group for a chunk of rows.

    cur [n, M] current codes, v_cur [n, g] their sum, t [n, g]. Cost of sum v: s^2 v^T G v - 2 s v^T t.
    Returns (codes [n, M], sums [n, g]) of the best tuple found (never worse than ``cur``).
    """
    n, M = cur.shape
    k = codebooks.shape[1]
    codes = cur[:, None, :]  # [n, b, M]
    sums = v_cur[:, None, :]  # [n, b, g]
    for m in range(M):
        base = sums - codebooks[m][codes[..., m]]  # [n, b, g]
        baseG = base @ Gjj
        f_base = s2[:, None] * (baseG * base).sum(-1) - 2 * s[:, None] * (base * t[:, None]).sum(-1)  # [n, b]
        lin = (2 * s2[:, None, None] * baseG - 2 * s[:, None, None] * t[:, None, :]) @ codebooks[m].T  # [n, b, k]
        total = f_base[..., None] + s2[:, None, None] * qc[m] + lin
        nb = min(beam, total.shape[1] * k)
        best = total.reshape(n, -1).topk(nb, dim=-1, largest=False).indices  # [n, nb]
        src, cw = best // k, best % k
        codes = torch.gather(codes, 1, src[..., None].expand(-1, -1, M)).clone()
        codes[..., m] = cw
        sums = torch.gather(base, 1, src[..., None].expand(-1, -1, base.shape[-1])) + codebooks[m][cw]
    return codes[:, 0], sums[:, 0]


def _refit_scales(W, G, V):
    """s_n = (W_n G V_n^T) / (V_n G V_n^T) (rows with V_n G V_n^T = 0 get s = 0)."""
    VG = V @ G
    den = (V * VG).sum(-1)
    return torch.where(den > 0, (W * VG).sum(-1) / den.clamp_min(1e-30), torch.zeros_like(den))


def _refit_codebooks(W, G, codebooks, codes, s, iters: int):
    """Jacobi-preconditioned CG on A^T(A(C) G) = A^T(W G), warm-started at ``codebooks``."""
    if iters == 0:
        return codebooks
    N, J, M = codes.shape
    k, g = codebooks.shape[1:]
    fwd = lambda C: s[:, None] * _unscaled(C, codes).reshape(N, J * g)  # noqa: E731
    hess = lambda C: _adjoint((fwd(C) @ G).reshape(N, J, g), codes, s, k)  # noqa: E731
    diagG = G.diagonal().reshape(1, J, g).expand(N, J, g)
    d = _adjoint(diagG * s[:, None, None], codes, s, k)  # sum s^2 G_dd over uses
    used = d > 0
    Pinv = torch.where(used, 1.0 / d.clamp_min(1e-30), torch.zeros_like(d))
    C = codebooks.clone()
    b = _adjoint((W @ G).reshape(N, J, g), codes, s, k)
    r = b - hess(C)
    z = Pinv * r
    p = z.clone()
    rz = (r * z).sum()
    # Stop at a small residual relative to the right-hand side (not to the warm start's residual,
    # which may already be at rounding level): past it, rounding error grows along the null space
    # (unused directions such as C_1 + u, C_2 - u) and CG drifts.
    stop = (b * Pinv * b).sum() * _CG_RTOL**2
    for _ in range(iters):
        if not rz > stop:
            break
        Ap = hess(p)
        pAp = (p * Ap).sum()
        if not pAp > 0:
            break
        alpha = rz / pAp
        C = C + alpha * p
        r = r - alpha * Ap
        z = Pinv * r
        rz_new = (r * z).sum()
        p = z + (rz_new / rz) * p
        rz = rz_new
    return C


def _loss(W, G, W_hat) -> float:
    D = W - W_hat
    return float(((D @ G) * D).sum())


def quantize_aqlm(W: torch.Tensor, G: torch.Tensor | None, cfg: AQLMConfig) -> AQLMWeight:
    """Additive quantization of W [N, K] minimizing tr((W - W_hat) G (W - W_hat)^T).

    G None means data-free (G = I: plain squared error). Runs on W's device, fp32 internally.
    in_features must be a multiple of ``cfg.group``.
    """
    check_weight(W, G)
    N, K = W.shape
    g = cfg.group
    if K % g:
        raise QuantizationError(f"AQLM groups {g} input features; in_features={K} is not a multiple of {g}")
    dev = W.device
    W = W.float()
    G = torch.eye(K, device=dev) if G is None else G.float().to(dev)
    G = 0.5 * (G + G.T) + cfg.damp * G.diagonal().mean().clamp_min(1e-12) * torch.eye(K, device=dev)
    J = K // g
    gen = torch.Generator().manual_seed(cfg.seed)

    s = W.pow(2).mean(dim=1).sqrt().clamp_min(1e-8)
    codebooks, codes = _init(W.reshape(N, J, g), s, cfg, gen)
    codebooks = _refit_codebooks(W, G, codebooks, codes, s, cfg.cg_iters)
    loss = _loss(W, G, s[:, None] * _unscaled(codebooks, codes).reshape(N, K))
    for _ in range(cfg.max_iters):
        codes = _update_codes(W, G, codebooks, codes, s, cfg.beam_size)
        s = _refit_scales(W, G, _unscaled(codebooks, codes).reshape(N, K))
        codebooks = _refit_codebooks(W, G, codebooks, codes, s, cfg.cg_iters)
        new_loss = _loss(W, G, s[:, None] * _unscaled(codebooks, codes).reshape(N, K))
        improved = loss - new_loss
        loss = new_loss
        if improved <= cfg.tolerance * abs(loss):
            break
    # Store fp16: refit the scales against the rounded codebooks so the stored pair is consistent.
    codebooks = codebooks.to(torch.float16)
    s = _refit_scales(W, G, _unscaled(codebooks.float(), codes).reshape(N, K)).to(torch.float16)
    return AQLMWeight(_pack_codes(codes, cfg.codebook_bits), codebooks, s, cfg.codebook_bits)


def _pack_codes(codes: torch.Tensor, B: int) -> torch.Tensor:
    """Narrowest storage: uint8 for B <= 8, else int16 holding the uint16 bit pattern."""
    if B <= 8:
        return codes.to(torch.uint8)
    return (codes - (codes >= 1 << 15).long() * (1 << 16)).to(torch.int16)


def _unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.int64) & 0xFFFF


class AQLMWeight(QuantizedWeight):
    """AQLM codes [N, K/g, M], codebooks fp16 [M, 2^B, g], scales fp16 [N]."""

    format: ClassVar[str] = "aqlm"

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, codebook_bits: int):
        self.codes = codes
        self.codebooks = codebooks
        self.scales = scales
        self.codebook_bits = int(codebook_bits)

    @property
    def shape(self) -> tuple[int, int]:
        N, J, _ = self.codes.shape
        return (N, J * self.codebooks.shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K = self.shape
        V = _unscaled(self.codebooks.float(), _unpack_codes(self.codes)).reshape(N, K)
        return (self.scales.float()[:, None] * V).to(dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "codebooks": self.codebooks, "scales": self.scales}

    def meta(self) -> dict[str, Any]:
        N, K = self.shape
        M, _, g = self.codebooks.shape
        return {
            "format": self.format,
            "shape": [N, K],
            "num_codebooks": M,
            "codebook_bits": self.codebook_bits,
            "group": g,
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> AQLMWeight:
        if meta.get("format") != cls.format:
            raise QuantizationError(f"expected format 'aqlm', got {meta.get('format')!r}")
        N, K = (int(v) for v in meta["shape"])
        M, B, g = int(meta["num_codebooks"]), int(meta["codebook_bits"]), int(meta["group"])
        if K % g or not 1 <= B <= 16:
            raise QuantizationError(f"bad aqlm meta: shape {[N, K]}, group {g}, codebook_bits {B}")
        need = {
            "codes": ((N, K // g, M), torch.uint8 if B <= 8 else torch.int16),
            "codebooks": ((M, 1 << B, g), torch.float16),
            "scales": ((N,), torch.float16),
        }
        for name, (shape, dtype) in need.items():
            t = state.get(name)
            if t is None:
                raise QuantizationError(f"aqlm state is missing tensor {name!r}")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise QuantizationError(
                    f"aqlm tensor {name!r} has shape {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}"
                )
        return cls(state["codes"], state["codebooks"], state["scales"], B)
