#!/usr/bin/env bash
# GPU check: the family and shared-prefix tests, the sampling and DPO-step benchmarks and the engine configs
# through accelerate (engines_gpu_check.sh) on CUDA; figures appended to
# BENCHMARKS.md under the GPU's name. Run from anywhere, on a node with the project installed
# (`make setup`; torchvision present lets the tests compare capdpo's preprocessing with transformers').
#
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export CAPDPO_CACHE=${CAPDPO_CACHE:-$HOME/.cache/capdpo}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
LOG=$(mktemp)

"$PY" -m capdpo.cli models >/dev/null  # builds builtin:mini once (SmolLM2 + DINOv2 + short SFT)
status=0  # a failing test is recorded with the figures, and is the script's exit status
CAPDPO_TEST_DEVICE=cuda CAPDPO_TEST_DTYPE=bfloat16 "$PY" -m pytest tests/test_families.py -q -p no:cacheprovider | tee "$LOG" || status=$?
CAPDPO_TEST_DEVICE=cuda "$PY" -m pytest tests/test_shared_prefix.py -q -p no:cacheprovider | tee -a "$LOG" || status=$?
TABLE=$("$PY" benchmarks/sample_throughput.py --device cuda --dtype bfloat16)
DPO=$("$PY" benchmarks/dpo_step.py --device cuda --dtype bfloat16 --preset 1b --init random --pairs 2 --steps 5 --warmup 2)
ENGINES=$(PY="$PY" bash benchmarks/engines_gpu_check.sh) || status=$?
echo "$TABLE"

{
  echo
  echo "### Sampling throughput on $GPU (bf16, $(date -u +%F))"
  echo
  echo '`bash benchmarks/gpu_check.sh`; family tests on CUDA bf16: '"$(tail -n 1 "$LOG")"
  echo
  echo "$TABLE"
  echo
  echo "DPO step, 1b preset (benchmarks/dpo_step.py):"
  echo
  echo "$DPO"
  echo
  echo "Engine configs through accelerate (benchmarks/engines_gpu_check.sh, $(nvidia-smi -L | wc -l) GPU(s)):"
  echo
  echo "$ENGINES"
} >> BENCHMARKS.md
exit $status
