#!/usr/bin/env bash
# The GPU check (BENCHMARKS.md, "GPU"), for a CUDA machine without network, the repository copied in:
#   1. lib's unit tests of ablation, capture, generation and batch sizes on CUDA with the suite's tiny random Llama
#      (benchmarks/cuda_plugin.py moves lib.models.load onto the GPU), plus benchmarks/cuda_checks.py;
#   2. benchmarks/gpu_bench.py on a random model with Llama-2-7B's shapes in bfloat16 (no weights needed): the
#      paper's batch of 16 and the transfer workload (12 conditions x 520 prompts x 64 tokens), which stops starting
#      conditions after GPU_BUDGET_S seconds (180) and projects the rest;
#   3. the same at the transfer batch (512 prompts), where the paper's loop costs what it saves the GPU at 16.
# Each step has a timeout (8 minutes in all). GPU_BENCH_ARGS: more options for step 2 (e.g. --repeats 9). Python:
# .venv/bin/python if its torch sees CUDA, else python3 (with torch, transformers, peft, ...); nothing is installed.
# Usage: bash benchmarks/gpu.sh [--smoke] (tiny shapes, on the CPU where there is no GPU). Results: $BENCH_OUT, else
# $OUT (the device tool's folder), else artifacts/benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=""
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE="--smoke" ;;
    *) echo "gpu.sh: unknown option $arg (the only option is --smoke)" >&2; exit 2 ;;
  esac
done
RESULTS="${BENCH_OUT:-${OUT:-artifacts/benchmarks}}"
mkdir -p "$RESULTS"
export REFUSAL_BOOK_PROGRESS=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

PY=""
for candidate in .venv/bin/python python3; do
  if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    PY="$candidate"; break
  fi
done
if [ -z "$PY" ] && [ -n "$SMOKE" ]; then
  PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3) && export BENCH_DEVICE=cpu
elif [ -z "$PY" ]; then
  echo "gpu.sh: no Python here sees a CUDA GPU (tried .venv/bin/python and python3); --smoke runs on the CPU." >&2
  exit 2
fi
missing=$("$PY" -c 'import importlib.util as u; print(" ".join(n for n in ["torch", "transformers", "peft",
  "accelerate", "safetensors", "yaml", "tqdm", "numpy", "pandas", "sklearn", "gguf", "pytest",
  "tokenizers"] if u.find_spec(n) is None))')
if [ -n "$missing" ]; then
  echo "gpu.sh: $PY lacks: $missing; carry them as wheels or a .venv made by \`make setup\` on a CUDA machine." >&2
  exit 2
fi
"$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__,
  "| transformers", transformers.__version__, "| cuda", torch.version.cuda)' | tee "$RESULTS/gpu-env.txt"

start=$(date +%s)
echo "== 1/3 lib's tests on ${BENCH_DEVICE:-cuda} (tiny random Llama)"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -p benchmarks.cuda_plugin -m "not slow" \
  tests/lib/test_ablation.py tests/lib/test_capture.py tests/lib/test_generation_judges.py tests/lib/test_batching.py \
  benchmarks/cuda_checks.py 2>&1 | tee "$RESULTS/gpu-tests.txt"
tests_status=${PIPESTATUS[0]}

echo "== 2/3 the paper's batch and the transfer workload on a random Llama-2-7B-shaped model"
timeout 300 "$PY" -m benchmarks.gpu_bench $SMOKE --budget-s "${GPU_BUDGET_S:-180}" ${GPU_BENCH_ARGS:-} \
  --out "$RESULTS" 2>&1 | tee "$RESULTS/gpu-bench.txt"
bench_status=${PIPESTATUS[0]}

echo "== 3/3 lib hooks against the paper's loop at the transfer batch"
timeout 150 "$PY" -m benchmarks.gpu_bench $SMOKE --sections paper_batch --batch-prompts 512 --repeats 1 \
  --loop-repeats 1 --out "$RESULTS/at-scale" 2>&1 | tee "$RESULTS/gpu-bench-at-scale.txt"
scale_status=${PIPESTATUS[0]}

echo "gpu.sh: tests exit $tests_status, benchmarks exit $bench_status and $scale_status," \
  "$(( $(date +%s) - start )) s; results in $RESULTS"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$scale_status" -eq 0 ]
