"""DPO recipes on a finished run's pairs, each graded by the oracle on the run's held-out synthetic questions.

    capdpo run configs/demo.yaml                       # pairs, reference and held-out questions on disk
    cp -r runs/demo runs/sweep && rm -rf runs/sweep/train runs/sweep/eval
    OMP_NUM_THREADS=1 python benchmarks/dpo_recipe_sweep.py --run-dir runs/sweep --config configs/demo.yaml \
        "lo=lr:5e-5,freeze_projector:true" "mid=lr:2e-4,freeze_projector:true"

Each recipe (NAME=field:value,...; ``train`` section fields) trains from the run's policy on the
run's pairs and answers the held-out questions greedily; the oracle grades them. Printed per recipe:
accuracy, the paired difference to the start with its 95% bootstrap interval, accuracy per kind,
the start's and the trained policy's most frequent answers (a collapse onto one answer shows), and
the policy's mean log p(chosen) over the first and last logged steps. Evaluations land in
``RUN/claim2/eval/<name>/`` (the reproduction's layout), trainings in ``RUN/sweep-<name>/``.
Results of 2026-12-07: docs/mini-repro.md point 11.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from pathlib import Path

from capdpo.cli import _config
from capdpo.models.load import policy_from_config
from capdpo.pipeline import Run
from capdpo.records import PreferencePair, RecordFile, ReferenceLogps
from capdpo.repro import eval_dir, evaluate_policy
from capdpo.stats import bootstrap_mean
from capdpo.train import run_train


def parse_recipe(text: str) -> tuple[str, dict]:
    name, fields = text.split("=", 1)
    values = {}
    for item in fields.split(","):
        key, value = item.split(":", 1)
        values[key] = value == "true" if value in ("true", "false") else int(value) if value.isdigit() else float(value)
    return name, values


def by_kind(evaluation: dict) -> dict[str, float]:
    kinds: dict[str, list[float]] = {}
    for row in evaluation.values():
        kinds.setdefault(row["kind"], []).append(row["oracle"])
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(kinds.items())}


def common_answers(run: Run, name: str, n: int = 4) -> list[tuple[str, int]]:
    rows = map(json.loads, (eval_dir(run, name) / "predictions.jsonl").read_text().splitlines())
    return Counter(re.sub(r"[^a-z ]", "", r["answer"].lower()).strip() for r in rows).most_common(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("recipes", nargs="+", help="NAME=field:value,... (train section fields)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = _config(args.config, args.run_dir, None, False)
    run = Run(cfg)
    start = Path(run.policy.path)
    base = evaluate_policy(run, "start", start)
    accuracy = lambda ev: sum(v["oracle"] for v in ev.values()) / len(ev)  # noqa: E731
    print(f"start: accuracy {accuracy(base):.3f} over {len(base)} questions, by kind {by_kind(base)}, "
          f"answers {common_answers(run, 'start')}", flush=True)
    for name, fields in map(parse_recipe, args.recipes):
        train = cfg.train.model_copy(update=fields)
        policy = policy_from_config(cfg.policy.model_copy(update={"model": str(start)}), cfg.cache_dir)
        # the reference log-probs depend on the frozen parts only through the start: one file per projector setting
        reference = RecordFile(args.run_dir / f"reference-{'frozen' if train.freeze_projector else 'trained'}-projector.jsonl",
                               ReferenceLogps)
        out = run_train(RecordFile(args.run_dir / "pairs.jsonl", PreferencePair), run.paths.videos, policy, train, cfg.frames,
                        args.run_dir / f"sweep-{name}", embed_cache=run.embedding_cache, reference_file=reference)
        trained = evaluate_policy(run, name, out)
        common = sorted(trained.keys() & base.keys())
        diff = bootstrap_mean([trained[q]["oracle"] - base[q]["oracle"] for q in common], 2000, 0)
        steps = [json.loads(line) for line in (args.run_dir / f"sweep-{name}" / "metrics.jsonl").read_text().splitlines()]
        print(f"{name} {fields}: accuracy {accuracy(trained):.3f}, vs start {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}], "
              f"by kind {by_kind(trained)}, answers {common_answers(run, name)}, log p(chosen) "
              f"{steps[0]['logps/chosen']:.2f} -> {steps[-1]['logps/chosen']:.2f}", flush=True)


if __name__ == "__main__":
    main()
