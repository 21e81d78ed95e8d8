#!/usr/bin/env bash
# Issue #9, batch 1: where do the K-major kernel's 10 us (2-bit 4096x11008, H100) go? Three measurements that split
# its time into HBM reads and the kernel's own work, in one device call of at most 600 s (each step time-boxed):
#   OUT=dir bash benchmarks/gpu_diagnose_suite.sh
# 1. the K-major read floor: its grids and tiles reading the K-major words and scale rows, no arithmetic
#    (gemv_floor.py --layout kmajor), with and without the split-K epilogue;
# 2. the kernels with their weights resident in L2 (kernels.py --l2-resident): the time without HBM;
# 3. Nsight Compute on the default config (2 and 4 bits) and with the L2 prefetch (clocks left alone).
# If (1) is ~7 us and (2) ~9 us, the kernel's work is the bottleneck, not its reads; (3) says which stalls.
. "$(dirname "$0")/suite_env.sh"
timeout 150 python3 benchmarks/gemv_floor.py --layout kmajor --top 4 --out "$OUT/gemv_floor_kmajor_$tag.txt"
timeout 120 python3 benchmarks/kernels.py --l2-resident --batches 1 --bits 2,4 \
    --shapes 4096x11008,11008x4096,4096x4096 --m1-paths gemv,kmajor --out "$OUT/kernels_l2_resident_$tag.txt"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
for v in "2" "2 --prefetch" "4"; do
    set -- $v
    name="ncu_kmajor_b$1${2:+_prefetch}_$tag.txt"
    timeout 90 "$NCU" --clock-control none --launch-skip 40 --launch-count 1 -k regex:kmajor_gemv \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section LaunchStats --section MemoryWorkloadAnalysis \
        python3 benchmarks/ncu_kmajor.py --bits $v > "$OUT/$name" 2>&1
    grep -E "Duration|DRAM Throughput|Achieved Occupancy|Issued Warp|No Eligible|Eligible Warps|Warp Cycles Per Issued" \
        "$OUT/$name" | sed "s/^/$name /"
done
