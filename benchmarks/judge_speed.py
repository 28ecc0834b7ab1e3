"""Judging speed of local judges on CPU (hf backend): answers per second.

Judges the same answers - synthetic clips' questions, 8 answers each (the reference and variants
with swapped facts), the caption-reward prompt - with each judge and mode, in one process so the
ratios are measured under the same load:

* ``expected`` through the prefix tree (the default: each batch is one forward pass in which the
  instructions and a question's caption are computed once);
* ``expected`` with one padded prompt per row (how it worked before; ``--no-plain`` skips it);
* ``generate`` (a free reply, parsed; the distilled student replies ``Score: N`` in 4 tokens).

    python benchmarks/judge_speed.py                       # base SmolLM2 and builtin:judge-mini
    python benchmarks/judge_speed.py --answers 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

from capdpo.config import JudgeConfig, LLMConfig, RunConfig
from capdpo.distill import judge_item, synthetic_labels
from capdpo.judge.judge import CaptionJudge


def timed(judge: CaptionJudge, items, batch_size: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    failed = 0
    for start in range(0, len(items), batch_size):
        failed += sum(j.score is None for j in judge.judge(items[start:start + batch_size]))
    return len(items) / (time.perf_counter() - t0), failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="builtin:smollm2,builtin:judge-mini")
    ap.add_argument("--answers", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-plain", action="store_true", help="Skip the one-prompt-per-row baseline.")
    args = ap.parse_args()
    cache_dir = RunConfig().cache_dir
    items = [judge_item(lab) for lab in synthetic_labels(8, args.answers // 8 + 1, 8)][: args.answers]
    print(f"{len(items)} answers, batch {args.batch_size}, hf backend on CPU\n")
    print("| judge | mode | answers/s | failed |\n|---|---|---:|---:|")
    for model in args.models.split(","):
        llm = None
        runs = [("expected", "prefix tree"), ("expected", "one prompt per row"), ("generate", "")]
        for mode, how in runs:
            if how == "one prompt per row" and args.no_plain:
                continue
            cfg = JudgeConfig(llm=LLMConfig(model=model, batch_size=args.batch_size, max_new_tokens=16), mode=mode, retries=0)
            judge = CaptionJudge(cfg, cache_dir, llm=llm)
            llm = judge.llm
            if how == "one prompt per row":
                with mock.patch("capdpo.llm.backends.TREE_MASK_ATTENTION", ()):  # the padded path
                    speed, failed = timed(judge, items, args.batch_size)
            else:
                speed, failed = timed(judge, items, args.batch_size)
            print(f"| {model} | {mode}{f' ({how})' if how else ''} | {speed:.2f} | {failed}/{len(items)} |", flush=True)


if __name__ == "__main__":
    main()
