"""Effect of the K-major kernel's launch options in a ``kernels.py --kmajor-grid prefetch --sweep-log`` log.

For every config without prefetch and PDL, the time with one option changed over the time without it; prints the
median, min and max of those ratios over all (shape, bits, config) of the log, and the best time per row with and
without the options. No GPU needed:

    python benchmarks/option_effect.py benchmarks/results/kernels_prefetch_h100.log
"""

from __future__ import annotations

import argparse
import re
import statistics

LINE = re.compile(
    r"(\S+) b(\d) M=1 kmajor KernelConfig\((\d+), (\d+), (\d+), (\d+), bm=\d+, split=(\d+)"
    r"(, prefetch=True)?(?:, pdl=(\d))?\): ([\d.]+) us"
)
# (label, (prefetch, pdl) with the option, (prefetch, pdl) it is compared with)
PAIRS = [
    ("prefetch", (True, 0), (False, 0)),
    ("PDL 1", (False, 1), (False, 0)),
    ("PDL 2", (False, 2), (False, 0)),
    ("prefetch + PDL 2 vs PDL 2", (True, 2), (False, 2)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    args = ap.parse_args()
    times = {}
    with open(args.log) as f:
        for line in f:
            m = LINE.match(line)
            if m:
                shape, bits, bn, bk, warps, stages, split, pf, pdl, us = m.groups()
                times[(shape, bits, bn, bk, warps, stages, split, bool(pf), int(pdl or 0))] = float(us)
    plain = [k[:7] for k in times if k[7:] == (False, 0)]
    print(f"{len(times)} timed configs, {len(plain)} without options")
    for label, with_opt, without in PAIRS:
        ratios = [times[k + with_opt] / times[k + without] for k in plain if k + with_opt in times]
        print(f"{label:<26} time ratio median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
              f"max {max(ratios):.3f} over {len(ratios)} configs")  # fmt: skip
    for row in sorted({k[:2] for k in times}):
        best_plain = min(v for k, v in times.items() if k[:2] == row and k[7:] == (False, 0))
        best, key = min((v, k) for k, v in times.items() if k[:2] == row)
        print(f"{row[0]} {row[1]}-bit: best without options {best_plain:.2f} us; best of all {best:.2f} us "
              f"(split {key[6]}, prefetch {int(key[7])}, pdl {key[8]})")  # fmt: skip


if __name__ == "__main__":
    main()
