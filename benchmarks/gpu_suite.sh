#!/usr/bin/env bash
# The GPU benchmarks that need no trained model, in one lease: compression time (GPTQ/RTN per layer and per
# 7B block), codebook quantizers at 7B shapes, 7B-scale CASP+GPTQ compression (2 of 32 blocks, projected),
# and the KV-cache memory/throughput run. Each step has its own time limit. Usage (on the GPU machine):
#   OUT=results_dir bash benchmarks/gpu_suite.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 100 python3 benchmarks/compress_time.py --device cuda --out "$OUT/compress_time_h100.txt"
timeout 140 python3 benchmarks/codebook_quantizers.py --device cuda --out "$OUT/codebook_quantizers_h100.txt"
timeout 240 python3 benchmarks/scale.py --device cuda --layers 2 --samples 16 --out "$OUT/scale_h100.txt"
timeout 130 python3 benchmarks/kv_cache.py --gpu --out "$OUT/kv_cache_h100.txt"
