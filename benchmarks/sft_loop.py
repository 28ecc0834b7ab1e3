"""The in-memory SFT loop the recipe benchmarks use (``mini_recipe.py``, ``perception_sft.py``):
examples keyed by a preprocessed video, LoRA on the LLM with the projector in full, one optimizer
step at a time. The product trains through ``capdpo sft``'s phases (``capdpo.models.sft.run_phases``);
this loop stays here because the benchmarks train on features drawn straight from the scenes and
evaluate between steps, which the stage's machinery does not do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from capdpo.policy.base import TowerFeatures, VideoInputs, VideoPolicy
from capdpo.policy.logps import answer_logps


@dataclass(frozen=True)
class SFTExample:
    video_key: str  # key of the preprocessed video (or its tower features) in the inputs dict
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
    grouped = [e for k in keys for e in batch if e.video_key == k]
    return answer_logps(policy, [videos[e.video_key] for e in grouped],
                        [policy.prompt_ids(e.prompt, videos[e.video_key].layout) for e in grouped],
                        [policy.response_ids(e.response, max_response_tokens) for e in grouped])


def lora_and_projector(policy: VideoPolicy, r: int, alpha: int):
    """``policy.model`` wrapped with LoRA on the language model's linear layers, the projector
    trained in full and the vision tower frozen; returns the PEFT model."""
    policy.model.requires_grad_(False)
    peft_model = get_peft_model(policy.model, LoraConfig(r=r, lora_alpha=alpha, target_modules=policy.parts.lora_targets(),
                                                         lora_dropout=0.0))
    for name, p in policy.model.named_parameters():
        if policy.parts.part_of(name) == "projector":
            p.requires_grad_(True)
    return peft_model


def finetune_step(policy: VideoPolicy, inputs: dict[str, VideoInputs | TowerFeatures], batch: list[SFTExample],
             max_response_tokens: int, opt: torch.optim.Optimizer, sched, trainable: list[torch.nn.Parameter]) -> float:
    """One optimizer step on the mean token NLL of ``batch``'s answers (gradients clipped at 1); returns the loss."""
    logps, n_tokens = example_logps(policy, inputs, batch, max_response_tokens)
    loss = -(logps.sum() / n_tokens.sum())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()
