#!/usr/bin/env bash
# GPU check: the family tests and the sampling benchmark on CUDA in bf16; figures appended to
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
TABLE=$("$PY" benchmarks/sample_throughput.py --device cuda --dtype bfloat16)
echo "$TABLE"

{
  echo
  echo "### Sampling throughput on $GPU (bf16, $(date -u +%F))"
  echo
  echo '`bash benchmarks/gpu_check.sh`; family tests on CUDA bf16: '"$(tail -n 1 "$LOG")"
  echo
  echo "$TABLE"
} >> BENCHMARKS.md
exit $status
