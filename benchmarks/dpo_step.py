"""One DPO optimizer step: the standard formulation against capdpo's optimisations, alone and together.

Same model (LLaVA-NeXT-Video architecture: DINOv2 + projector + Llama LLM), same pairs, same batch,
full fine-tuning of the LLM with vision tower and projector frozen (the paper's setting):

    baseline        each video encoded for the chosen rows, the rejected rows and the reference rows
                    of every step; chosen and rejected as two rows; a frozen reference copy held in
                    memory and run every step (TRL / LLaMA-Factory / the paper's code)
    embed-cache     videos encoded once before training (``capdpo.policy.embed_cache``), embeddings reused
    ref-cache       reference log-probs precomputed once (``capdpo.reference``): no reference model
    shared-prefix   one packed row per pair, the video + question prefix computed once
                    (``VideoPolicy.pair_logps``)
    all             the three together: capdpo's default trainer path; with --pairs-per-video K > 1
                    the K pairs of a video (different questions) share one packed row, the video run once
    all-per-pair    as ``all``, but each pair in a row of its own (before pairs were grouped by video)

Each variant runs in its own process, so the peak memory it reports is its own: CUDA's allocator
peak on GPU, the process's max RSS on CPU (weights and the Python runtime included). The loss after
the first update must be the same for every variant (same weights, same batch, same gradients).

    python benchmarks/dpo_step.py                                  # CPU, the built-in mini model
    python benchmarks/dpo_step.py --device cuda --dtype bfloat16 --preset 1b --init random
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {  # name: (encode once, reference cached, shared prefix, a video's pairs in one row)
    "baseline": (False, False, False, False),
    "embed-cache": (True, False, False, False),
    "ref-cache": (False, True, False, False),
    "shared-prefix": (False, False, True, False),
    "all-per-pair": (True, True, True, False),
    "all": (True, True, True, True),
}
PRESETS = {
    # the built-in mini model, without its 2x2 pooling: 8 x 8 x 8 = 512 visual tokens at 112 px
    "mini": {"image_size": 112, "vision": {}, "text": {}},
    # a ~1.2B Llama LLM and a ViT-L/14 at 224 px: 8 x 16 x 16 = 2048 visual tokens (a GPU workload)
    "1b": {"image_size": 224,
           "vision": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4, "image_size": 224},
           "text": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64}},
}
WORDS = ("the red circle moves left while a blue square stays still near the top of the frame and then "
         "a green triangle appears in the lower right corner before the circle turns yellow").split()


def build_policy(args):
    """The benchmark's policy: the mini checkpoint's tokenizer and config, pooling off, sized by preset."""
    from transformers import AutoConfig, AutoTokenizer, LlavaNextVideoForConditionalGeneration

    from capdpo.policy.base import VisionSpec
    from capdpo.policy.llava import LlavaNextVideoPolicy

    src = Path(args.model_dir) if args.model_dir else mini_dir()
    preset = PRESETS[args.preset]
    config = AutoConfig.from_pretrained(src)
    config.spatial_pool_stride = 1
    for k, v in preset["vision"].items():
        setattr(config.vision_config, k, v)
    for k, v in preset["text"].items():
        setattr(config.text_config, k, v)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.init == "random":
        with torch.device(args.device):  # initialised where it runs: seconds, not minutes, for the 1b preset
            model = LlavaNextVideoForConditionalGeneration(config).to(dtype)
    else:
        model = LlavaNextVideoForConditionalGeneration.from_pretrained(src, config=config, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    spec = VisionSpec.load(src)
    spec = VisionSpec(image_size=preset["image_size"], num_frames=args.frames, mean=spec.mean, std=spec.std, crop=spec.crop)
    return LlavaNextVideoPolicy(model.to(args.device), AutoTokenizer.from_pretrained(src), spec, "bench", config=config, path=src)


def mini_dir() -> Path:
    from capdpo.models.mini import mini_model_dir

    return mini_model_dir(Path(os.environ.get("CAPDPO_CACHE", Path.home() / ".cache" / "capdpo")))


def make_batch(policy, args):
    """``pairs`` pairs on ``pairs / pairs_per_video`` synthetic clips (drawn frames, no decoding), each
    pair with its own question and two ~64-token answers."""
    from capdpo.media.synthetic import draw_frame, random_scene

    rng = random.Random(0)
    batch = []
    for i in range(args.pairs):
        scene = random_scene(1000 + i // args.pairs_per_video)
        frames = [draw_frame(scene, round(k * (scene.n_frames - 1) / (args.frames - 1))) for k in range(args.frames)]
        layout = policy.layout(args.frames, frames[0].height, frames[0].width)
        inputs = policy.preprocess(frames, layout)

        def answer():
            ids = policy.tokenizer(" ".join(rng.choices(WORDS, k=args.answer_tokens)), add_special_tokens=False)["input_ids"]
            return ids[: args.answer_tokens - 1] + [policy.tokenizer.eos_token_id]

        prompt = policy.prompt_ids(f"Question {i}: what happens in the video, and in which order?", layout)
        batch.append((inputs, prompt, answer(), answer()))
    return batch


def encode(policy, inputs):
    with torch.no_grad():
        return policy.encode(inputs)


def run_variant(args) -> dict:
    """Time ``args.steps`` steps after ``args.warmup`` of one variant; returns its figures."""
    from capdpo.losses import preference_loss

    encode_once, ref_cached, shared_prefix, grouped = VARIANTS[args.variant]
    device = torch.device(args.device)
    policy = build_policy(args)
    batch = make_batch(policy, args)
    prompts, chosen, rejected = [b[1] for b in batch], [b[2] for b in batch], [b[3] for b in batch]

    def videos_for(p):
        """The videos of the chosen and the rejected rows. The standard formulation sends the pixels
        through the vision tower once per row; a packed row holds its video once."""
        if encode_once:
            return cached_videos, cached_videos
        if shared_prefix:
            once = [encode(p, b[0]) for b in batch]
            return once, once
        return [encode(p, b[0]) for b in batch], [encode(p, b[0]) for b in batch]

    def logps(p, chosen_videos, rejected_videos):
        if shared_prefix:
            return p.pair_logps(chosen_videos, prompts, chosen, rejected)[:2]
        out, _ = p.sequence_logps(chosen_videos + rejected_videos, prompts + prompts, chosen + rejected)
        return out.chunk(2)

    # what the optimisations do once, before training
    # one EncodedVideo per video, shared by its pairs (pair_logps then packs them in one row), or one per pair
    per_video = {}
    cached_videos = [per_video.setdefault(i // args.pairs_per_video if grouped else i, encode(policy, b[0]))
                     for i, b in enumerate(batch)] if encode_once else None
    ref_logps = None
    if ref_cached:
        with torch.no_grad():
            ref_logps = logps(policy, *videos_for(policy))
    reference = None if ref_cached else copy.deepcopy(policy.model).eval().requires_grad_(False)

    model = policy.model
    for name, p in model.named_parameters():
        p.requires_grad_(policy.parts.part_of(name) == "llm")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        # 1-2. policy log-probs (videos from the cache or through the tower again)
        pc, pr = logps(policy, *videos_for(policy))
        # 3. reference log-probs: the cache, or the frozen copy run on its own videos
        if ref_logps is not None:
            rc, rr = ref_logps
        else:
            ref = policy.with_model(reference, "reference")
            with torch.no_grad():
                rc, rr = logps(ref, *videos_for(ref))
        # 4. loss, update
        loss, _ = preference_loss("sigmoid", policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr, beta=0.1)
        loss = loss.mean()
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
    n_visual = batch[0][0].layout.n_visual
    return {"variant": args.variant, "step_s": statistics.median(times[args.warmup:]), "peak_mb": peak,
            "loss_after_update": losses[1], "visual_tokens": n_visual, "prompt_tokens": len(prompts[0]),
            "answer_tokens": len(chosen[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="weights dtype (bfloat16 on GPU)")
    ap.add_argument("--preset", default="mini", choices=sorted(PRESETS))
    ap.add_argument("--init", default="pretrained", choices=["pretrained", "random"],
                    help="pretrained = the mini checkpoint's weights; random = its config at the preset's size")
    ap.add_argument("--model-dir", help="checkpoint dir for config and tokenizer (default: the built-in mini model)")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step")
    ap.add_argument("--pairs-per-video", type=int, default=1, help="pairs sharing one video (each its own question)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="run one variant here and print its JSON")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="variants to compare (comma-separated)")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    rows = run_variants(__file__, args, args.variants.split(","), skip=("variant", "variants"))
    base = rows[0]
    print(f"{args.pairs} pairs/step, {base['visual_tokens']} visual tokens ({args.frames} frames), prompt {base['prompt_tokens']} "
          f"tokens, answers {base['answer_tokens']} tokens; {args.device} {args.dtype}, preset {args.preset}, {args.init} weights; "
          f"median of {args.steps} steps after {args.warmup} warm-up\n")
    print_table(rows)


def run_variants(script: str, args: argparse.Namespace, names: list[str], skip: tuple[str, ...] = ("variant",)) -> list[dict]:
    """Each variant of ``script`` in its own process (so its peak memory is its own), with the same
    arguments; returns the JSON row each printed last."""
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None and k not in skip]
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, script, *passthrough, "--variant", name], check=False, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"variant {name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    return rows


def print_table(rows: list[dict]) -> None:
    """Step time, peak memory and loss after one update of each variant, against the first."""
    base = rows[0]
    print("| variant | step (s) | speed-up | peak memory (MiB) | memory ratio | loss after 1 update |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['step_s']:.3f} | {base['step_s'] / r['step_s']:.2f}x | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / base['peak_mb']:.2f} | {r['loss_after_update']:.6f} |")

if __name__ == "__main__":
    main()
