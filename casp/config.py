"""CompressionConfig: the whole recipe of one compression run, validated, versioned, stored in checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any

CONFIG_VERSION = 1
METHODS = ("plain", "casp")
QUANTIZERS = ("rtn", "gptq", "aqlm", "quip")
ALLOCS = ("uniform", "optimal")
RANKS = ("fixed", "adaptive")
VISION = ("skip", "quantize")
IMPORTANCE = ("none", "fisher")


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """What ``casp compress`` does.

    bits: with ``alloc="uniform"``, the code width every linear gets (2, 3, 4 or 8; scales and zeros come
    on top, e.g. 2-bit group-128 is ~2.25 bits per weight). With ``alloc="optimal"``, the target average
    bits per ORIGINAL parameter of the compressed linears, every overhead counted (e.g. 2.25).
    """

    method: str = "plain"  # plain: quantization only; casp: whitened low-rank Q/K, then quantization
    quantizer: str = "gptq"
    bits: float = 4
    group_size: int = 128
    alloc: str = "uniform"
    candidate_bits: tuple[int, ...] = (2, 3, 4)
    rank_ratio: float = 0.25
    ranks: str = "fixed"
    vision: str = "skip"
    importance: str = "none"  # fisher: weight each layer's error by its end-to-end loss sensitivity
    balance_factors: bool = True  # match the norms of A's columns and B's rows before quantizing
    rotate_factors: bool = True  # randomized Hadamard of the rank dimension (measured: lowrank_rotation.txt)
    true_sequential: bool = True
    quant_options: dict = dataclasses.field(default_factory=dict)  # extra fields of the quantizer's config
    samples: int = 32
    max_length: int = 512
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self):
        def check(value, allowed, name):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")

        check(self.method, METHODS, "method")
        check(self.quantizer, QUANTIZERS, "quantizer")
        check(self.alloc, ALLOCS, "alloc")
        check(self.ranks, RANKS, "ranks")
        check(self.vision, VISION, "vision")
        check(self.importance, IMPORTANCE, "importance")
        if self.alloc == "uniform" and self.quantizer in ("rtn", "gptq") and self.bits not in (2, 3, 4, 8):
            raise ValueError(
                f"--bits {self.bits} with --alloc uniform: code widths are 2, 3, 4 or 8; for a fractional "
                "average such as 2.25 use --alloc optimal"
            )
        if not 1.0 <= self.bits <= 16:
            raise ValueError(f"bits must be between 1 and 16, got {self.bits}")
        if not 0.0 < self.rank_ratio < 1.0:
            raise ValueError(f"rank_ratio must be in (0, 1), got {self.rank_ratio}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per output channel), got {self.group_size}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["candidate_bits"] = list(self.candidate_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionConfig:
        if d.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise ValueError(
                f"compression config version {d['version']} is newer than this casp ({CONFIG_VERSION}); upgrade casp"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        if "candidate_bits" in d:
            d["candidate_bits"] = tuple(d["candidate_bits"])
        return cls(**d)
