"""Candidates per second of the hf sampling backend: N answers per question as one batch on one
encoded video, against a naive loop of N generate calls that re-encodes the video every time, and
against all questions' N answers in one generate call (``sample.batch_size`` questions per call).

    python benchmarks/sample_throughput.py --threads 1          # builtin:mini on CPU, N = 1, 4, 8
    python benchmarks/sample_throughput.py --device cuda --dtype bfloat16

Both modes start from the same decoded frames (decoding is not timed) and count preprocessing,
vision tower + projector, and generation. The vision tower's calls are counted with a forward hook.
Every answer is exactly ``--max-new-tokens`` long (end-of-sequence suppressed), so both modes
generate the same number of tokens. Modes alternate within each repeat and the median repeat is
reported, so load from other jobs on the machine hits both alike. On a CPU shared with other work use ``--threads 1``: OpenMP threads
competing for busy cores made every call ~17x slower here.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capdpo.models.load import load_policy
from capdpo.policy.base import VideoPolicy

QUESTIONS = ["What shapes are in the video?", "Which way does the circle move?", "What colour is the background?",
             "How many shapes appear in the video?", "Does the square change colour?", "Which shape appears first?",
             "What does the red shape do during the video?", "Is anything still at the end?"]


def clip_frames(num_frames: int, seed: int = 0) -> list[Image.Image]:
    """Moving shapes on a plain background: content does not change the cost, only the size does."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(num_frames):
        img = np.full((240, 320, 3), 200, dtype=np.uint8)
        img[60:120, 40 + 20 * t : 100 + 20 * t] = (220, 40, 40)
        img[150:200, 200:260] = rng.integers(0, 255, 3, dtype=np.uint8)
        frames.append(Image.fromarray(img))
    return frames


def encoded(policy: VideoPolicy, frames):
    with torch.inference_mode():
        return policy.encode(policy.preprocess(frames))


def questions_per_call(policy: VideoPolicy, frames, n: int, max_new_tokens: int) -> list[str]:
    """capdpo's sampler with ``sample.batch_size`` >= the questions: encode once, one generate of
    len(QUESTIONS) x n rows (every row seeded on its own)."""
    video = encoded(policy, frames)
    answers = policy.generate_batch([(video, q) for q in QUESTIONS], n=n, temperature=1.0, top_p=0.95,
                                    max_new_tokens=max_new_tokens, seeds=[1000 * i for i in range(len(QUESTIONS))])
    return [a for rows in answers for a in rows]


def question_per_call(policy: VideoPolicy, frames, n: int, max_new_tokens: int) -> list[str]:
    """``sample.batch_size: 1``: encode once, one generate of n rows per question."""
    video = encoded(policy, frames)
    return [a for i, q in enumerate(QUESTIONS)
            for a in policy.generate(video, q, n=n, temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens, seed=1000 * i)]


def one_by_one(policy: VideoPolicy, frames, n: int, max_new_tokens: int) -> list[str]:
    """A naive loop: every answer re-encodes the video and runs its own generate call."""
    return [a for i, q in enumerate(QUESTIONS) for k in range(n)
            for a in policy.generate(encoded(policy, frames), q, n=1, temperature=1.0, top_p=0.95,
                                     max_new_tokens=max_new_tokens, seed=1000 * i + k)]


def measure(policy: VideoPolicy, mode, frames, n: int, max_new_tokens: int) -> dict:
    """One pass over the questions: candidates, seconds, vision-tower calls per question."""
    calls = []
    hook = policy.vision_module().register_forward_hook(lambda *args: calls.append(1))
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        answers = mode(policy, frames, n, max_new_tokens)
    finally:
        hook.remove()
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"candidates": len(answers), "seconds": seconds, "per_s": len(answers) / seconds,
            "vision_calls": len(calls) / len(QUESTIONS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:mini")
    parser.add_argument("--cache-dir", default=os.environ.get("CAPDPO_CACHE", str(Path.home() / ".cache" / "capdpo")))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--n", default="1,8", help="samples per question, comma-separated")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="passes per (N, mode); the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    policy = load_policy(args.model, args.cache_dir, args.device, args.dtype)
    policy.model.generation_config.min_new_tokens = args.max_new_tokens  # same token count in both modes
    frames = clip_frames(args.frames)
    measure(policy, question_per_call, frames, 1, 4)  # warm-up: first-call allocations and kernel selection
    print(f"model {args.model} on {policy.device} ({policy.model.dtype}), {args.frames} frames -> "
          f"{policy.layout(args.frames, 240, 320).n_visual} visual tokens, {len(QUESTIONS)} questions, "
          f"max_new_tokens {args.max_new_tokens}, threads {torch.get_num_threads()}, median of {args.repeats}\n")
    print("| N | mode | candidates | seconds | candidates/s | vision calls / question | speed-up vs one-by-one |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    modes = {"one-by-one": one_by_one, "1 question per call": question_per_call,
             f"{len(QUESTIONS)} questions per call": questions_per_call}
    for n in map(int, args.n.split(",")):
        runs = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, mode in modes.items():
                runs[name].append(measure(policy, mode, frames, n, args.max_new_tokens))
        rows = {name: sorted(r, key=lambda x: x["seconds"])[len(r) // 2] for name, r in runs.items()}
        for name, r in rows.items():
            speedup = f"{r['per_s'] / rows['one-by-one']['per_s']:.2f}x" if name != "one-by-one" else ""
            print(f"| {n} | {name} | {r['candidates']} | {r['seconds']:.2f} | {r['per_s']:.2f} | {r['vision_calls']:.0f} | {speedup} |")


if __name__ == "__main__":
    main()
