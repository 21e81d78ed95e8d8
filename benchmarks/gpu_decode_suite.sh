#!/usr/bin/env bash
# The kernel and decode measurements still owed to issue #9, each step under its own time limit so that a
# part of the suite still leaves results. Two device calls of at most 600 s each:
#   OUT=dir PART=1 bash benchmarks/gpu_decode_suite.sh   # kernels: dispatch check, K-major wide sweep, read floor
#   OUT=dir PART=2 bash benchmarks/gpu_decode_suite.sh   # whole model: hand-written 7B decode, casp generate path
#                                                        # at batch 1 and 8, graph decode checks (batched eval)
# PART=2 reads $OUT/tuned.json when PART=1 left one there (same OUT); GPU name goes into each file's header.
PART=${PART:-1}
. "$(dirname "$0")/suite_env.sh" "_$PART"
if [ "$PART" = 1 ]; then
    timeout 150 python3 benchmarks/gpu_check_kernels.py --only old --out "$OUT/gpu_check_kernels_$tag.txt"
    timeout 330 python3 benchmarks/kernels.py --batches 1 --bits 2,4 --shapes 4096x4096,11008x4096,4096x11008 \
        --m1-paths gemv,kmajor --sweep-paths kmajor --wide --sweep-log "$OUT/kernels_kmajor_wide_$tag.log" \
        --tuned-json "$OUT/tuned.json" --out "$OUT/kernels_kmajor_wide_$tag.txt"
    timeout 90 python3 benchmarks/gemv_floor.py --out "$OUT/gemv_floor_$tag.txt"
else
    tuned=()
    [ -f "$OUT/tuned.json" ] && tuned=(--tuned "$OUT/tuned.json")
    timeout 150 python3 benchmarks/decode_7b.py "${tuned[@]}" --m1 gemv,kmajor --no-mix --tokens 64 --eager-tokens 8 \
        --out "$OUT/decode_7b_$tag.txt"
    timeout 200 python3 benchmarks/generate_7b.py --tokens 64 --repeats 3 --out "$OUT/generate_7b_$tag.txt"
    timeout 120 python3 benchmarks/generate_7b.py --tokens 64 --repeats 2 --batch 8 --out "$OUT/generate_7b_b8_$tag.txt"
    timeout 80 python3 benchmarks/gpu_check_graph_decode.py --out "$OUT/gpu_check_graph_decode_$tag.txt"
fi
