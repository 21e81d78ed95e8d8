"""Tile configs and kernel choice for the "uniform" Triton kernels (pure Python: importable without Triton).

Paths by the number of activation rows M (see :func:`choose_path`):

* ``kmajor``: batch-1 GEMV on the K-major slab layout (4 rows per thread, half2 decode; fp16 activations, 2 or
  4 bits; casp/kernels/triton_kmajor.py), the fastest at M = 1 on an H200 (benchmarks/results/kernels_kmajor_h200.txt);
* ``gemv``: CUDA-core fused unpack + dot on the stored layout, at M = 1 where kmajor does not apply;
* ``tc``: tensor-core kernel with an fp16 decode (2/4/8 bits, groups of whole words), for 2 <= M <= 64;
* ``dot``: tensor-core kernel with an fp32 decode, for what ``tc`` does not support (3 bits, odd groups);
* ``dequant``: dequantize into the activation dtype, then cuBLAS, for M > 64 (prefill);
* ``slab`` / ``slab16``: batch-1 GEMV on the slab layout (casp/kernels/slab_layout.py, repacked once per
  weight), fp32 / half2 decode (casp/kernels/triton_slab.py), kept for comparison.

``GEMV_M1`` names the kernel used at M = 1.
"""

from __future__ import annotations

import json


class KernelConfig:
    """Tile sizes and launch options of one kernel call.

    bn: output rows per program; bk: weight columns per loop step; split: programs sharing one
    row block along K (reduced in-kernel by the last one); bm: activation rows per program of the
    tensor-core kernel. K-major kernel only (sm_90 and later; ignored elsewhere): prefetch: each program first
    asks the L2 for all its words and scales with bulk prefetches; pdl: programmatic dependent launch, 0 off,
    1 the next kernel may launch once every program has started, 2 once every program has finished its loop.
    Both are off by default: on an H100 neither paid (benchmarks/results/kernels_prefetch_h100.txt).
    """

    __slots__ = ("bn", "bk", "bm", "num_warps", "num_stages", "split", "prefetch", "pdl")

    def __init__(
        self,
        bn: int,
        bk: int,
        num_warps: int = 4,
        num_stages: int = 2,
        bm: int = 16,
        split: int = 1,
        prefetch: bool = False,
        pdl: int = 0,
    ):
        for name, v in (("bn", bn), ("bk", bk), ("bm", bm)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {v}")
        if split < 1:
            raise ValueError(f"KernelConfig.split must be >= 1, got {split}")
        if pdl not in (0, 1, 2):
            raise ValueError(f"KernelConfig.pdl must be 0, 1 or 2, got {pdl}")
        self.bn, self.bk, self.bm, self.num_warps, self.num_stages, self.split = (
            bn,
            bk,
            bm,
            num_warps,
            num_stages,
            split,
        )
        self.prefetch, self.pdl = bool(prefetch), pdl

    def replace(self, **kw) -> KernelConfig:
        d = {k: getattr(self, k) for k in self.__slots__}
        d.update(kw)
        return KernelConfig(**d)

    def option_args(self) -> str:
        """The K-major launch options that differ from the defaults, as constructor arguments (", pdl=2")."""
        return (", prefetch=True" if self.prefetch else "") + (f", pdl={self.pdl}" if self.pdl else "")

    def __repr__(self) -> str:
        return (
            f"KernelConfig({self.bn}, {self.bk}, {self.num_warps}, {self.num_stages}, bm={self.bm}, split={self.split}"
            f"{self.option_args()})"
        )


# Best configs of `python benchmarks/kernels.py --sweep` on an H100 (benchmarks/results/kernels_h100.txt), keyed
# (path, bits, N out, K in, m_bucket(M)); other shapes use default_config.
TUNED: dict[tuple[str, int, int, int, int], KernelConfig] = {
    # M = 1: CUDA-core gemv (it beat the tensor-core kernel at every measured shape and bit width)
    ("gemv", 2, 4096, 4096, 1): KernelConfig(32, 512, 4, 2, split=4),
    ("gemv", 2, 4096, 11008, 1): KernelConfig(32, 512, 4, 2, split=4),
    ("gemv", 2, 5120, 13824, 1): KernelConfig(32, 512, 4, 2, split=4),
    ("gemv", 2, 11008, 4096, 1): KernelConfig(32, 512, 4, 2, split=4),
    ("gemv", 2, 13824, 5120, 1): KernelConfig(32, 512, 4, 2, split=4),
    ("gemv", 3, 4096, 4096, 1): KernelConfig(8, 512, 4, 2, split=4),
    ("gemv", 3, 4096, 11008, 1): KernelConfig(8, 512, 4, 2, split=4),
    ("gemv", 3, 5120, 13824, 1): KernelConfig(8, 512, 4, 2, split=4),
    ("gemv", 3, 11008, 4096, 1): KernelConfig(8, 512, 4, 2, split=4),
    ("gemv", 3, 13824, 5120, 1): KernelConfig(8, 512, 4, 2, split=4),
    ("gemv", 4, 4096, 4096, 1): KernelConfig(32, 512, 4, 2, split=4),
    ("gemv", 4, 4096, 11008, 1): KernelConfig(32, 512, 4, 2, split=4),
    ("gemv", 4, 5120, 13824, 1): KernelConfig(16, 512, 4, 2, split=2),
    ("gemv", 4, 11008, 4096, 1): KernelConfig(16, 512, 4, 2, split=2),
    ("gemv", 4, 13824, 5120, 1): KernelConfig(16, 512, 4, 2, split=2),
    # 2 <= M <= 16: tensor cores (fp16 decode for 2/4 bits, fp32 decode for 3 bits)
    ("tc", 2, 4096, 4096, 16): KernelConfig(128, 128, 4, 2, split=8),
    ("tc", 2, 4096, 11008, 16): KernelConfig(128, 128, 4, 2, split=8),
    ("tc", 2, 5120, 13824, 16): KernelConfig(128, 128, 4, 2, split=8),
    ("tc", 2, 11008, 4096, 16): KernelConfig(128, 128, 4, 2, split=4),
    ("tc", 2, 13824, 5120, 16): KernelConfig(128, 128, 4, 2, split=2),
    ("tc", 4, 4096, 4096, 16): KernelConfig(128, 128, 4, 2, split=8),
    ("tc", 4, 4096, 11008, 16): KernelConfig(128, 128, 4, 2, split=8),
    ("tc", 4, 5120, 13824, 16): KernelConfig(128, 128, 4, 2, split=8),
    ("tc", 4, 11008, 4096, 16): KernelConfig(128, 128, 4, 2, split=4),
    ("tc", 4, 13824, 5120, 16): KernelConfig(128, 64, 4, 2, split=4),
    ("dot", 3, 4096, 4096, 16): KernelConfig(16, 256, 4, 2, split=4),
    ("dot", 3, 4096, 11008, 16): KernelConfig(16, 256, 4, 2, split=4),
    ("dot", 3, 5120, 13824, 16): KernelConfig(16, 256, 4, 2, split=4),
    ("dot", 3, 11008, 4096, 16): KernelConfig(16, 256, 4, 2, split=4),
    ("dot", 3, 13824, 5120, 16): KernelConfig(16, 256, 4, 2, split=4),
    # M = 1, K-major kernel: best of 96 configs per shape on an H200 (kernels_kmajor_h200.txt, --wide)
    ("kmajor", 2, 4096, 4096, 1): KernelConfig(256, 64, 2, 3, split=16),
    ("kmajor", 2, 4096, 11008, 1): KernelConfig(256, 128, 2, 3, split=16),
    ("kmajor", 2, 11008, 4096, 1): KernelConfig(256, 128, 2, 2, split=16),
    ("kmajor", 4, 4096, 4096, 1): KernelConfig(256, 64, 2, 3, split=16),
    ("kmajor", 4, 4096, 11008, 1): KernelConfig(256, 64, 2, 3, split=32),
    ("kmajor", 4, 11008, 4096, 1): KernelConfig(256, 64, 2, 3, split=16),
}

# Paths by batch rows M (choose_path): tensor cores up to DOT_MAX_M rows, else dequantize + cuBLAS; the CUDA-core
# gemv at M <= GEMV_MAX_M where tc is unsupported, and at M = 1 for the bit widths in GEMV_AT_M1.
GEMV_MAX_M = 1
DOT_MAX_M = 64
GEMV_AT_M1: tuple[int, ...] = (2, 3, 4, 8)
# The M = 1 kernel where the slab layout applies (slab_ok): "gemv" (stored layout), "slab", "slab16" or "kmajor"
# (where kmajor does not apply, i.e. bf16 activations or 8 bits, the stored-layout gemv runs).
GEMV_M1 = "kmajor"  # the fastest at every measured shape and bit width (kernels_kmajor_h200.txt)
M1_PATHS = ("gemv", "slab", "slab16", "kmajor")


def unit_geometry(bits: int) -> tuple[int, int]:
    """(codes per unit, words per unit): 32/b codes in one word for b in {2, 4, 8}; 32 codes in 3 words for b = 3."""
    return (32, 3) if bits == 3 else (32 // bits, 1)


def default_config(path: str, bits: int, N: int, K: int, M: int = 1, group_size: int = 128) -> KernelConfig:
    """A reasonable config when the shape is not in TUNED: enough programs along N and K to fill 132 SMs."""
    uc, _ = unit_geometry(bits)
    if path == "kmajor":
        # what the H200 sweep picked for every 7B shape: 256 rows (2 warps side by side, 4 rows per thread),
        # 16 K splits, Triton's pipelined loop; one slab per step at 2 bits, half of one at 4
        return KernelConfig(256, 128 if bits == 2 else 64, 2, 3, split=16)
    if path in ("slab", "slab16"):
        # 64 rows x 4 slabs: each thread holds 16-byte word runs of 4 rows (see triton_slab), 128 registers
        bn = 64
        split = max(1, min(8, (132 * 8) // max(1, -(-N // bn))))
        return KernelConfig(bn, 512, 4, 2, split=split)
    if path == "gemv":
        bn, bk = 32, max(512, uc)
        split = max(1, min(8, (132 * 8) // max(1, -(-N // bn))))
        return KernelConfig(bn, bk, 4, 2, split=split)
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    if path == "tc":
        bn = 64
        # a K tile inside one group lets the scales be applied after the dot (see _tc_kernel)
        bk = next((b for b in (128, 64, 32, 16) if group_size % b == 0 and b >= uc), 128)
        split = max(1, min(8, (132 * 4) // max(1, -(-N // bn) * -(-M // bm))))
        return KernelConfig(bn, bk, 4, 2, bm=bm, split=split)
    if path == "dot":
        bn = 64
        split = max(1, min(8, (132 * 4) // max(1, -(-N // bn) * -(-M // bm))))
        return KernelConfig(bn, max(128, uc), 4, 2, bm=bm, split=split)
    return KernelConfig(32, max(256, uc), 4, 1)


def load_tuned_json(path: str) -> int:
    """Put the configs of a ``benchmarks/kernels.py --tuned-json`` file into TUNED, over what is there.

    Returns the number of entries. For benchmarks that time a freshly swept table in the run that swept it.
    """
    with open(path) as f:
        entries = json.load(f)
    for e in entries:
        TUNED[tuple(e["key"])] = KernelConfig(
            e["bn"], e["bk"], e["num_warps"], e["num_stages"], split=e["split"],
            prefetch=e.get("prefetch", False), pdl=e.get("pdl", 0),
        )  # fmt: skip
    return len(entries)


def m_bucket(M: int) -> int:
    """Batch-size bucket of the TUNED table: 1, 16 (2..16 rows) or 64 (more)."""
    return 1 if M == 1 else (16 if M <= 16 else 64)


def pick_config(path: str, bits: int, N: int, K: int, M: int = 1, group_size: int = 128) -> KernelConfig:
    cfg = TUNED.get((path, bits, N, K, m_bucket(M)))
    base = default_config(path, bits, N, K, M, group_size)
    if cfg is None:
        return base
    if path in ("dot", "tc"):
        cfg = cfg.replace(bm=base.bm)
    if path == "tc" and group_size % cfg.bk and K > group_size:
        cfg = cfg.replace(bk=base.bk)  # keep K tiles inside one group
    return cfg


def n_units(K: int, bits: int) -> int:
    """Units per row: K padded to a multiple of 32 codes, divided by the codes per unit."""
    return (K + 31) // 32 * (32 // unit_geometry(bits)[0])


def split_sizes(n_units: int, bu: int, split: int) -> tuple[int, int]:
    """(units per split, number of splits) for ``split`` requested splits of n_units along K.

    Units per split is a multiple of the tile (bu units) and no split is empty.
    """
    per_split = (n_units + split - 1) // split
    per = (per_split + bu - 1) // bu * bu
    return per, -(-n_units // per)


def gsub(bk: int, group_size: int, n_groups: int) -> int:
    """Columns per chunk that lie inside one group (see module docstring)."""
    return bk if n_groups == 1 else min(bk, group_size & -group_size)


def tc_supported(bits: int, group_size: int, n_groups: int) -> bool:
    """The fp16-decode tensor-core kernel handles 2/4/8 bits with groups of whole words (or one group)."""
    uc = unit_geometry(bits)[0]
    return bits in (2, 4, 8) and (n_groups == 1 or group_size % uc == 0)


def slab_ok(bits: int, group_size: int, n_groups: int) -> bool:
    """The slab layout applies: 2/4/8 bits and groups of whole words (or one group per row)."""
    return bits in (2, 4, 8) and (n_groups == 1 or group_size % (32 // bits) == 0)


def kmajor_ok(bits: int, group_size: int, n_groups: int) -> bool:
    """The K-major kernel applies: 2 or 4 bits and the slab layout (fp16 activations are checked by the caller)."""
    return bits in (2, 4) and slab_ok(bits, group_size, n_groups)


def choose_path(
    M: int, bits: int, group_size: int, n_groups: int, m1: str | None = None, half: bool = True
) -> str:
    """Kernel for M activation rows: fp16-decode tensor cores where supported (2/4/8 bits), CUDA-core gemv or the
    fp32-decode tensor-core kernel otherwise, dequantize + cuBLAS for large M.

    ``m1`` overrides GEMV_M1 (the kernel at M = 1 where the slab layout applies); ``half``: the activations
    are fp16 (the K-major kernel needs them).
    """
    m1 = m1 or GEMV_M1
    if m1 not in M1_PATHS:
        raise ValueError(f"unknown M = 1 kernel {m1!r}; use one of {M1_PATHS}")
    if M == 1 and m1 == "kmajor":
        m1 = "kmajor" if half and kmajor_ok(bits, group_size, n_groups) else "gemv"
    if M == 1 and m1 != "gemv" and slab_ok(bits, group_size, n_groups):
        return m1
    if M > DOT_MAX_M:
        return "dequant"
    if tc_supported(bits, group_size, n_groups) and not (M == 1 and bits in GEMV_AT_M1):
        return "tc"
    return "gemv" if M <= GEMV_MAX_M else "dot"
