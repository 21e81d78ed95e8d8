#!/usr/bin/env bash
# The GPU rows of the two quality tables, run side by side on one GPU (the models are small: each job keeps the
# GPU only partly busy, so four at once finish in about the time of the slowest):
#   1. SmolLM2 perplexity grid (benchmarks/quality.py): the CASP + AQLM cells at 2 / 2.25 / 3 / 4 bits, added to
#      a copy of benchmarks/results/quality_smollm2.json;
#   2-5. the real-parts VLM table (benchmarks/real_parts_vlm.py) at 2.0 / 2.25 / 3 bits, plain and CASP, in four
#      jobs (AQLM; plain QuIP#; CASP + QuIP#; RTN and GPTQ), each resumable in its own folder.
# Needs the pretrained parts in ~/.cache/casp (`casp fetch parts`, and Debian's jargon-text corpus, see
# casp/realmodels/corpus.py). Usage: bash benchmarks/gpu_quality_rows.sh RESULTS_DIR [THREADS_PER_JOB]
set -u
res=${1:?usage: gpu_quality_rows.sh RESULTS_DIR [THREADS_PER_JOB]}
threads=${2:-3}
mkdir -p "$res"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$threads
[ -f "$res/quality_smollm2.json" ] || cp benchmarks/results/quality_smollm2.json "$res/quality_smollm2.json"
python3 benchmarks/quality.py --methods casp-aqlm --levels 2,2.25,3,4 --device cuda --threads "$threads" \
    --out "$res/quality_smollm2" --work "$res/quality_work" --no-analysis >"$res/quality.log" 2>&1 &
for job in aqlm:plain,casp quip:plain quip:casp rtn,gptq:plain,casp; do
    quantizers=${job%%:*} methods=${job##*:}
    name=rpv_${quantizers/,/_}_${methods/,/_}
    python3 benchmarks/real_parts_vlm.py casp/demo/assets/realvlm --out "$res/$name" --device cuda \
        --skip-fp16 --skip-analysis --skip-kv --n-vqa 200 --n-captions 50 --calib-samples 32 \
        --quantizers "$quantizers" --methods "$methods" --bits 2.0,2.25,3 >"$res/$name.log" 2>&1 &
done
wait
echo "all jobs finished"
