"""Does a distilled judge read the caption? The v2 / v3 table of docs/judge-distill.md.

On the caption-matters ``detail`` questions the reference answer names only the shape's motion, so
an answer's extra details (size, colour, colour change) can be checked only against the caption.
Each judge is asked twice about the same swapped-fact answers (``capdpo.judge_study.variant_answers``):
with its template and with that template's twin without the caption
(``capdpo.prompts.without_caption``). Printed per answer set: AUROC against the oracle on all
answers, on ``detail`` answers, and on the *caption-only* ones (``detail`` answers other than the
reference that state the reference's motion, so only their extra details decide), the caption's
effect on ``detail`` with a 95% paired bootstrap interval over questions, and the first judge
minus each other with the caption.

    python benchmarks/judge_caption.py --judge v3=builtin:judge-mini --judge v2=~/.cache/capdpo/judge-mini-v2 \\
        --out runs/judge_caption.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capdpo.config import RunConfig
from capdpo.evaluation.agreement import auroc
from capdpo.judge_study import AnswerSet, auroc_difference, score_answers, variant_answers
from capdpo.llm.backends import distilled_template
from capdpo.prompts import without_caption

SETS = {"judge-eval": (5, 30), "mini-repro": (0, 10)}  # (synthetic seed, clips): configs/judge-eval.yaml's, the miniature's


def caption_only(answers: AnswerSet) -> list[str]:
    """``detail`` answers that state the reference's motion ("It moves steadily upward." -> "moves
    steadily upward") but are not the reference: their extra details alone make them right or wrong."""
    items = {it.target_id: it for it in answers.items}
    return [i for i in answers.truth if answers.kind[i] == "detail" and items[i].answer != items[i].reference
            and items[i].reference.removeprefix("It ").removesuffix(".") in items[i].answer]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", action="append", required=True, help="NAME=MODEL (a distilled judge); the first is compared with the others.")
    ap.add_argument("--per-question", type=int, default=8, help="Answers per question (the reference, the full answer, swapped-fact variants).")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cache_dir = RunConfig().cache_dir
    judges = [j.split("=", 1) for j in args.judge]
    specs = {}
    for name, model in judges:
        model = str(Path(model).expanduser()) if not model.startswith("builtin:") else model
        template = distilled_template(model, cache_dir)
        if template is None:
            raise SystemExit(f"--judge {name}={model}: not a distilled judge (no distill.json)")
        specs[name] = f"{model}@{template}"
        specs[f"{name} no caption"] = f"{model}@{without_caption(template)}"
    result = {"judges": specs, "sets": {}}
    for set_name, (seed, clips) in SETS.items():
        answers = variant_answers(seed, clips, args.per_question)
        scores = {name: score_answers(spec, answers.items, cache_dir, args.batch_size)[0] for name, spec in specs.items()}
        subsets = {"all": list(answers.truth), "detail": [i for i in answers.truth if answers.kind[i] == "detail"],
                   "caption-only": caption_only(answers)}
        fig = {"answers": {k: len(ids) for k, ids in subsets.items()},
               "auroc": {name: {k: auroc([s[i] for i in ids], [int(answers.truth[i]) for i in ids]) for k, ids in subsets.items()}
                         for name, s in scores.items()},
               "differences": {}}
        pairs = [(name, f"{name} no caption") for name, _ in judges] + [(judges[0][0], name) for name, _ in judges[1:]]
        for a, b in pairs:
            fig["differences"][f"{a} - {b}"] = {k: auroc_difference(scores[a], scores[b], answers, subsets[k], args.resamples)
                                                for k in ("all", "detail")}
        result["sets"][set_name] = fig
        print(f"\n== {set_name} (seed {seed}, {clips} clips): " + ", ".join(f"{n} {k}" for k, n in fig["answers"].items()))
        for name, by in fig["auroc"].items():
            print(f"{name:>20}: " + "  ".join(f"{k} {v:.3f}" for k, v in by.items()))
        for name, by in fig["differences"].items():
            print(f"AUROC {name}: " + "  ".join(f"{k} {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" for k, d in by.items() if d))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
