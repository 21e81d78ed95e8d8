#!/usr/bin/env bash
# The GPU rows of the two quality tables, run side by side on one GPU. The models are small, so one job keeps the
# GPU only partly busy; the jobs are:
#   - SmolLM2 perplexity grid (benchmarks/quality.py): the CASP + AQLM cells at 2 / 2.25 / 3 / 4 bits, on copies
#     of benchmarks/results/quality_smollm2.json (one per level: merge the "runs" afterwards);
#   - the real-parts VLM table (benchmarks/real_parts_vlm.py) at 2.0 / 2.25 / 3 bits: plain AQLM, plain QuIP#,
#     RTN and GPTQ (plain and CASP), CASP + AQLM and CASP + QuIP#.
# A CASP sensitivity table does not depend on the target, so for each codebook quantizer the first target measures
# it (the slow part: every layer at 2, 3 and 4 bits) and the other targets start once it is complete, reading it.
# Needs the pretrained parts in ~/.cache/casp (`casp fetch parts`, and Debian's jargon-text corpus, see
# casp/realmodels/corpus.py). Usage: bash benchmarks/gpu_quality_rows.sh RESULTS_DIR [THREADS_PER_JOB]
set -u
res=${1:?usage: gpu_quality_rows.sh RESULTS_DIR [THREADS_PER_JOB]}
threads=${2:-2}
blocks=30 # SmolLM2-135M's decoder blocks
mkdir -p "$res"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$threads

wait_for_files() { # wait_for_files GLOB COUNT: until COUNT files match GLOB
    until [ "$(compgen -G "$1" | wc -l)" -ge "$2" ]; do sleep 10; done
}

quality() { # quality LEVEL
    local stem=$res/quality_smollm2_$1
    [ -f "$stem.json" ] || cp benchmarks/results/quality_smollm2.json "$stem.json"
    python3 benchmarks/quality.py --methods casp-aqlm --levels "$1" --device cuda --threads "$threads" \
        --out "$stem" --work "$res/quality_work" --no-analysis >"$stem.log" 2>&1
}

rpv() { # rpv NAME QUANTIZERS METHODS BITS [more real_parts_vlm.py options]
    local name=$1 quantizers=$2 methods=$3 bits=$4
    shift 4
    python3 benchmarks/real_parts_vlm.py casp/demo/assets/realvlm --out "$res/rpv_$name" --device cuda \
        --skip-fp16 --skip-analysis --skip-kv --n-vqa 200 --n-captions 50 --calib-samples 32 \
        --quantizers "$quantizers" --methods "$methods" --bits "$bits" "$@" >"$res/rpv_$name.log" 2>&1
}

fan_out_rpv() { # fan_out_rpv QUANTIZER: CASP at 2.0 measures the table, 2.25 and 3 wait for it
    local q=$1 sens=$res/sensitivity_$1
    rpv "casp_${q}_2.0" "$q" casp 2.0 --sensitivity-cache "$sens" &
    wait_for_files "$sens/sensitivity_*_00$((blocks - 1)).json" 1
    rpv "casp_${q}_2.25" "$q" casp 2.25 --sensitivity-cache "$sens" &
    rpv "casp_${q}_3" "$q" casp 3 --sensitivity-cache "$sens" &
    wait
}

quality 2.25 &
(
    wait_for_files "$res/quality_work/plans/blocks/sensitivity_casp-aqlm-*_00$((blocks - 1)).json" 1
    for level in 2 3 4; do quality "$level" & done
    wait
) &
fan_out_rpv aqlm &
fan_out_rpv quip &
rpv plain_codebooks aqlm,quip plain 2.0,3 &
rpv rtn_gptq rtn,gptq plain,casp 2.0,2.25,3 &
wait
echo "all jobs finished"
