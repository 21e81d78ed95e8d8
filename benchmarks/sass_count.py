"""SASS of casp's tensor-core kernels for an H100 (sm_90), counted offline: no GPU needed, only Triton and its ptxas.

For each kernel variant: the instructions of the whole kernel, the most frequent opcodes, and the registers per
thread (cuobjdump -res-usage). Pointers and the N / K / stride arguments are specialized as divisible by 16, as the
runtime does for the 7B shapes. It reproduces the counts in benchmarks/results/kernels_slab_notes.md (session 10):

    python benchmarks/sass_count.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, not benchmarks/

from casp.kernels.triton_kmajor_mm import _kmajor_tc_kernel  # noqa: E402
from casp.kernels.triton_uniform import _tc_kernel  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DIVISIBLE = ("N", "K", "KH", "stride_xm", "stride_ym", "stride_qn", "stride_sn")


def compile_sm90(kernel, types: dict, const: dict, num_warps: int = 4, num_stages: int = 2):
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(types)
    sig.update({name: "constexpr" for name in const})
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in kernel.arg_names
             if n.endswith("_ptr") or n in DIVISIBLE}  # fmt: skip
    constexprs = {(kernel.arg_names.index(n),): v for n, v in const.items()}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass_stats(compiled) -> tuple[int, Counter, int]:
    """(instructions, opcode counts, registers per thread) of a compiled kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True)
    ops = Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    regs = re.search(r"REG:(\d+)", usage.stdout)
    return sum(ops.values()), ops, int(regs.group(1)) if regs else -1


def main() -> None:
    kmajor_ptrs = {"x_ptr": "*i32", "w_ptr": "*i32", "sz_ptr": "*i32", "b_ptr": "*fp16", "y_ptr": "*fp16",
                   "ws_ptr": "*fp32", "cnt_ptr": "*i32"}  # fmt: skip
    stored_ptrs = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "b_ptr": "*fp16",
                   "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}  # fmt: skip
    variants = []
    for bm in (16, 64):
        variants.append((f"K-major tc, 2 bits, {bm} act rows x 64 out rows", _kmajor_tc_kernel, kmajor_ptrs,
                         {"BITS": 2, "WPG": 8, "PRE": 4, "HAS_BIAS": False, "BM": bm, "BN": 64, "SPLIT": 1,
                          "XBF16": False, "F32_DOT": False}))  # fmt: skip
        variants.append((f"stored tc, 2 bits, {bm} act rows x 64 out rows, 128 codes/step", _tc_kernel, stored_ptrs,
                         {"BITS": 2, "UC": 16, "ASM": True, "HAS_BIAS": False, "ONE_GROUP": False, "FACTORED": True,
                          "BM": bm, "BN": 64, "BK": 128, "SPLIT": 1}))  # fmt: skip
    print(f"triton {triton.__version__}, target sm_90, 4 warps, 2 stages")
    for name, kernel, ptrs, const in variants:
        n, ops, regs = sass_stats(compile_sm90(kernel, ptrs, const))
        top = ", ".join(f"{op} {c}" for op, c in ops.most_common(8))
        print(f"{name}: {n} SASS instructions, {regs} registers; {top}")


if __name__ == "__main__":
    main()
