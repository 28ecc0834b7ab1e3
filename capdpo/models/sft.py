"""Supervised fine-tuning of a video policy on (video, prompt, response) examples.

Used to align the built-in mini model's freshly initialised projector and to give it a starting
policy (method.md step 4). The vision tower stays frozen; the projector is trained fully and the
LLM through LoRA adapters that are merged back, so the result is a plain checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from capdpo.policy.base import TowerFeatures, VideoInputs, VideoPolicy
from capdpo.policy.packing import behind_shared_prefix, video_grouped_order


@dataclass(frozen=True)
class SFTExample:
    video_key: str  # key of the preprocessed video handed to `supervised_finetune`
    prompt: str
    response: str


def example_logps(policy: VideoPolicy, inputs: dict[str, VideoInputs | TowerFeatures], batch: list[SFTExample],
                  max_response_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of the batch's responses, grouped by video (the loss only
    sums them). Each video is encoded once (with autograd: the projector learns), from its pixels
    or its tower features, and its examples share one packed row: the video tokens and the
    prompts' common start run once, each example's question rest and response behind them."""
    keys = list(dict.fromkeys(e.video_key for e in batch))
    videos = {k: policy.embeddings(inputs[k]) for k in keys}
    prompts = [policy.prompt_ids(e.prompt, videos[e.video_key].layout) for e in batch]
    responses = [policy.response_ids(e.response, max_response_tokens) for e in batch]
    if not policy.shares_prompt_prefix:  # attention without a custom 4D mask: one row per example
        return policy.sequence_logps([videos[e.video_key] for e in batch], prompts, responses)
    rows = []
    for k in keys:
        members = [i for i, e in enumerate(batch) if e.video_key == k]
        rows.append(behind_shared_prefix([prompts[i] for i in members], [[responses[i]] for i in members]))
    return policy.branch_logps([videos[k] for k in keys], rows)


def supervised_finetune(policy: VideoPolicy, pixels: dict[str, VideoInputs], examples: list[SFTExample], *,
                        epochs: int = 1, batch_size: int = 4, lr: float = 1e-3, lora_r: int = 32, seed: int = 0,
                        max_response_tokens: int = 128) -> list[float]:
    """Train projector + LoRA(LLM), merge the adapters into ``policy.model``; returns step losses.
    Batches hold whole videos where they fit (``video_grouped_order``), whose examples share one
    packed row (``example_logps``)."""
    torch.manual_seed(seed)
    model = policy.model
    for p in model.parameters():
        p.requires_grad_(False)
    # LoRA on the language model's linear layers only: the vision tower stays frozen and the
    # projector is trained in full
    peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_r, target_modules=policy.parts.lora_targets(),
                                                  lora_dropout=0.0))
    for name, p in model.named_parameters():
        if policy.parts.part_of(name) == "projector":
            p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # the frozen tower runs once per video, the projector every step
        inputs = {k: policy.tower_features(v) for k, v in pixels.items()} if policy.splits_projector else pixels
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    sched = get_linear_schedule_with_warmup(opt, max(1, steps // 10), steps)
    model.train()
    losses: list[float] = []
    with tqdm(total=steps, desc="sft", unit="step") as bar:
        for epoch in range(epochs):
            order = video_grouped_order([e.video_key for e in examples], seed * 1_000_003 + epoch)
            for start in range(0, len(order), batch_size):
                batch = [examples[i] for i in order[start : start + batch_size]]
                logps, n_tokens = example_logps(policy, inputs, batch, max_response_tokens)
                loss = -(logps.sum() / n_tokens.sum())  # mean token NLL over the batch
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    policy.model = peft_model.merge_and_unload().eval()
    return losses
