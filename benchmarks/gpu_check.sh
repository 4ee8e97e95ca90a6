#!/usr/bin/env bash
# The prepared GPU session for issue 6, to run in one go on a CUDA machine (e.g. the H200 device:
# its system python3 has torch, numpy, einops, pillow, pytest, tqdm, triton). Stages, in order
# (STAGES selects and orders them; rough H200 times after the machine has started):
#   tests    the CUDA tests: graph replay == eager engine == textbook loop (float32, bf16),
#            compiled graphs == eager, denoising and GS-Jacobi under bf16 autocast    (~1-2 min)
#   profile  benchmarks/step_profile.py: kernels per step, their GPU time and the gaps between
#            them, P4 and AFHQ layouts at batch 32, eager body and compiled body       (~2-3 min)
#   b32      benchmarks/sampling.py, the four published configurations at batch 32, guidance on,
#            bf16 (the target: AFHQ-256 engine >= 80x textbook, within 5x of two
#            forward passes; (e) = the memory-traffic floor at the measured copy bandwidth)  (~4 min)
#   compile  the AFHQ row again with Engine(compile=True)                               (~2 min)
#   others   batch 1, 8 and 128, engine and textbook from windows of 64 steps            (~4 min)
# Logs and JSON go to $OUT (default ./gpu_out); the JSON is rewritten after every row. Each
# stage has its own time limit so that a hang cannot eat the whole device budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
STAGES=${STAGES:-tests profile b32 compile others}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/env.txt"
AFHQ=afhq_model_8_768_8_8_0.07.pth
P4=imagenet_model_4_1024_8_8_0.05.pth
CONFIGS="$AFHQ imagenet_model_4_1024_8_8_0.15.pth imagenet64_model_2_768_8_8_0.05.pth $P4"
for stage in $STAGES; do
    echo "== $stage $(date +%T)"
    case $stage in
    tests)
        timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_denoise.py \
            tests/test_jacobi.py -k "cuda or bf16" -m "not fullsize" 2>&1 | tee "$OUT/pytest_cuda.log" ;;
    profile)
        for args in "$P4" "$AFHQ" "$AFHQ --compile"; do
            timeout 150 "$PY" benchmarks/step_profile.py --batch 32 --config $args 2>&1 | grep -v USDT
        done | tee "$OUT/step_profile.log" ;;
    b32)
        timeout 420 "$PY" benchmarks/sampling.py --configs $CONFIGS --batch 32 --repeat 1 --max-textbook-steps 64 \
            --json "$OUT/sampling_b32.json" 2>&1 | tee "$OUT/sampling_b32.log" ;;
    compile)
        timeout 240 "$PY" benchmarks/sampling.py --configs $AFHQ --batch 32 --repeat 1 --max-textbook-steps 64 \
            --compile --json "$OUT/sampling_b32_compiled.json" 2>&1 | tee "$OUT/sampling_b32_compiled.log" ;;
    others)
        timeout 300 "$PY" benchmarks/sampling.py --configs $CONFIGS --batch 1 8 128 --repeat 1 --max-steps 64 \
            --json "$OUT/sampling_b1_8_128.json" 2>&1 | tee "$OUT/sampling_b1_8_128.log" ;;
    *)
        echo "unknown stage '$stage' (known: tests profile b32 compile others)"; exit 2 ;;
    esac
done
