#!/usr/bin/env bash
# "kmajor-only" mode (the K-major layout alone on the GPU, every batch size on it: casp/kernels/triton_kmajor_mm.py)
# in one device call of at most 600 s, each step under its own time limit so that a part still leaves results:
#   OUT=dir bash benchmarks/gpu_kmajor_only_suite.sh
# 1. correctness: 182 kernel cases against the fp32 reference and the torch path, and the GPU memory of both modes;
# 2. the user's path: graph decode checks and `casp eval --speed` on the 2-bit demo model in each --batch1-kernel
#    mode (answers, tok/s, peak memory), never run on a GPU before;
# 3. layer times of both modes next to fp16 F.linear, batch 1 to 2048 (kmajor_only.py);
# 4. whole 7B-shaped model: decode tok/s, prefill of a 512-token prompt and GPU memory, fp16 vs both modes;
# 5. the codebook formats, dispatched to Triton since 2026-12-08 (AQLM: GEMV at one row, else dequantize + cuBLAS;
#    QuIP#: decode + cuBLAS): QuantLinear checks, then their times vs fp16 and vs the torch path they replaced.
. "$(dirname "$0")/suite_env.sh"
timeout 150 python3 benchmarks/gpu_check_kernels.py --only kmajor-only --out "$OUT/gpu_check_kmajor_only_$tag.txt"
timeout 100 python3 benchmarks/gpu_check_graph_decode.py --out "$OUT/gpu_check_graph_decode_$tag.txt"
timeout 100 python3 benchmarks/kmajor_only.py --shapes 4096x4096,11008x4096,4096x11008 \
    --out "$OUT/kmajor_only_$tag.txt"
timeout 140 python3 benchmarks/generate_7b.py --batch1-kernel kmajor,kmajor-only --prompt 512 --tokens 64 \
    --repeats 3 --out "$OUT/generate_7b_kmajor_only_$tag.txt"
# 5. AQLM / QuIP# through QuantLinear's dispatch, then their times
timeout 40 python3 benchmarks/gpu_check_kernels.py --only codebooks --out "$OUT/gpu_check_codebooks_$tag.txt"
timeout 70 python3 benchmarks/kernels.py --aqlm --quip --batches 1 --bits 2 --m1-paths kmajor \
    --shapes 4096x4096,11008x4096,4096x11008 --out "$OUT/kernels_codebooks_$tag.txt"
