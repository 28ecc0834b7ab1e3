"""What do the mini policy's visual tokens tell about a synthetic clip? Linear probes on them.

DPO can only sharpen what a policy already half-sees. This asks whether the built-in policy's
video embeddings (DINOv2-S/14 + average pooling + its projector: the tokens the LLM reads) carry
the facts the miniature's questions ask about, and compares with what the policy says:

* for each fact (number of shapes; and, on one-shape clips, the shape's kind, its direction of
  motion, whether it changes colour, its first colour), a linear probe trained on the embeddings
  of ``--train`` clips and scored on ``--test`` others (features: per-frame mean and max over the
  frame's tokens; standardised; logistic regression with weight decay, tuned on a split of the
  training clips); chance = the most frequent class of the test clips;
* the policy's own greedy answers to the clips' questions of the same kinds, graded by the oracle.

Frames are drawn from the scenes (``capdpo.media.synthetic.draw_frame``), not decoded from video.

    python benchmarks/perception_probe.py --model builtin:mini --train 400 --test 200
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from capdpo.media.synthetic import draw_frame, random_scene, scene_questions
from capdpo.models.load import load_policy
from capdpo.oracle import judge_answer

SEED = 9  # scene seeds 9 * 100_000 + i: no built-in model, demo or reproduction uses them


def facts(scene) -> dict[str, str | None]:
    """Per-clip labels; the one-shape facts are None on clips with several shapes."""
    one = scene.shapes[0] if len(scene.shapes) == 1 else None
    return {"count": str(len(scene.shapes)),
            "kind": one.kind if one else None,
            "direction": one.direction if one else None,
            "changes colour": str(one.change is not None) if one else None,
            "first colour": one.colour if one else None}


def draw_frames(scene, num_frames: int) -> list:
    """``num_frames`` frames evenly spread over the clip, drawn from the scene (no video decoding)."""
    return [draw_frame(scene, round(k * (scene.n_frames - 1) / (num_frames - 1))) for k in range(num_frames)]


def embed(policy, scene, num_frames: int) -> np.ndarray:
    """Per-frame mean and max of the clip's visual tokens, as one vector."""
    with torch.inference_mode():
        video = policy.encode(policy.preprocess(draw_frames(scene, num_frames)))
    tokens = video.embeds.float().reshape(num_frames, -1, video.embeds.shape[-1])
    return torch.cat([tokens.mean(1), tokens.amax(1)], -1).flatten().cpu().numpy()


def probe(x_train, y_train, x_test, y_test, seed: int = 0) -> float:
    """Test accuracy of a logistic-regression probe; weight decay picked on a quarter of the training clips."""
    classes = sorted(set(y_train) | set(y_test))
    index = {c: i for i, c in enumerate(classes)}
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6

    def fit(xa, ya, decay):
        torch.manual_seed(seed)
        xa = torch.tensor((xa - mean) / std, dtype=torch.float32)
        ya = torch.tensor([index[c] for c in ya])
        w = torch.nn.Linear(xa.shape[1], len(classes))
        opt = torch.optim.LBFGS(w.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(w(xa), ya) + decay * w.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w

    def accuracy(w, xb, yb):
        with torch.no_grad():
            pred = w(torch.tensor((xb - mean) / std, dtype=torch.float32)).argmax(1).tolist()
        return float(np.mean([classes[p] == c for p, c in zip(pred, yb)]))

    cut = len(x_train) * 3 // 4
    decay = max((1e-4, 1e-3, 1e-2, 1e-1), key=lambda d: accuracy(fit(x_train[:cut], y_train[:cut], d), x_train[cut:], y_train[cut:]))
    return accuracy(fit(x_train, y_train, decay), x_test, y_test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:mini")
    ap.add_argument("--cache-dir", default=os.environ.get("CAPDPO_CACHE", str(Path.home() / ".cache" / "capdpo")))
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--answer-clips", type=int, default=100, help="test clips whose questions the policy answers (greedy)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    started = time.perf_counter()
    policy = load_policy(args.model, args.cache_dir, "cpu", "float32")
    scenes = [random_scene(SEED * 100_000 + i) for i in range(args.train + args.test)]
    x = np.stack([embed(policy, s, args.frames) for s in tqdm(scenes, desc="embed clips", unit="clip")])
    labels = [facts(s) for s in scenes]
    result = {"model": args.model, "train_clips": args.train, "test_clips": args.test, "probes": {}, "policy_answers": {}}
    for fact in labels[0]:
        tr = [i for i in range(args.train) if labels[i][fact] is not None]
        te = [i for i in range(args.train, len(scenes)) if labels[i][fact] is not None]
        y_tr, y_te = [labels[i][fact] for i in tr], [labels[i][fact] for i in te]
        _, counts = np.unique(y_te, return_counts=True)
        result["probes"][fact] = {"train": len(tr), "test": len(te), "classes": len(set(y_tr) | set(y_te)),
                                  "probe_accuracy": probe(x[tr], y_tr, x[te], y_te), "chance": float(counts.max() / len(y_te))}
    # the policy's own greedy answers to the test clips' questions, by kind
    right: dict[str, list[float]] = {}
    for scene in tqdm(scenes[args.train:args.train + args.answer_clips], desc="policy answers", unit="clip"):
        with torch.inference_mode():
            video = policy.encode(policy.preprocess(draw_frames(scene, args.frames)))
        questions = scene_questions(scene)
        answers = policy.generate_batch([(video, q.question) for q in questions], max_new_tokens=24)
        for q, [answer] in zip(questions, answers):
            right.setdefault(q.kind, []).append(float(judge_answer(q.facts, q.kind, answer).correct))
    result["policy_answers"] = {k: {"questions": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(right.items())}
    result["seconds"] = time.perf_counter() - started
    print(f"{args.model}: probes on {args.train} train / {args.test} test clips ({result['seconds']:.0f} s)\n")
    print("| fact | test clips | classes | probe accuracy | chance (majority) |\n|---|---|---|---|---|")
    for fact, r in result["probes"].items():
        print(f"| {fact} | {r['test']} | {r['classes']} | {r['probe_accuracy']:.3f} | {r['chance']:.3f} |")
    print("\n| question kind | questions | policy's greedy accuracy (oracle) |\n|---|---|---|")
    for kind, r in result["policy_answers"].items():
        print(f"| {kind} | {r['questions']} | {r['accuracy']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
