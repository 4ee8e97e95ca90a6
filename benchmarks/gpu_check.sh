#!/usr/bin/env bash
# The prepared GPU session for issue 6, to run in one go on a CUDA machine (e.g. the H200 device:
# its system python3 has torch, numpy, scipy, einops, pillow, pytest, tqdm, scikit-learn).
#   1. the CUDA tests: graph replay == eager engine == textbook loop (float32, bf16), denoising
#      and GS-Jacobi under bf16 autocast on CUDA;
#   2. the timing table of benchmarks/sampling.py for the four published configurations at batch
#      32 (the issue's headline: AFHQ-256 engine >= 80x textbook, within 5x of two forward passes),
#      then batch 1, 8, 128 as time allows.
# Logs and JSON go to $OUT (default ./gpu_out). Each step has its own time limit so that a hang
# cannot eat the whole device budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/env.txt"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_denoise.py tests/test_jacobi.py \
    -k "cuda or bf16" -m "not fullsize" 2>&1 | tee "$OUT/pytest_cuda.log"
CONFIGS="afhq_model_8_768_8_8_0.07.pth imagenet_model_4_1024_8_8_0.15.pth imagenet64_model_2_768_8_8_0.05.pth imagenet_model_4_1024_8_8_0.05.pth"
timeout 300 "$PY" benchmarks/sampling.py --configs $CONFIGS --batch 32 --max-textbook-steps 128 \
    --json "$OUT/sampling_b32.json" 2>&1 | tee "$OUT/sampling_b32.log"
timeout 240 "$PY" benchmarks/sampling.py --configs $CONFIGS --batch 1 8 128 --max-textbook-steps 64 \
    --json "$OUT/sampling_b1_8_128.json" 2>&1 | tee "$OUT/sampling_b1_8_128.log"
