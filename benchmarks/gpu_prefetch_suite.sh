#!/usr/bin/env bash
# Issue #9, batch 1: the K-major kernel with L2 bulk prefetch and programmatic dependent launch (PDL), in one
# device call of at most 600 s, each step under its own time limit so that a part still leaves results:
#   OUT=dir bash benchmarks/gpu_prefetch_suite.sh
# 1. the PDL chain check (layer i+1 reads layer i's output; eager and graph replays equal the chain without PDL);
# 2. kernels.py over PREFETCH_GRID at batch 1 (2 and 4 bits, the LLaMA-7B shapes), fp16 F.linear in the same run;
# 3. whole-model decode (generate_7b.py, batch 1) with the configs step 2 found best.
. "$(dirname "$0")/suite_env.sh"
timeout 100 python3 benchmarks/gpu_check_kernels.py --only chain --out "$OUT/gpu_check_chain_$tag.txt"
timeout 300 python3 benchmarks/kernels.py --batches 1 --bits 2,4 --shapes 4096x11008,11008x4096,4096x4096 \
    --m1-paths kmajor --sweep-paths kmajor --wide --kmajor-grid prefetch --sweep-log "$OUT/kernels_prefetch_$tag.log" \
    --tuned-json "$OUT/tuned_prefetch.json" --out "$OUT/kernels_prefetch_$tag.txt"
tuned=()
[ -f "$OUT/tuned_prefetch.json" ] && tuned=(--tuned "$OUT/tuned_prefetch.json")
timeout 130 python3 benchmarks/generate_7b.py "${tuned[@]}" --tokens 64 --repeats 3 --out "$OUT/generate_7b_prefetch_$tag.txt"
