"""The distilled judge's prompt: ``caption_reward`` against ``short_caption_reward``, in one process.

Both costs that a judge template sets, measured on builtin:judge-mini's own labels (its
``labels.jsonl``, 8 answers to each question of 32 synthetic clips):

* distillation: tokens per epoch, and the time of the same ``--steps`` optimizer steps (same rows,
  same order) from the base SmolLM2-135M;
* judging: ``expected``-mode scoring of ``--answers`` answers by the built judge-mini, through the
  judge every run uses, with each template (the score itself only means something with the
  template the student learned; this times the prompt length).

    python benchmarks/judge_template.py [--steps 6] [--answers 256]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch

from capdpo.config import BUILTIN_JUDGE, DistillConfig
from capdpo.distill import StudentTokens, _steps, expected_scores, judge_item, load_student, pack_rows, reply_loss
from capdpo.packaged import JUDGE_MINI
from capdpo.records import RecordFile, TeacherLabel

TEMPLATES = ("caption_reward", "short_caption_reward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="distillation steps timed per template")
    ap.add_argument("--answers", type=int, default=256, help="answers judged per template")
    args = ap.parse_args()
    cache = Path(os.environ.get("CAPDPO_CACHE", Path.home() / ".cache" / "capdpo"))
    labels = list(RecordFile(cache / JUDGE_MINI / "labels.jsonl", TeacherLabel).read())
    cfg = DistillConfig()
    model, tokenizer = load_student(cfg, cache)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every template's steps see the same weights
    model.train()
    print(f"{len(labels)} labels of {cache / JUDGE_MINI}")
    warm = StudentTokens(tokenizer, TEMPLATES[0], cfg.max_answer_words).rows(labels[:32], cfg.group_size)
    reply_loss(model, pack_rows(warm, pad)).backward()  # first-call costs belong to neither template
    opt.zero_grad(set_to_none=True)
    for name in TEMPLATES:
        rows = StudentTokens(tokenizer, name, cfg.max_answer_words).rows(labels, cfg.group_size)
        tokens = sum(len(r.prefix) + sum(len(b.tokens) for b in r.branches) for r in rows)
        plan = _steps(rows, cfg.batch_answers, random.Random(cfg.seed))[: args.steps]
        start = time.perf_counter()
        for step in plan:
            reply_loss(model, pack_rows([rows[i] for i in step], pad)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        print(f"distill {name:22s} {tokens:7d} tokens an epoch ({tokens / len(labels):.0f} an answer), "
              f"{seconds / len(plan):.2f} s a step over {len(plan)} steps")
    del model, opt
    items = [judge_item(lab) for lab in labels[: args.answers]]
    for name in TEMPLATES:
        start = time.perf_counter()
        expected_scores(BUILTIN_JUDGE, items, cache, template=name, desc=name)
        print(f"judge   {name:22s} {len(items)} answers in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
