"""Peak temporary memory of the K-major / slab repack (casp.kernels.slab_layout.repack_slabs), in one pass vs in
row chunks (REPACK_CHUNK), measured on the CPU as the growth of the process's peak resident set size. Each
measurement runs in a fresh process, so an earlier peak cannot hide a later one.

    python benchmarks/repack_memory.py --out benchmarks/results/repack_memory_cpu.txt
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import resource, sys, torch
from casp.kernels import slab_layout as sl
N, K, bits, chunk = (int(v) for v in sys.argv[1:5])
qweight = torch.randint(-2**31, 2**31 - 1, (N, K * bits // 32), dtype=torch.int32)
sl.REPACK_CHUNK = chunk
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sl.repack_slabs(qweight, bits, K, sl.slab_words(bits, 128, K))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def peak_growth(N: int, K: int, bits: int, chunk: int) -> int:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(N), str(K), str(bits), str(chunk)], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from casp.kernels.slab_layout import REPACK_CHUNK

    lines = ["peak RSS growth of repack_slabs (group 128), one pass vs chunks of REPACK_CHUNK codes", ""]
    for N, K in ((4096, 11008), (11008, 4096)):
        for bits in (2, 4):
            whole = peak_growth(N, K, bits, 1 << 40)
            chunked = peak_growth(N, K, bits, REPACK_CHUNK)
            lines.append(f"{N}x{K} {bits}-bit: one pass {whole / 1e6:.0f} MB ({whole / (N * K):.1f} bytes per code), "
                         f"chunks of {REPACK_CHUNK} codes {chunked / 1e6:.0f} MB")  # fmt: skip
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
