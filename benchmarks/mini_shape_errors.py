"""Where a mini checkpoint's shape answers go wrong on held-out clips: by the clip's number of shapes,
the asked shape's size, colour and kind, and whether a wrong answer names another shape of the clip.

Shape questions name a shape by its colour ("What shape is the red object?"). A wrong answer that
names another shape of the same clip means the model saw the shapes and bound the colour to the
wrong one; a wrong answer naming a kind the clip does not hold means it did not see it.

    OMP_NUM_THREADS=1 python benchmarks/mini_shape_errors.py --model builtin:mini --out /tmp/shape/v5.json

Held-out clips as ``mini_recipe.py --evaluate-model`` renders and reads them (scene seed 13, mp4,
decoded and sampled like any run's videos); greedy answers, graded by the oracle.
Runs of 2026-12-08: docs/results/mini-recipe-2026-12-07.md, "Where shape goes wrong".
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch

from mini_recipe import TEST_SEED


@torch.inference_mode()
def shape_answers(model: str, cache_dir: str, clips_dir: Path, n: int) -> list[dict]:
    """One row per held-out clip's shape question: the answer, its grade and the scene's facts."""
    from capdpo.config import FramesConfig
    from capdpo.media.synthetic import KINDS, make_synthetic_dataset, scene_questions
    from capdpo.models.load import load_policy
    from capdpo.oracle import judge_answer
    from capdpo.policy.video import VideoEncoder

    policy = load_policy(model, cache_dir, device="cpu")
    encoder = VideoEncoder(policy, FramesConfig(num_frames=policy.spec.num_frames))
    rows = []
    for clip in make_synthetic_dataset(clips_dir, n, TEST_SEED):
        asked = [q for q in scene_questions(clip.scene) if q.kind == "shape"]
        video = policy.project(encoder.tower(clip.video))
        for q, [answer] in zip(asked, policy.generate_batch([(video, q.question) for q in asked], max_new_tokens=20)):
            target = next(s for s in clip.scene.shapes if s.kind == q.facts["shape"])
            named = {k for k in KINDS if k in answer.lower()}
            rows.append({"video": clip.video.id, "question": q.question, "answer": answer, "truth": target.kind,
                         "correct": judge_answer(q.facts, q.kind, answer).correct, "shapes": len(clip.scene.shapes),
                         "size": target.size, "colour": target.colour,
                         "names_another_shape": bool(named & {s.kind for s in clip.scene.shapes if s is not target})})
    return rows


def breakdown(rows: list[dict]) -> dict:
    """Accuracy (and count) by each fact, and how many wrong answers name another shape of the clip."""
    out: dict = {"accuracy": sum(r["correct"] for r in rows) / len(rows), "questions": len(rows)}
    for fact in ("shapes", "size", "colour", "truth"):
        groups = defaultdict(list)
        for r in rows:
            groups[str(r[fact])].append(r["correct"])
        out[f"by {fact}"] = {k: {"accuracy": round(sum(v) / len(v), 3), "questions": len(v)} for k, v in sorted(groups.items())}
    wrong = [r for r in rows if not r["correct"]]
    out["wrong"], out["wrong naming another shape of the clip"] = len(wrong), sum(r["names_another_shape"] for r in wrong)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="builtin:mini, builtin:mini-start or a checkpoint folder")
    ap.add_argument("--out", type=Path, required=True, help="the breakdown and every answer, as JSON")
    ap.add_argument("--cache-dir", default=os.environ.get("CAPDPO_CACHE", str(Path.home() / ".cache" / "capdpo")))
    ap.add_argument("--clips-dir", type=Path, default=Path("/tmp/recipe/features") / f"clips-seed{TEST_SEED}")
    ap.add_argument("--test-clips", type=int, default=100)
    args = ap.parse_args()
    rows = shape_answers(args.model, args.cache_dir, args.clips_dir, args.test_clips)
    report = breakdown(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "model": args.model, "answers": rows}, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
