"""How well do judges agree with the oracle? The figures of docs/judge-distill.md.

Scores answers about synthetic clips whose truth the oracle knows, with every judge given, and
prints per question kind: AUROC of the judge's score for the oracle's 0/1, and strict pairwise
agreement (pairs of answers to one question that both the judge and the oracle order). Two answer
sets, both on clips of a seed no built-in model was made from:

* ``policy``: the mini policy's sampled answers of a run (``configs/judge-eval.yaml``);
* ``variants``: reference answers with swapped facts (``capdpo.media.answers``) on the same clips,
  which is where the caption-matters ``detail`` questions get answers with extra details to check.

The difference of AUROC between the first judge and each other one comes with a 95% percentile
bootstrap interval over questions (paired: both judges scored the same answers).

    python benchmarks/judge_distill.py --run runs/judge-eval \\
        --judge judge-mini=builtin:judge-mini --judge no-caption=runs/students/no-caption@reward_no_caption \\
        --judge smollm2=builtin:smollm2 --out runs/judge-eval/judge_figures.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from capdpo.agreement import agreement, auroc
from capdpo.config import RunConfig
from capdpo.distill import expected_scores, judge_item, run_items, synthetic_labels
from capdpo.judge.judge import JudgeItem
from capdpo.media.synthetic import load_scenes
from capdpo.oracle import Answer, oracle_scores, run_scenes_path
from capdpo.rundir import RunPaths
from capdpo.similarity import MiniLM
from capdpo.stats import percentile_interval, resample_indices


def policy_answers(run: Path) -> tuple[list[JudgeItem], dict[str, float], dict[str, str]]:
    """The run's candidates, their oracle 0/1 and question kind."""
    paths = RunPaths(run)
    items = run_items(paths)
    scored = oracle_scores([Answer(it.target_id, it.qa_id, it.answer) for it in items], paths.qa.by_id(),
                           load_scenes(run_scenes_path(run)))
    truth = {r["id"]: float(r["score"]) for r in scored.rows}
    kind = {r["id"]: r["kind"] for r in scored.rows}
    return [it for it in items if it.target_id in truth], truth, kind


def variant_answers(seed: int, clips: int, per_question: int) -> tuple[list[JudgeItem], dict[str, float], dict[str, str]]:
    labels = synthetic_labels(seed, clips, per_question)
    return [judge_item(lab) for lab in labels], {lab.id: lab.score for lab in labels}, {lab.id: lab.kind for lab in labels}


def judge_scores(spec: str, items: list[JudgeItem], cache_dir: str, batch_size: int) -> tuple[dict[str, float | None], float]:
    """Scores of one judge (``MODEL`` or ``MODEL@TEMPLATE``, expected mode; ``minilm``: the
    similarity baseline) and its answers per second."""
    t0 = time.perf_counter()
    if spec == "minilm":
        sims = MiniLM().similarity([it.answer for it in items], [it.reference for it in items])
        return {it.target_id: s for it, s in zip(items, sims)}, len(items) / (time.perf_counter() - t0)
    model, _, template = spec.partition("@")
    scores = expected_scores(model, items, cache_dir, template=template or None, batch_size=batch_size, desc=spec)
    return scores, len(items) / (time.perf_counter() - t0)


def figures(scores: dict, truth: dict, group: dict, ids: list[str]) -> dict:
    rep = agreement({i: scores[i] for i in ids}, {i: truth[i] for i in ids}, group=group)
    return {"answers": rep.n_common, "auroc": rep.auroc, "pairwise_strict": rep.pairwise_agreement_strict,
            "strict_pairs": rep.n_pairs_strict}


def auroc_diff(a: dict, b: dict, truth: dict, group: dict, ids: list[str], resamples: int, seed: int) -> dict:
    """AUROC(a) - AUROC(b) on ``ids`` and its bootstrap interval over questions (paired)."""
    by_q = defaultdict(list)
    for i in ids:
        by_q[group[i]].append(i)
    questions = sorted(by_q)
    idx = resample_indices(len(questions), np.random.default_rng(seed), resamples)
    diffs = []
    for row in idx:
        picked = [i for q in row for i in by_q[questions[q]]]
        y = [int(truth[i]) for i in picked]
        ra, rb = auroc([a[i] for i in picked], y), auroc([b[i] for i in picked], y)
        if ra is not None and rb is not None:
            diffs.append(ra - rb)
    y = [int(truth[i]) for i in ids]
    low, high = percentile_interval(np.array(diffs))
    return {"diff": auroc([a[i] for i in ids], y) - auroc([b[i] for i in ids], y), "low": low, "high": high}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="Run folder with the mini policy's candidates (configs/judge-eval.yaml).")
    ap.add_argument("--judge", action="append", required=True, help="NAME=MODEL[@TEMPLATE] or NAME=minilm; the first is compared with the others.")
    ap.add_argument("--variants-seed", type=int, default=5)
    ap.add_argument("--variants-clips", type=int, default=30)
    ap.add_argument("--variants-per-question", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--sets", default="policy,variants", help="Answer sets to score: policy, variants or both.")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cache_dir = RunConfig().cache_dir
    make = {"policy": lambda: policy_answers(args.run),
            "variants": lambda: variant_answers(args.variants_seed, args.variants_clips, args.variants_per_question)}
    sets = {name: make[name]() for name in args.sets.split(",")}
    judges = [j.split("=", 1) for j in args.judge]
    result = {"judges": dict(judges), "sets": {}}
    for set_name, (items, truth, kind) in sets.items():
        group = {it.target_id: it.qa_id for it in items}
        scores, speed = {}, {}
        for name, spec in judges:
            scores[name], speed[name] = judge_scores(spec, items, cache_dir, args.batch_size)
        kinds = sorted(set(kind.values()))
        ids_of = {k: [i for i in truth if k == "all" or kind[i] == k] for k in ["all", *kinds]}
        table = {name: {k: figures(scores[name], truth, group, ids) for k, ids in ids_of.items()} for name, _ in judges}
        first = judges[0][0]
        compared = [k for k in ("all", "detail") if k in ids_of]
        diffs = {f"{first} - {name}": {k: auroc_diff(scores[first], scores[name], truth, group, ids_of[k], args.resamples, 0)
                                       for k in compared} for name, _ in judges[1:]}
        result["sets"][set_name] = {"answers": len(items), "share_correct": sum(truth.values()) / len(truth),
                                    "figures": table, "auroc_differences": diffs, "answers_per_s": speed}
        print(f"\n== {set_name}: {len(items)} answers, {sum(truth.values()) / len(truth):.1%} correct")
        for name, _ in judges:
            row = "  ".join(f"{k} {v['auroc'] if v['auroc'] is None else round(v['auroc'], 3)}/"
                            f"{v['pairwise_strict'] if v['pairwise_strict'] is None else round(v['pairwise_strict'], 3)}"
                            for k, v in table[name].items())
            print(f"{name:>12} ({speed[name]:.1f} answers/s): {row}")
        for name, d in diffs.items():
            print(f"AUROC {name}: " + "  ".join(f"{k} {v['diff']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" for k, v in d.items()))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
