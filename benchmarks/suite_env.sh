# Sourced by the benchmarks/gpu_*_suite.sh scripts: unbuffered Python with the repository on its path, the output
# folder $OUT (default benchmarks/results), $tag (h100 / h200 / gpu, for file names) and the GPU's name in
# $OUT/gpu$1.txt.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
tag=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu${1:-}.txt"
