#!/usr/bin/env bash
# GPU check of the kernels: on a machine with one CUDA GPU and no network, run every kernel test on the GPU
# (compiled Triton, no interpreter) and every kernel benchmark, and write one markdown file of the results.
#
#   bash kernels/bench/gpu_check.sh [OUT.md]        (default: gpu_check.md in the repository root)
#
# Budget: under 8 minutes in all; each stage has its own time limit, and a stage that runs out leaves what it
# printed so far in the file. Benchmarks time one size each at the issue's targets (block-sparse: T = 32k,
# 1/8 density, head dim 128, bf16); peak memory is measured for Pattention only (its target is a memory one).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-gpu_check.md}
export PYTHONPATH=$PWD TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TRITON_CACHE_AUTOTUNING=1  # autotuning results kept across the benchmark's fresh processes

stage() {  # stage SECONDS TITLE COMMAND...: run with a time limit, its output as a code block
    local limit=$1 title=$2
    shift 2
    local t0=$SECONDS
    echo "## $title"
    echo
    echo '```'
    timeout "$limit" "$@" 2>&1 | tail -n 60
    local rc=${PIPESTATUS[0]}
    echo '```'
    echo
    echo "exit status $rc$([ "$rc" = 124 ] && echo ' (time limit reached)'), $((SECONDS - t0)) s: \`$*\`"
    echo
}

{
    echo "# Kernel GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    python - <<'PY'
import torch, triton
print(f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}")
PY
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    # tests: one kernel config each (KERNELS_AUTOTUNE=0), compiled for the GPU
    stage 230 "Kernel tests on the GPU" env KERNELS_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider tests/kernels
    stage 150 "Benchmark: block-sparse attention" python -m kernels.bench block_sparse --no-memory --rounds 10 \
        --size T=32768,H=16,Hkv=16,hd=128,block=128,selected=32
    stage 60 "Benchmark: Pattention" python -m kernels.bench pattention --rounds 10 --size tokens=32768,d=1024,n=4096
    stage 45 "Benchmark: routed FFN" python -m kernels.bench routed_ffn --no-memory --rounds 10
} > "$OUT"
echo "wrote $OUT"
