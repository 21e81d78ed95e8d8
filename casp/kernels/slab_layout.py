"""The "slab" layout: a kernel-friendly repacking of "uniform" codes, made once per weight on the GPU.

The stored "uniform" format (formats.md) puts consecutive codes of a row in consecutive bit fields, so
a kernel that unpacks a word gets codes k, k+1, ..., k+cpw-1 (cpw = 32 / b codes per word) and must
interleave the per-position tiles back into column order, and pair fp16 activations up, before it can
multiply. The slab layout removes both steps. A row is cut into *slabs* of S = cpw * WPG codes (WPG words
per slab). A word has cpw/2 fields of b bits in each 16-bit half; field J of word v of slab t holds

    low half,  bits [J b, J b + b):            column t S + 2 (v + J WPG)
    high half, bits [16 + J b, 16 + J b + b):  column t S + 2 (v + J WPG) + 1

so field J of the WPG words of a slab covers the column *pairs* p = v + J WPG, a contiguous run of pairs:
one 32-bit load of the activations gives the (x[2p], x[2p+1]) half2 that multiplies the (low, high)
codes that one LOP3 extracts from a word, and a [rows, WPG] word tile turns into cpw/2 such products with
shifts and masks only. A slab always lies inside one quantization group (S divides group_size, or the
layer has a single group), so scales and zeros apply once per (row, slab). Rows are padded with zero
codes to a whole number of slabs. Only b in {2, 4, 8} (codes never straddle words) and group sizes that
are a multiple of cpw are supported: :func:`slab_words` returns None otherwise and callers use the stored
layout.

The *K-major* variant (:func:`repack_kmajor`, for casp/kernels/triton_kmajor.py) stores the same words
transposed, [n_slabs * WPG, N]: the words of one K position for consecutive output rows are adjacent, so
a thread's 16-byte load holds 4 rows of the same columns and every activation pair it loads serves all
of them. Its scales and zeros travel together as one int32 half2 (scale, zero) per [group, row].

Pure torch (no Triton): the repacking runs on whatever device the packed weight is on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casp.quant.packing import unpack_codes

SLAB_CODES = 128  # codes per slab when the group allows it: 8 words at 2 bits, 16 at 4, 32 at 8
REPACK_CHUNK = 1 << 22  # codes repacked at a time (bounds the repack's temporaries; repack_memory.py)
_CACHE_ATTR = "_casp_slab"
_KMAJOR_ATTR = "_casp_kmajor"  # its own attribute: a graph captured on one layout keeps its buffers alive


def slab_words(bits: int, group_size: int, K: int) -> int | None:
    """Words per slab (WPG, a power of two) for this layer, or None if the slab layout does not apply."""
    if bits not in (2, 4, 8):
        return None
    cpw = 32 // bits
    best = SLAB_CODES // cpw
    if group_size >= K:  # one group per row: any slab size keeps the scale constant
        return best
    if group_size % cpw:
        return None
    per_group = group_size // cpw
    return min(best, per_group & -per_group)  # largest power of two dividing the group's words


def n_slabs(K: int, bits: int, wpg: int) -> int:
    return -(-K // (wpg * 32 // bits))


def repack_slabs(qweight: torch.Tensor, bits: int, K: int, wpg: int) -> torch.Tensor:
    """Stored "uniform" words [N, ceil(K/32)*b] -> slab words [N, n_slabs * wpg] (int32, same device).

    Works through the rows in chunks of about REPACK_CHUNK codes: in one pass the repack held about 18 bytes per
    code at its peak (797 MB for 4096 x 11008; 144-247 MB in chunks: benchmarks/repack_memory.py on the CPU),
    which would be about 1.3 GB of a small GPU's memory at 13824 x 5120.
    """
    hp = 16 // bits  # fields per 16-bit half
    T = n_slabs(K, bits, wpg)
    N = qweight.shape[0]
    dev = qweight.device
    shifts = torch.arange(hp, device=dev).view(1, 1, hp, 1, 1) * bits + torch.tensor([0, 16], device=dev).view(
        1, 1, 1, 1, 2
    )
    words = torch.empty(N, T * wpg, dtype=torch.int32, device=dev)
    step = max(1, REPACK_CHUNK // (T * 2 * hp * wpg))
    for r0 in range(0, N, step):
        codes = unpack_codes(qweight[r0:r0 + step], bits, K)  # [rows, K] uint8, stored column order
        c = torch.zeros(codes.shape[0], T * 2 * hp * wpg, dtype=torch.int64, device=dev)
        c[:, :K] = codes
        c = c.view(-1, T, hp, wpg, 2)  # [n, t, J, v, h] = code of column t*S + 2*(J*wpg + v) + h
        w = (c << shifts).sum((2, 4))  # fields never overlap: the sum is the OR; [rows, T, wpg]
        w = torch.where(w >= 1 << 31, w - (1 << 32), w)  # uint32 -> int32 bit pattern
        words[r0:r0 + step] = w.reshape(-1, T * wpg).to(torch.int32)
    return words


def unpack_slabs(words: torch.Tensor, bits: int, K: int, wpg: int) -> torch.Tensor:
    """Inverse of :func:`repack_slabs`: slab words -> codes [N, K] (int64), stored column order."""
    hp = 16 // bits
    N = words.shape[0]
    T = words.shape[1] // wpg
    w = words.to(torch.int64).view(N, T, 1, wpg, 1)
    shifts = torch.arange(hp, device=words.device).view(1, 1, hp, 1, 1) * bits + torch.tensor(
        [0, 16], device=words.device
    ).view(1, 1, 1, 1, 2)
    c = (w >> shifts) & ((1 << bits) - 1)  # [n, t, J, v, h]
    return c.reshape(N, T * 2 * hp * wpg)[:, :K]


def _refuse_inside_capture(qweight: torch.Tensor) -> None:
    """A repack inside CUDA-graph capture would be recorded into the graph (and redone at every replay)."""
    if qweight.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "a batch-1 kernel's repacked copy of this weight is made on its first call, which is being captured "
            "into a CUDA graph: run one forward (with the same batch size) before capturing"
        )


def cached_slabs(qweight: torch.Tensor, bits: int, K: int, wpg: int) -> torch.Tensor:
    """Slab words of ``qweight``, repacked on first use and kept on the tensor object itself.

    A QuantLinear's ``qweight`` buffer is the same tensor at every forward, so the repacking runs once
    per layer (call a forward before capturing a CUDA graph). The cache is keyed by the tensor's
    version counter, so an in-place update of the codes (load_state_dict) triggers a fresh repack;
    moving the module to another device makes a new buffer without the cache. Costs one more copy of
    the packed codes (b/16 of the fp16 weight's memory).
    """
    hit = getattr(qweight, _CACHE_ATTR, None)
    key = (qweight._version, bits, K, wpg)
    if hit is not None and hit[0] == key:
        return hit[1]
    _refuse_inside_capture(qweight)
    words = repack_slabs(qweight, bits, K, wpg)
    setattr(qweight, _CACHE_ATTR, (key, words))
    return words


def repack_kmajor(qweight: torch.Tensor, bits: int, K: int, wpg: int) -> torch.Tensor:
    """Stored "uniform" words [N, ceil(K/32)*b] -> K-major slab words [n_slabs * wpg, N] (int32)."""
    return repack_slabs(qweight, bits, K, wpg).t().contiguous()


def pack_scale_zero(scales: torch.Tensor, zeros: torch.Tensor, pre: int = 0) -> torch.Tensor:
    """fp16 scales and zeros [N, G] -> int32 [G, N] whose low half is scale * 2^pre and high half zero * 2^-pre.

    The K-major kernel decodes codes as q 2^-pre; the power of two moves to the scale (exact in fp16).
    """
    s = (scales.float() * 2.0**pre).to(torch.float16)
    z = (zeros.float() * 2.0**-pre).to(torch.float16)
    sz = torch.stack([s, z], dim=-1).contiguous()  # [N, G, 2]
    return sz.view(torch.int32).squeeze(-1).t().contiguous()


def kmajor_code_shift(scales: torch.Tensor, pre: int = 4) -> int:
    """The power of two the K-major kernel divides codes by: ``pre`` unless scales * 2^pre would overflow fp16."""
    return pre if float(scales.abs().max()) * 2.0**pre < 65504 else 0


def cached_kmajor(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, K: int
) -> KMajorWeight:
    """The K-major copy (:func:`make_kmajor_weight`) of a weight, made on first use and kept on ``qweight``.

    Same contract as :func:`cached_slabs` (keyed by the tensors' version counters; call a forward before
    capturing a CUDA graph); costs one more copy of the codes, scales and zeros.
    """
    hit = getattr(qweight, _KMAJOR_ATTR, None)
    key = (qweight._version, scales.data_ptr(), scales._version, zeros.data_ptr(), zeros._version, bits, group_size, K)
    if hit is not None and hit[0] == key:
        return hit[1]
    _refuse_inside_capture(qweight)
    kw = make_kmajor_weight(qweight, scales, zeros, None, bits, group_size, K)
    setattr(qweight, _KMAJOR_ATTR, (key, kw))
    return kw


@dataclass(frozen=True)
class KMajorWeight:
    """A "uniform" weight in the K-major layout alone: what a QuantLinear keeps on the GPU in "kmajor-only" mode.

    ``words`` [n_slabs * wpg, N] and ``sz`` [G, N] as made by :func:`repack_kmajor` / :func:`pack_scale_zero`
    (codes read as q 2^-pre, scales stored as s 2^pre), ``perm`` the act-order permutation (or None).
    """

    words: torch.Tensor
    sz: torch.Tensor
    pre: int
    bits: int
    group_size: int
    in_features: int
    wpg: int
    perm: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.words.shape[1]

    @property
    def device(self) -> torch.device:
        return self.words.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.sz, self.perm) if t is not None)

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (scales, zeros) [N, G] as stored (the power of two undone; exact: it is a power of two)."""
        halves = self.sz.t().contiguous().view(torch.float16).float().view(self.out_features, -1, 2)
        return halves[..., 0] * 2.0**-self.pre, halves[..., 1] * 2.0**self.pre

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense W [N, K] in stored column order, (q - z) s in fp32 (the reference for the K-major kernels)."""
        codes = unpack_slabs(self.words.t().contiguous(), self.bits, self.in_features, self.wpg).float()
        s, z = self.scale_zero()
        g = torch.arange(self.in_features, device=codes.device) // self.group_size
        return ((codes - z[:, g]) * s[:, g]).to(dtype)


def make_kmajor_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
) -> KMajorWeight:
    """The K-major copy of a stored "uniform" weight (on its device). Needs 2 or 4 bits and groups of whole words."""
    wpg = slab_words(bits, group_size, K)
    if bits not in (2, 4) or wpg is None:
        raise ValueError(f"the K-major layout takes 2 or 4 bits with groups of whole 32-bit words; got {bits} bits, "
                         f"group {group_size}")  # fmt: skip
    pre = kmajor_code_shift(scales)
    return KMajorWeight(repack_kmajor(qweight, bits, K, wpg), pack_scale_zero(scales, zeros, pre), pre, bits,
                        group_size, K, wpg, perm)  # fmt: skip


def _kernel_copies(model: torch.nn.Module):
    """(buffer, attribute, tensors) of every repacked copy (slab, K-major) kept on ``model``'s buffers."""
    for buf in model.buffers():
        for attr in (_CACHE_ATTR, _KMAJOR_ATTR):
            hit = getattr(buf, attr, None)
            if hit is not None:
                value = hit[1]  # slab: the words; K-major: a KMajorWeight
                yield buf, attr, [value.words, value.sz] if isinstance(value, KMajorWeight) else [value]


def kernel_copy_bytes(model: torch.nn.Module) -> int:
    """Bytes of the repacked copies that kernels keep: the slab / K-major copies attached to ``model``'s buffers,
    and the K-major weights that replace the stored buffers on the GPU in "kmajor-only" mode."""
    from casp.quant.linear import QuantLinear  # imports casp.kernels

    attached = sum(t.numel() * t.element_size() for _, _, tensors in _kernel_copies(model) for t in tensors)
    held = (m.kmajor_only for m in model.modules() if isinstance(m, QuantLinear))
    return attached + sum(kw.nbytes() for kw in held if kw is not None)


def drop_kernel_copies(model: torch.nn.Module) -> None:
    """Forget the repacked copies kept on ``model``'s buffers (their memory is freed once nothing else, such as
    a captured CUDA graph, holds them)."""
    for buf, attr, _ in list(_kernel_copies(model)):
        delattr(buf, attr)
