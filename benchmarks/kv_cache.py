"""KV-cache benchmark (fp16 vs AKVQ-VL vs KIVI vs uniform 2-bit, and the AKVQ-VL ablation).

The code lives in casp/kv/bench.py so that the installed `casp kv-bench` command runs it too; this script
is the same entry point for a checkout:
    python benchmarks/kv_cache.py --gpu --out benchmarks/results/kv_cache_h100.txt
"""

import os
import sys

# Run as a script, this folder leads sys.path and its kernels.py would shadow the `kernels` package that
# transformers probes: put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from casp.kv.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
