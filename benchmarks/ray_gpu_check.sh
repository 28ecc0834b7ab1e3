#!/usr/bin/env bash
# The ray engine on a GPU node (docs/scale-out.md): sample, judge (hf judge in process) and reference
# of the demo run as Ray Data jobs whose actors hold one GPU each (ray.num_gpus unset: 1 per actor
# for a stage that runs a model), against the local engine on the same node. Prints, per stage, the
# wall times of both engines (fresh processes: Ray's start-up and each actor's model load included),
# whether the ray engine's records equal the local engine's by id, and which devices the actors got.
# The CPU counterpart is tests/test_ray_engine.py. Written for a lent GPU; not yet run.
#
#     bash benchmarks/ray_gpu_check.sh            # needs `capdpo models` in $CAPDPO_CACHE and capdpo[ray]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/ray-gpu}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
ACTORS=${ACTORS:-$NGPU}
CAPDPO=("$PY" -m capdpo.cli)
RAY=(--engine ray --set "ray.actors=$ACTORS" --set ray.batch_size=2)

# the demo's records up to its candidates' questions, once; then a copy per engine
rm -rf "$RUN" && mkdir -p "$RUN"
for stage in data frames qa; do
  "${CAPDPO[@]}" "$stage" --config configs/demo.yaml --run-dir "$RUN/base" >/dev/null
done
cp -r "$RUN/base" "$RUN/local" && cp -r "$RUN/base" "$RUN/ray"

timed() {  # timed NAME -- command...: wall seconds of the command into $RUN/NAME.s
  local name=$1; shift 2
  local start=$(date +%s.%N)
  "$@" >"$RUN/$name.log" 2>&1 || { echo "$name FAILED (see $RUN/$name.log)"; exit 1; }
  echo "$(date +%s.%N) - $start" | bc >"$RUN/$name.s"
}
for stage in sample judge pairs reference; do
  timed "local-$stage" -- "${CAPDPO[@]}" "$stage" --config configs/demo.yaml --run-dir "$RUN/local"
  if [ "$stage" = pairs ]; then  # pairs has no engine: the ray run takes the same pairs to reference
    cp "$RUN/local/pairs.jsonl" "$RUN/ray/pairs.jsonl"; continue
  fi
  timed "ray-$stage" -- "${CAPDPO[@]}" "$stage" --config configs/demo.yaml --run-dir "$RUN/ray" "${RAY[@]}"
done

"$PY" - "$RUN" <<'PY'
import sys
from pathlib import Path
from capdpo.rundir import RunPaths
run = Path(sys.argv[1])
local, ray = RunPaths(run / "local"), RunPaths(run / "ray")
def same(a, b, drop=()):
    return {r.id: r.model_dump(exclude=set(drop)) for r in a.all()} == {r.id: r.model_dump(exclude=set(drop)) for r in b.all()}
checks = {"sample": same(local.candidates, ray.candidates), "judge": same(local.judgments, ray.judgments, ("latency_s",))}
near = {r.id: r for r in local.reference.all()}
checks["reference"] = all(abs(r.chosen_logp - near[r.id].chosen_logp) < 1e-3 and abs(r.rejected_logp - near[r.id].rejected_logp) < 1e-3
                          for r in ray.reference.all()) and len(near) == len(ray.reference.all())
for stage, ok in checks.items():
    t = {e: float((run / f"{e}-{stage}.s").read_text()) for e in ("local", "ray")}
    print(f"{stage}: local {t['local']:.1f} s, ray {t['ray']:.1f} s (ratio {t['local'] / t['ray']:.2f}); "
          f"ray == local by id: {ok}")
PY
grep -h "GPU each" "$RUN"/ray-*.log || true
"$PY" -c "import ray; ray.init(); print('cluster GPUs:', ray.cluster_resources().get('GPU', 0))"
