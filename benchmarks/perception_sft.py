"""How fast does the mini policy learn to read its visual tokens when told the right answer every time?

The positive control of the miniature asks DPO on oracle pairs to raise held-out accuracy. Its
upper bound per step is plain supervised training on the right answers: this trains the policy
(projector in full + LoRA r32 on the LLM, as the built-in SFT does) on one exact question per
``--kinds`` kind of each of ``--clips`` synthetic clips (answers only, no captions), and every
``--eval-every`` steps measures greedy held-out accuracy per kind on 80 other clips (the oracle
grades). Frames are drawn from the scenes, as in ``perception_probe.py``.

    python benchmarks/perception_sft.py --kinds count,shape --clips 400 --steps 80 --lr 1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from perception_probe import SEED, draw_frames
from tqdm import tqdm

from capdpo.media.synthetic import random_scene, scene_questions
from capdpo.models.load import load_policy
from sft_loop import SFTExample, example_logps
from capdpo.oracle import judge_answer

TRAIN_SEED = 11  # scene seeds 11 * 100_000 + i for training; the test clips are perception_probe's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:mini")
    ap.add_argument("--cache-dir", default=os.environ.get("CAPDPO_CACHE", str(Path.home() / ".cache" / "capdpo")))
    ap.add_argument("--kinds", default="count,shape")
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--test-clips", type=int, default=80)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    started = time.perf_counter()
    kinds = args.kinds.split(",")
    policy = load_policy(args.model, args.cache_dir, "cpu", "float32")
    rng = random.Random(0)

    def questions(scene, pick):
        for kind in kinds:
            found = [q for q in scene_questions(scene) if q.kind == kind]
            if found:
                yield pick(found)

    train = [random_scene(TRAIN_SEED * 100_000 + i) for i in range(args.clips)]
    pixels = {str(i): policy.preprocess(draw_frames(s, policy.spec.num_frames)) for i, s in enumerate(train)}
    examples = [SFTExample(str(i), q.question, q.answer) for i, s in enumerate(train) for q in questions(s, rng.choice)]
    # the test clips follow perception_probe's training clips, so neither script's clips meet
    test = [random_scene(SEED * 100_000 + 400 + i) for i in range(args.test_clips)]
    test_pixels = [policy.preprocess(draw_frames(s, policy.spec.num_frames)) for s in test]
    test_questions = [(j, q) for j, s in enumerate(test) for q in questions(s, lambda found: found[0])]

    model = policy.model
    model.requires_grad_(False)
    get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules=policy.parts.lora_targets(), lora_dropout=0.0))
    for name, p in model.named_parameters():
        if policy.parts.part_of(name) == "projector":
            p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    def held_out_accuracy() -> dict[str, float]:
        model.eval()
        right: dict[str, list[float]] = {}
        with torch.inference_mode():
            for start in range(0, len(test_questions), 16):
                chunk = test_questions[start : start + 16]
                videos = {j: policy.encode(test_pixels[j]) for j, _ in chunk}
                answers = policy.generate_batch([(videos[j], q.question) for j, q in chunk], max_new_tokens=24)
                for (_, q), [answer] in zip(chunk, answers):
                    right.setdefault(q.kind, []).append(float(judge_answer(q.facts, q.kind, answer).correct))
        model.train()
        return {k: float(np.mean(v)) for k, v in right.items()}

    log = [{"step": 0, "accuracy": held_out_accuracy(), "seconds": time.perf_counter() - started}]
    losses: list[float] = []
    with tqdm(total=args.steps, desc="supervised steps", unit="step") as bar:
        while len(losses) < args.steps:
            order = list(range(len(examples)))
            rng.shuffle(order)
            for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
                logps, n_tokens = example_logps(policy, pixels, [examples[i] for i in order[start : start + args.batch_size]], 32)
                loss = -(logps.sum() / n_tokens.sum())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
                bar.update()
                if len(losses) % args.eval_every == 0:
                    log.append({"step": len(losses), "loss": float(np.mean(losses[-args.eval_every:])),
                                "accuracy": held_out_accuracy(), "seconds": time.perf_counter() - started})
                    bar.write(json.dumps(log[-1]))
                if len(losses) == args.steps:
                    break
    print(f"\n{args.model}: {len(examples)} examples ({args.kinds}) from {args.clips} clips, batch {args.batch_size}, lr {args.lr}\n")
    print("| step | examples seen | " + " | ".join(f"held-out {k}" for k in kinds) + " | minutes |\n|---|---|" + "---|" * (len(kinds) + 1))
    for row in log:
        print(f"| {row['step']} | {row['step'] * args.batch_size} | " + " | ".join(f"{row['accuracy'][k]:.3f}" for k in kinds)
              + f" | {row['seconds'] / 60:.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "log": log}, indent=1) + "\n")


if __name__ == "__main__":
    main()
