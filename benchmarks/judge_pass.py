"""Claim 2's caption-judge pass (``capdpo.repro.judge_evaluations``) timed on a finished miniature run.

Judges every evaluated policy's held-out answers (``claim2/eval/*/predictions.jsonl``) in one pass
ordered by question, on a copy of the run folder whose reply cache you removed (so every answer is
really judged), and compares each score with the per-policy judging the run did before this pass
existed (``claim2/eval/*/judgments.jsonl``, when the run has them):

    cp -r runs/mini-repro /tmp/copy && rm /tmp/copy/llm_cache.sqlite && rm -f /tmp/copy/claim2/eval/judgments.jsonl
    python benchmarks/judge_pass.py /tmp/copy
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from capdpo.config import load_config
from capdpo.pipeline import Run
from capdpo.repro import judge_evaluations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args()
    cfg = load_config(args.run_dir / "config.yaml", overrides=[f"run_dir={args.run_dir}"])
    run = Run(cfg, save=False)
    folders = sorted(d for d in (args.run_dir / "claim2" / "eval").iterdir() if d.is_dir())
    evals = {d.name: {json.loads(line)["qa_id"]: {} for line in open(d / "oracle.jsonl")} for d in folders}
    start = time.perf_counter()
    judge_evaluations(run, evals)
    print(f"{len(evals)} policies, {sum(map(len, evals.values()))} answers judged in {time.perf_counter() - start:.1f} s")
    before = {(d.name, json.loads(line)["qa_id"]): json.loads(line)["score"]
              for d in folders if (d / "judgments.jsonl").exists() for line in open(d / "judgments.jsonl")}
    same = [abs(row["judge"] - before[name, q]) for name, rows in evals.items() for q, row in rows.items() if (name, q) in before]
    if same:
        print(f"largest difference from the per-policy judging on {len(same)} answers: {max(same):.1e}")


if __name__ == "__main__":
    main()
