"""Variants of the mini build's second SFT phase, trained from ``builtin:mini-start`` (its first phase).

The build (``capdpo.models.mini.build_mini``) runs ``instruct-more`` on ``MORE_CLIPS`` fresh clips of
the build's seed, each asked every count and shape question the generator can ask of it. This
script runs that phase with other clips, question sets, steps or learning rates, through the same
``run_phases``, and saves the result as a plain checkpoint; grade it on held-out clips with

    OMP_NUM_THREADS=1 python benchmarks/mini_second_phase.py --out /tmp/phase2/X4 --kinds count,shape --steps 100
    OMP_NUM_THREADS=1 python benchmarks/mini_recipe.py --out /tmp/phase2/X4 --feature-cache /tmp/phase2/held-out \\
        --test-clips 100 --evaluate-model /tmp/phase2/X4/sft/policy --greedy-kinds count,shape --rank-kinds count,shape

Runs of 2026-12-07 (X to X5): docs/results/mini-recipe-2026-12-07.md, "Second phase".
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from capdpo.config import FramesConfig
from capdpo.errors import ItemErrors
from capdpo.media.synthetic import make_synthetic_dataset
from capdpo.models.load import load_policy
from capdpo.models.mini import MORE_CLIPS, TRAIN_CLIPS, TRAIN_KINDS, TRAIN_SEED, mini_sft_config
from capdpo.models.sft import RunRecords, run_examples, run_phases
from capdpo.policy.embed_cache import EmbeddingCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/phase2"), help="rendered clips and tower features, shared by runs")
    ap.add_argument("--cache-dir", default=os.environ.get("CAPDPO_CACHE", str(Path.home() / ".cache" / "capdpo")))
    ap.add_argument("--first-clip", type=int, default=TRAIN_CLIPS, help="the clips' first index (the start trained on 0..299)")
    ap.add_argument("--clips", type=int, default=MORE_CLIPS)
    ap.add_argument("--kinds", default=",".join(TRAIN_KINDS), help="question kinds trained on")
    ap.add_argument("--own-questions", action="store_true", help="each clip's own questions only, not every one it allows")
    ap.add_argument("--steps", type=int, default=mini_sft_config().phases[1].max_steps)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr-llm", type=float, default=5e-4)
    ap.add_argument("--lr-projector", type=float, default=1e-3)
    ap.add_argument("--full", action="store_true", help="train every LLM weight instead of a LoRA (use a lower --lr-llm)")
    args = ap.parse_args()

    started = time.perf_counter()
    clips = make_synthetic_dataset(args.work / "clips", args.first_clip + args.clips, TRAIN_SEED)[args.first_clip:]
    records = RunRecords.of_synthetic(clips, args.kinds.split(","), exhaustive=not args.own_questions)
    print(f"{len(clips)} clips, {len(records.questions)} questions ({time.perf_counter() - started:.0f} s)", flush=True)
    cfg = mini_sft_config()
    phase = cfg.phases[1].model_copy(update={"max_steps": args.steps, "batch_size": args.batch_size,
                                             "lr": {"projector": args.lr_projector, "llm": args.lr_llm},
                                             "lora": not args.full})
    cfg = cfg.model_copy(update={"phases": [phase]})
    policy = load_policy("builtin:mini-start", args.cache_dir, device="cpu")
    errors = ItemErrors("phase 2", fail_fast=True)
    out = run_phases(policy, cfg, FramesConfig(num_frames=policy.spec.num_frames), args.out / "sft",
                     lambda source: run_examples(source, records, cfg.seed, errors),
                     embed_cache=EmbeddingCache(args.work / "embeddings"), errors=errors)
    print(f"{out} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
