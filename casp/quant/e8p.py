"""The E8P ("E8 padded") lattice codebook of QuIP# (Tseng et al. 2024, arXiv 2402.04396, sec. 4.2).

2 bits per weight on 8-dim vectors: 2^16 codewords, a subset of the shifted lattice E8 + 1/4.

Construction (codes are 16-bit):

* Source set S: 256 vectors a in (N + 1/2)^8 with positive entries:
  - the 227 patterns with entries in {1/2, 3/2, 5/2} and ||a||^2 <= 10 (these are the absolute
    values of D8^ = (D8 + 1/2) intersected with the ball of radius sqrt(10)), in lexicographic order;
  - 29 patterns of norm^2 12 with five entries 3/2 and three entries 1/2 (``_NORM12`` below): the
    29 chosen in QuIP#'s published table, except that the table lists (1,3,3,3,1,1,3,3)/2 twice;
    its first occurrence sits among the (3,1,3,3,...) rows and is evidently (3,1,3,3,1,1,3,3)/2, which
    casp uses, so all 256 sources and all 65536 codewords are distinct.
* A codeword is c = s * a + t: a sign vector s in {+-1}^8 whose number of -1 has the parity of
  sum(a) (so sum(s * a) is even and s * a lies in D8 + 1/2 with even coordinate sum, i.e. in E8),
  and a shift t = +1/4 or -1/4 on every coordinate. 256 * 2^7 * 2 = 65536 codewords.
* Code layout (uint16; stored as int16 with the same bits): bits 8..15 = index of a in S;
  bit i (1 <= i <= 7) = 1 iff coordinate i is negated; bit 0 = 1 for t = +1/4, 0 for t = -1/4.
  Coordinate 0's sign is implied by the parity rule.

Nearest-codeword search exploits the sign structure: for each shift t and y = x - t, the best
signs for a given a are sign(y); if their parity is wrong for a, the cheapest fix flips the
coordinate with the smallest a_i |y_i| (cost 4 a_i |y_i|). So the distance to the best codeword
built on a is ||(|y| - a)||^2 + [parity mismatch] * 4 min_i a_i |y_i|, evaluated for all 256 a at
once: O(256 * 8) per vector instead of O(65536 * 8).
"""

from __future__ import annotations

import functools
import itertools

import torch

CODE_DIM = 8
NUM_SOURCE = 256
NUM_CODES = 1 << 16

# The 29 norm^2-12 source patterns (digits are 2a: "3" = 3/2, "1" = 1/2), from QuIP#'s E8P table.
_NORM12 = (
    "31113333 13113333 11313333 11133333 33313311 33313131 33311331 33313113 33311313 33311133 "
    "33133311 33133131 33131331 33133113 33131313 33131133 31333311 31333131 31331331 31333113 "
    "31331313 31331133 13333311 13333131 13331331 13333113 13331313 13331133 33113331"
).split()


@functools.cache
def _source_table() -> tuple[tuple[float, ...], ...]:
    # Immutable constant, built once (the enumeration of 3^8 patterns costs a few ms).
    half = (0.5, 1.5, 2.5)
    small = [p for p in itertools.product(half, repeat=CODE_DIM) if sum(v * v for v in p) <= 10.0]
    norm12 = [tuple(int(c) / 2 for c in row) for row in _NORM12]
    return tuple(sorted(small) + norm12)


def e8p_source(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256 source vectors S [256, 8] (fp32), in code order."""
    return torch.tensor(_source_table(), dtype=torch.float32, device=device)


def source_parity(source: torch.Tensor) -> torch.Tensor:
    """sum(a) mod 2 for each source vector (sums are integers). [256] int64."""
    return torch.round(source.double().sum(-1)).long() % 2


def e8p_decode(codes: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """Codewords [..., 8] (fp32) of integer codes [...] (int16 bit patterns or 0..65535 values)."""
    src = e8p_source(codes.device) if source is None else source
    c = codes.to(torch.int32) & 0xFFFF
    a = src[(c >> 8).long()]  # [..., 8]
    bit = torch.arange(1, CODE_DIM, device=codes.device, dtype=torch.int32)
    flips = ((c[..., None] >> bit) & 1).to(torch.int64)  # [..., 7] coordinates 1..7
    flip0 = (source_parity(src)[(c >> 8).long()] + flips.sum(-1)) % 2
    flips = torch.cat([flip0[..., None], flips], dim=-1)
    shift = torch.where((c & 1).bool(), 0.25, -0.25)
    return a * (1 - 2 * flips).to(a.dtype) + shift[..., None].to(a.dtype)


def e8p_codebook() -> torch.Tensor:
    """All 65536 codewords [65536, 8] (fp32), row i = e8p_decode(i). For tests and brute force."""
    return e8p_decode(torch.arange(NUM_CODES))


def e8p_encode(
    x: torch.Tensor, chunk: int = 4096, source: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest E8P codeword of each 8-vector in x [..., 8].

    Returns (codes int16 [...] holding the uint16 bit pattern, codewords fp32 [..., 8]).
    Exact nearest neighbour (ties broken arbitrarily), computed with the sign structure described
    in the module docstring; chunks of ``chunk`` vectors bound the [chunk, 256, 8] work tensor.
    ``source`` may pass ``e8p_source(device)`` to avoid rebuilding it on every call.
    """
    if x.shape[-1] != CODE_DIM:
        raise ValueError(f"E8P encodes 8-dim vectors, got last dimension {x.shape[-1]}")
    shape = x.shape[:-1]
    flat = x.reshape(-1, CODE_DIM).float()
    src = e8p_source(flat.device) if source is None else source
    src_par = source_parity(src)  # [256]
    src_sq = src.pow(2).sum(-1)  # [256]
    bit = torch.arange(CODE_DIM, device=flat.device)
    codes = torch.empty(flat.shape[0], dtype=torch.int32, device=flat.device)
    for lo in range(0, flat.shape[0], chunk):
        xb = flat[lo : lo + chunk]
        best_d, best_code = None, None
        for t_bit, t in ((1, 0.25), (0, -0.25)):
            y = xb - t
            ay = y.abs()
            neg = y < 0  # [b, 8]
            npar = neg.sum(-1) % 2  # [b]
            d = ay.pow(2).sum(-1, keepdim=True) - 2 * ay @ src.T + src_sq  # [b, 256]
            prod = ay[:, None, :] * src[None]  # [b, 256, 8]
            fix_val, fix_idx = prod.min(-1)  # cheapest coordinate to flip
            mismatch = npar[:, None] != src_par[None]  # [b, 256]
            d = d + mismatch * 4 * fix_val
            dmin, ai = d.min(-1)  # [b]
            flips = neg.clone()
            rows = torch.arange(xb.shape[0], device=xb.device)
            fix = mismatch[rows, ai]
            fi = fix_idx[rows, ai]
            flips[rows[fix], fi[fix]] = ~flips[rows[fix], fi[fix]]
            sign_bits = (flips[:, 1:].long() << bit[1:]).sum(-1)
            code = (ai.long() << 8) | sign_bits | t_bit
            if best_d is None:
                best_d, best_code = dmin, code
            else:
                take = dmin < best_d
                best_d = torch.where(take, dmin, best_d)
                best_code = torch.where(take, code, best_code)
        codes[lo : lo + chunk] = best_code.to(torch.int32)
    codes16 = (codes - (codes >= 1 << 15).to(torch.int32) * (1 << 16)).to(torch.int16)
    return codes16.reshape(shape), e8p_decode(codes16, src).reshape(*shape, CODE_DIM)
