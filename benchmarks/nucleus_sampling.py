"""Sampling with top-p: what ``RowSampler`` does at each decoding step, before and after.

Before, every row of a ``sample.batch_size: 8``, ``n: 8`` call (64 rows) sorted SmolLM2's whole
49,152-token vocabulary to find its nucleus and drew its token with a random number per vocabulary
entry. Now ``capdpo.policy.sampling.nucleus`` takes the 256 likeliest tokens with ``topk`` (a row
is sorted in full only when they hold less than ``top_p``) and the draw is over the kept tokens.
The first change keeps the same tokens (the run must say ``same answers: True``); the second draws
from the same distribution with other random numbers, so its answers differ from before's. All
variants run in one process on the same clip and seeds, alternating:

    python benchmarks/nucleus_sampling.py                 # builtin:mini, 8 questions x 8 answers, top_p 0.95
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from sample_throughput import QUESTIONS, clip_frames, encoded

from capdpo.models.load import load_policy
from capdpo.policy import sampling


def full_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by sorting every row's whole vocabulary (the sampler before ``topk``)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


def vocabulary_draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The draw before: one random number per vocabulary entry."""
    return torch.multinomial(probs, 1, generator=generator)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:mini")
    ap.add_argument("--cache-dir", default=os.environ.get("CAPDPO_CACHE", str(Path.home() / ".cache" / "capdpo")))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3, help="passes per variant; the median is reported")
    args = ap.parse_args()
    policy = load_policy(args.model, args.cache_dir, "cpu", "float32")
    video = encoded(policy, clip_frames(8))
    topk_nucleus, nucleus_draw = sampling.nucleus, sampling._draw

    def sample() -> list[list[str]]:
        return policy.generate_batch([(video, q) for q in QUESTIONS], n=args.n, temperature=1.0, top_p=args.top_p,
                                     max_new_tokens=args.max_new_tokens, seeds=[1000 * i for i in range(len(QUESTIONS))])

    variants = {"before: full sort, draw over the vocabulary": (full_sort, vocabulary_draw),
                "top-256 first, draw over the vocabulary": (topk_nucleus, vocabulary_draw),
                "top-256 first, draw over the nucleus (capdpo)": (topk_nucleus, nucleus_draw)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    answers = {}
    sample()  # warm-up
    for _ in range(args.repeats):
        for name, (nucleus, draw) in variants.items():
            sampling.nucleus, sampling._draw = nucleus, draw
            start = time.perf_counter()
            answers[name] = sample()
            seconds[name].append(time.perf_counter() - start)
    sampling.nucleus, sampling._draw = topk_nucleus, nucleus_draw
    before, *_ = variants
    same = answers[before] == answers["top-256 first, draw over the vocabulary"]
    rows = len(QUESTIONS) * args.n
    print(f"{args.model}: {len(QUESTIONS)} questions x {args.n} answers = {rows} rows, top_p {args.top_p}, "
          f"max_new_tokens {args.max_new_tokens}, threads {torch.get_num_threads()}, median of {args.repeats}; "
          f"same answers: {same}\n")
    print("| sampler | seconds | s per question | speed-up |\n|---|---:|---:|---:|")
    median = {name: sorted(s)[len(s) // 2] for name, s in seconds.items()}
    for name, s in median.items():
        print(f"| {name} | {s:.2f} | {s / len(QUESTIONS):.2f} | {median[before] / s:.2f}x |")


if __name__ == "__main__":
    main()
