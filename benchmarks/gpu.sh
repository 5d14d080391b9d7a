#!/usr/bin/env bash
# The prepared GPU check of issue 6 (see BENCHMARKS.md), for a CUDA machine WITHOUT network, the repo copied in:
#   1. lib's unit tests (ablation, capture, generation, autobatch) on CUDA with the suite's tiny random Llama
#      (benchmarks/cuda_plugin.py moves lib.models.load onto the GPU), plus benchmarks/cuda_checks.py
#      (hooks = orthogonalised = recompute loop, float32 and bfloat16; capture = output_hidden_states);
#   2. benchmarks/gpu_bench.py: the paper's batch (16 x 64 tokens) and the transfer workload (12 conditions x 520
#      prompts x 64 tokens, bfloat16) on a randomly initialised model with Llama-2-7B's shapes (no weights needed),
#      with the projected wall time against the paper's ~1.7 h.
#   3. benchmarks/hook_variants.py: the ablation hook's body alone (lib's against the alternatives), 65 hooks, the
#      paper's batch, GPU_HOOK_REPEATS (7) interleaved rounds.
# Under 8 minutes end to end: each step has a timeout, and the workload stops starting conditions after
# GPU_BUDGET_S seconds (default 180) and projects the rest. GPU_BENCH_ARGS: more options for gpu_bench (e.g. --repeats 9).
#
# Python: .venv/bin/python if its torch sees CUDA, else python3 if its torch does (a GPU image with torch,
# transformers, peft, accelerate, safetensors, pyyaml, tqdm, pytest preinstalled); nothing is installed.
# Usage: bash benchmarks/gpu.sh [--smoke] [--whole-profile]
#   --smoke: tiny shapes, on the CPU where there is no GPU (a dry run)
#   --whole-profile: instead of 1-3, time every chapter of params/llama2-7b.yaml on a random Llama-2-7B-shaped
#     stand-in (benchmarks/profile_timing.py; wall time and peak GPU memory per chapter), stopped after
#     PROFILE_BUDGET_S seconds (default 420) so that the whole call fits 8 minutes of device time. It needs the book's
#     whole environment (papermill, ipykernel, pandas, altair, scikit-learn as well).
# Results: $BENCH_OUT, else $OUT (the device tool's folder), else artifacts/benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=""
MODE=checks
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE="--smoke" ;;
    --whole-profile) MODE=profile ;;
    *) echo "gpu.sh: unknown option $arg (use --smoke and/or --whole-profile)" >&2; exit 2 ;;
  esac
done
RESULTS="${BENCH_OUT:-${OUT:-artifacts/benchmarks}}"
mkdir -p "$RESULTS"
export REFUSAL_BOOK_PROGRESS=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

PY=""
for candidate in .venv/bin/python python3; do
  if command -v "$candidate" >/dev/null 2>&1 && has_cuda "$candidate"; then PY="$candidate"; break; fi
done
if [ -z "$PY" ]; then
  if [ -n "$SMOKE" ]; then
    PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
    export BENCH_DEVICE=cpu
    echo "gpu.sh --smoke: no CUDA device; running the tiny path on the CPU with $PY"
  else
    echo "gpu.sh: no Python here sees a CUDA GPU (tried .venv/bin/python and python3)." >&2
    echo "  Carry a .venv made on a CUDA machine, or use an image whose python3 has a CUDA build of torch;" >&2
    echo "  \`bash benchmarks/gpu.sh --smoke\` runs the same code on the CPU with tiny shapes." >&2
    exit 2
  fi
fi

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "transformers", "peft", "accelerate", "safetensors", "yaml", "tqdm", "numpy", "pytest", "tokenizers"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu.sh: $PY lacks: $missing. Nothing can be installed without network: carry them as wheels" >&2
  echo "  (see BENCHMARKS.md) or use a .venv made with \`make setup\` on a CUDA machine." >&2
  exit 2
fi
"$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' \
  | tee "$RESULTS/gpu-env.txt"

if [ "$MODE" = profile ]; then
  echo "== the llama2-7b profile, every chapter, on a random Llama-2-7B-shaped stand-in"
  timeout 470 "$PY" -m benchmarks.profile_timing $SMOKE --budget-s "${PROFILE_BUDGET_S:-420}" --out "$RESULTS" 2>&1 \
    | tee "$RESULTS/gpu-profile.txt"
  exit "${PIPESTATUS[0]}"
fi

start=$(date +%s)
echo "== 1/3 lib's tests on ${BENCH_DEVICE:-cuda} (tiny random Llama)"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -p benchmarks.cuda_plugin -m "not slow" \
  tests/test_ablation.py tests/test_capture.py tests/test_generation_judges.py tests/test_autobatch.py \
  benchmarks/cuda_checks.py 2>&1 | tee "$RESULTS/gpu-tests.txt"
tests_status=${PIPESTATUS[0]}

echo "== 2/3 the transfer workload on a random Llama-2-7B-shaped model"
timeout 300 "$PY" -m benchmarks.gpu_bench $SMOKE --budget-s "${GPU_BUDGET_S:-180}" ${GPU_BENCH_ARGS:-} --out "$RESULTS" 2>&1 \
  | tee "$RESULTS/gpu-bench.txt"
bench_status=${PIPESTATUS[0]}

echo "== 3/3 the hook body alone, side by side (benchmarks/hook_variants.py; no torch.compile)"
timeout 150 "$PY" -m benchmarks.hook_variants $SMOKE --no-compile --repeats "${GPU_HOOK_REPEATS:-7}" 2>&1 \
  | tee "$RESULTS/gpu-hook-variants.txt"
variants_status=${PIPESTATUS[0]}

echo "gpu.sh: tests exit $tests_status, benchmark exit $bench_status, hook bodies exit $variants_status," \
  "$(( $(date +%s) - start )) s; results in $RESULTS"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$variants_status" -eq 0 ]
