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
from pathlib import Path

from capdpo.config import RunConfig
from capdpo.judge_study import policy_answers, score_answers, study, variant_answers
from capdpo.rundir import RunPaths


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
    make = {"policy": lambda: policy_answers(RunPaths(args.run)),
            "variants": lambda: variant_answers(args.variants_seed, args.variants_clips, args.variants_per_question)}
    judges = [j.split("=", 1) for j in args.judge]
    result = {"judges": dict(judges), "sets": {}}
    for set_name in args.sets.split(","):
        answers = make[set_name]()
        scores, speed = {}, {}
        for name, spec in judges:
            scores[name], speed[name] = score_answers(spec, answers.items, cache_dir, args.batch_size)
        first = judges[0][0]
        figs = study(answers, scores, [(first, name) for name, _ in judges[1:]], args.resamples)
        result["sets"][set_name] = {**figs, "answers_per_s": speed}
        print(f"\n== {set_name}: {figs['answers']} answers, {figs['share_correct']:.1%} correct")
        for name, _ in judges:
            row = "  ".join(f"{k} {v['auroc'] if v['auroc'] is None else round(v['auroc'], 3)}/"
                            f"{v['pairwise_strict'] if v['pairwise_strict'] is None else round(v['pairwise_strict'], 3)}"
                            for k, v in figs["figures"][name].items())
            print(f"{name:>12} ({speed[name]:.1f} answers/s): {row}")
        for name, by_kind in figs["auroc_differences"].items():
            print(f"AUROC {name}: " + "  ".join(f"{k} {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                                                for k, d in by_kind.items() if d is not None and k in ("all", "detail")))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
