"""Bit packing of b-bit integer codes into int32 words (the "uniform" format's ``qweight``).

Layout (docs: formats.md). Each row of codes [N, K] is padded with zero codes to Kp = K rounded up
to a multiple of 32, then written as one bitstream: code j occupies bits [j*b, j*b + b), and
bitstream bit p is bit (p % 32) of word p // 32 (little-endian inside a word; each int32 is a
reinterpreted uint32). So every 32 codes fill exactly b words, and a row has Kp*b/32 words. For
b = 2, 4, 8 no code straddles two words; for b = 3 codes 10 and 21 of each 32 do.

Both directions work on chunks of 32 codes <-> b words at once: position i (0..31) of a chunk
starts at bit i*b, i.e. in word (i*b)//32 at shift (i*b)%32, spilling its high bits into the next
word when shift + b > 32. Packing sums uint32 contributions in int64; unpacking masks in int32.
"""

from __future__ import annotations

import torch

from casp.quant.base import QuantizationError

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD = 32


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"unsupported bit width {bits}; the uniform format packs bits in {SUPPORTED_BITS}")


def packed_words(K: int, bits: int) -> int:
    """Number of int32 words per row for K codes of ``bits`` bits (K padded to a multiple of 32)."""
    return (K + _WORD - 1) // _WORD * bits


def _chunk_layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the 32 positions of a chunk: word index, shift inside the word, and whether it spills."""
    start = torch.arange(_WORD, device=device) * bits
    word, shift = start // _WORD, start % _WORD
    return word, shift, shift + bits > _WORD


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [N, K] in [0, 2^bits) into int32 words [N, ceil(K/32)*bits]."""
    check_bits(bits)
    if codes.dim() != 2:
        raise QuantizationError(f"pack_codes expects codes [N, K], got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise QuantizationError(f"codes must be an integer tensor, got {codes.dtype}")
    N, K = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise QuantizationError(
            f"codes out of range for {bits} bits: min {int(codes.min())}, max {int(codes.max())}, "
            f"allowed [0, {(1 << bits) - 1}]"
        )
    chunks = (K + _WORD - 1) // _WORD
    c = torch.zeros(N, chunks * _WORD, dtype=torch.int64, device=codes.device)
    c[:, :K] = codes
    c = c.view(N, chunks, _WORD)  # [N, C, 32]
    word, shift, spill = _chunk_layout(bits, codes.device)
    lo = (c << shift) & 0xFFFFFFFF  # bits that land in the code's own word
    hi = torch.where(spill, c >> torch.where(spill, _WORD - shift, 0), 0)  # bits spilling into the next word
    # Codes never overlap inside a word, so summing their contributions equals OR-ing them.
    words = torch.stack(
        [lo[..., word == w].sum(-1) + hi[..., spill & (word + 1 == w)].sum(-1) for w in range(bits)], dim=-1
    )  # [N, C, bits]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # uint32 -> int32 bit pattern
    return words.reshape(N, chunks * bits).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words [N, ceil(K/32)*bits] -> uint8 codes [N, K]."""
    check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise QuantizationError(f"packed codes must be int32 [N, words], got {packed.dtype} {tuple(packed.shape)}")
    N, n_words = packed.shape
    if n_words != packed_words(K, bits):
        raise QuantizationError(
            f"packed codes have {n_words} words per row, but K={K} at {bits} bits needs {packed_words(K, bits)}"
        )
    chunks = n_words // bits
    w = packed.view(N, chunks, bits)  # [N, C, bits]
    word, shift, spill = _chunk_layout(bits, packed.device)
    # Stays in int32: masks are applied before any bit could reach the sign (no overflow), and after
    # the arithmetic right shift (which copies the sign bit down).
    n_lo = torch.clamp(_WORD - shift, max=bits)  # bits of the code in its own word
    shift, lo_mask, hi_mask = (t.to(torch.int32) for t in (shift, (1 << n_lo) - 1, (1 << (bits - n_lo)) - 1))
    lo = (w[..., word] >> shift) & lo_mask  # [N, C, 32]
    nxt = w[..., torch.where(spill, word + 1, word)]
    hi = (nxt & hi_mask) << n_lo.to(torch.int32)  # spilled high bits (0 where nothing spills)
    return (lo | hi).view(N, chunks * _WORD)[:, :K].to(torch.uint8)
