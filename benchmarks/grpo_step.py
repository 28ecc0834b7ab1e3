"""One GRPO optimizer step on a group of G answers: the standard formulation against capdpo's fast path.

Same model (LLaVA-NeXT-Video architecture: DINOv2 + projector + Llama LLM, the built-in mini model
without its pooling: 512 visual tokens at 8 frames), same question, same G answers and advantages,
full fine-tuning of the LLM with the vision tower and projector frozen, KL to a frozen reference copy:

    baseline   each of the G answers is a row of its own that sends the video through the vision
               tower again; the policy runs G rows, the reference copy G more (TRL's GRPOTrainer
               on images, verl/EasyR1 with a video processor)
    fast       the video encoded once (``capdpo.policy.video``'s cache); one packed row holds the
               video + question once and the G answers behind it under a tree mask
               (``capdpo.policy.logps.group_token_logps``), for the policy and for the reference

Sampling is not timed: both formulations sample the group the same way (one ``generate`` call). Each
variant runs in its own process, so the peak memory it reports is its own (CUDA allocator peak on
GPU, max RSS on CPU: weights and runtime included). The loss after one update must agree.

    python benchmarks/grpo_step.py                       # CPU, G = 8, 8 frames, 64-token answers
    python benchmarks/grpo_step.py --device cuda --dtype bfloat16 --preset 1b --init random
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import statistics
import time

import torch
from dpo_step import PRESETS, WORDS, build_policy, encode, print_table, run_variants

VARIANTS = ("baseline", "fast")


def make_group(policy, args):
    """One synthetic clip, one question, G answers of ``answer_tokens`` tokens and their advantages."""
    from capdpo.media.synthetic import draw_frame, random_scene

    rng = random.Random(0)
    scene = random_scene(1000)
    frames = [draw_frame(scene, round(k * (scene.n_frames - 1) / (args.frames - 1))) for k in range(args.frames)]
    layout = policy.layout(args.frames, frames[0].height, frames[0].width)
    inputs = policy.preprocess(frames, layout)
    prompt = policy.prompt_ids("What happens in the video, and in which order?", layout)
    answers = []
    for _ in range(args.group):
        ids = policy.tokenizer(" ".join(rng.choices(WORDS, k=args.answer_tokens)), add_special_tokens=False)["input_ids"]
        answers.append(ids[: args.answer_tokens - 1] + [policy.tokenizer.eos_token_id])
    advantages = torch.tensor([rng.uniform(-1, 1) for _ in range(args.group)])
    return inputs, prompt, answers, advantages


def run_variant(args) -> dict:
    from capdpo.grpo_loss import grpo_loss
    from capdpo.policy.logps import group_token_logps

    device = torch.device(args.device)
    policy = build_policy(args)
    inputs, prompt, answers, advantages = make_group(policy, args)
    reference = copy.deepcopy(policy.model).eval().requires_grad_(False)
    cached = encode(policy, inputs) if args.variant == "fast" else None

    def logps(p):
        if args.variant == "fast":
            return group_token_logps(p, [cached], [prompt], [answers])
        # G rows, each with its own pass of the video through the vision tower
        videos = [p.encode(inputs) for _ in answers]
        rows = p.token_logps(videos, [prompt] * len(answers), answers)
        matrix = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        lengths = torch.tensor([len(r) for r in rows], device=matrix.device)
        return matrix, (torch.arange(matrix.shape[1], device=matrix.device)[None] < lengths[:, None]).to(matrix.dtype)

    model = policy.model
    for name, p in model.named_parameters():
        p.requires_grad_(policy.parts.part_of(name) == "llm")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        lp, mask = logps(policy)
        with torch.no_grad():
            ref, _ = logps(policy.with_model(reference, "reference"))
        loss, _ = grpo_loss(lp, advantages.to(lp.device, lp.dtype), mask, ref_logps=ref, loss_type="dapo", beta=0.04)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"variant": args.variant, "step_s": statistics.median(times[args.warmup:]), "peak_mb": peak,
            "loss_after_update": losses[1] if len(losses) > 1 else losses[0], "visual_tokens": inputs.layout.n_visual,
            "prompt_tokens": len(prompt), "answer_tokens": len(answers[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="weights dtype (bfloat16 on GPU)")
    ap.add_argument("--preset", default="mini", choices=sorted(PRESETS))
    ap.add_argument("--init", default="pretrained", choices=["pretrained", "random"])
    ap.add_argument("--model-dir", help="checkpoint dir for config and tokenizer (default: the built-in mini model)")
    ap.add_argument("--group", type=int, default=8, help="G: answers per question")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variant", choices=VARIANTS, help="run one variant here and print its JSON")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = run_variants(__file__, args, list(VARIANTS))
    base = rows[0]
    print(f"G = {args.group} answers of {base['answer_tokens']} tokens, {base['visual_tokens']} visual tokens ({args.frames} frames), "
          f"prompt {base['prompt_tokens']} tokens; {args.device} {args.dtype}, preset {args.preset}, {args.init} weights; "
          f"median of {args.steps} steps after {args.warmup} warm-up\n")
    print_table(rows)

if __name__ == "__main__":
    main()
