"""Python-level profile (cProfile) of AKVQ-VL decode steps on the GPU: where the host time per step goes.

Prefills ``--batch`` 600-token prompts (LLaVA-1.5-7B-shaped LM, random fp16, fused KV attention, 32-token
fp16 window), times 1, 8 and 32 decode steps, then prints cProfile's top functions over 16 steps.

    python benchmarks/cprofile_kv_decode.py --batch 160 > benchmarks/results/kv_decode_cprofile_b160_h100.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.profile_kv_prefill import decode, prefill  # noqa: E402
from casp.kv import AKVQCache, AKVQConfig  # noqa: E402
from casp.kv.attention import enable_fused_kv_attention  # noqa: E402
from casp.kv.bench import llava7b_language_model  # noqa: E402
from casp.models import get_adapter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=160)
    args = ap.parse_args()
    model = llava7b_language_model(torch.device("cuda"))
    enable_fused_kv_attention(model)
    adapter = get_adapter(model)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, 600), device="cuda")
    image_mask = torch.zeros(args.batch, 600, dtype=torch.bool, device="cuda")
    image_mask[:, 5:581] = True
    _, cache = prefill(model, lambda: AKVQCache(model, AKVQConfig(bits=2, residual=32), adapter), ids, image_mask, 128)
    decode(model, cache, args.batch, 2)  # warm-up
    for n in (1, 8, 32):
        print(f"steps {n}: {1e3 * decode(model, cache, args.batch, n) / n:.1f} ms per step")
    prof = cProfile.Profile()
    prof.enable()
    decode(model, cache, args.batch, 16)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
    stats.print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    print(out.getvalue())


if __name__ == "__main__":
    main()
