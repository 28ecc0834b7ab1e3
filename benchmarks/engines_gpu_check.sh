#!/usr/bin/env bash
# The shipped engine configs through accelerate on CUDA: capdpo's train stage under DDP, DeepSpeed
# ZeRO-2, ZeRO-3 and FSDP2 (configs/accelerate/), full fine-tuning of the built-in mini policy on the
# demo's pairs, 4 optimizer steps each; then the saved policy is loaded back as a plain checkpoint.
# The CPU counterpart is tests/test_engines.py (engines called directly: accelerate refuses them on
# CPU). Prints one line per engine: losses, peak memory, and whether the checkpoint loaded.
#
#     bash benchmarks/engines_gpu_check.sh        # every GPU of the node (ZeRO-3/FSDP shard over them)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
RUN=${RUN:-runs/engines-gpu}
CAPDPO=("$PY" -m capdpo.cli)

# the demo's records up to its pairs, once
for stage in data frames qa sample judge pairs; do
  "${CAPDPO[@]}" "$stage" --config configs/demo.yaml --run-dir "$RUN/base" >/dev/null
done

status=0
for engine in ddp zero2 zero3 fsdp; do
  out="$RUN/$engine"
  rm -rf "$out" && mkdir -p "$out"
  cp -r "$RUN/base/." "$out/" && rm -rf "$out/train"
  if ! "$BIN/accelerate" launch --config_file "configs/accelerate/$engine.yaml" --num_processes "$NGPU" \
      -m capdpo.cli train --config configs/demo.yaml --run-dir "$out" \
      --set train.lora=false --set train.max_steps=4 --set train.mixed_precision=bf16 >"$out/train.log" 2>&1; then
    echo "$engine: train FAILED (see $out/train.log)"; status=1; continue
  fi
  "$PY" - "$engine" "$out" <<'PY' || status=1
import json, sys
from pathlib import Path
from capdpo.models.load import load_policy
engine, out = sys.argv[1], Path(sys.argv[2])
rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
load_policy(str(out / "train" / "policy"), "unused", device="cuda")
losses = " ".join(f"{r['loss']:.4f}" for r in rows if "loss" in r)
peak = max(r.get("peak_memory_mb", 0) for r in rows)
print(f"{engine}: losses {losses}; peak {peak:.0f} MiB; saved policy loads as a plain checkpoint")
PY
done
exit $status
