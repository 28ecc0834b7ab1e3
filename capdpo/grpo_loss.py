"""GRPO's two formulas: group-normalised advantages from rewards, and the clipped policy-gradient loss.

Both follow TRL's ``GRPOTrainer`` (its ``_generate_and_score_completions`` and ``_compute_loss``) term by
term, so a run here means what a TRL run with the same settings means; ``tests/test_trl_grpo_agreement.py``
checks it on the same completions. The loss variants are the ones TRL documents:

* ``grpo``: each completion's token losses averaged over its own length, then over completions
  (favours short correct answers, lengthens wrong ones: the length bias Dr. GRPO removes);
* ``bnpo``: token losses averaged over every token of the batch;
* ``dr_grpo``: summed, divided by completions x ``max_completion_length`` (a constant: no length bias);
* ``dapo``: summed, divided by the completion tokens of the whole generation batch
  (``num_items_in_batch``: token-level normalisation across accumulation steps).

Everything is per token: ``(completions, tokens)`` tensors with a 0/1 ``mask`` over the completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
RewardScale = Literal["group", "batch", "none"]
ADVANTAGE_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantage 0, not 0/0


@dataclass(frozen=True)
class GroupAdvantages:
    """What one generation batch's rewards give: an advantage per completion and the reward metrics TRL logs."""

    advantages: torch.Tensor  # (completions,): 0 for a completion no reward function could score
    rewards: torch.Tensor  # (completions,): weighted sum over the functions; NaN where unscorable
    metrics: dict[str, float]


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation ignoring NaNs (Bessel-corrected, as torch.std and TRL's nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nansum((x - mean) ** 2, dim=dim) / (count - 1)
    return var.sqrt()


def group_advantages(rewards_per_function: torch.Tensor, weights: torch.Tensor, group_size: int,
                     names: list[str], scale: RewardScale = "group") -> GroupAdvantages:
    """Advantages of ``(completions, functions)`` rewards whose rows come in groups of ``group_size``
    answers to one prompt: the weighted sum minus its group's mean, divided by the group's std
    (``scale="group"``), the batch's std (``"batch"``) or nothing (``"none"``: Dr. GRPO). A NaN
    reward means "this function does not apply" (e.g. a rule reward on an open question); a
    completion no function scores gets advantage 0 and is left out of its group's baseline."""
    if rewards_per_function.shape[0] % group_size:
        raise ValueError(f"{rewards_per_function.shape[0]} completions do not split into groups of {group_size}")
    unscorable = torch.isnan(rewards_per_function).all(dim=1)
    rewards = (rewards_per_function * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, group_size)
    baseline = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    if scale == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif group_size > 1:
        std = _nanstd(grouped, dim=1).repeat_interleave(group_size)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - baseline
    if scale != "none":
        advantages = advantages / (std + ADVANTAGE_EPS)
    metrics = {}
    for i, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_function[:, i]).item()
        metrics[f"rewards/{name}/std"] = _nanstd(rewards_per_function[:, i]).item()
    metrics["reward"] = torch.nanmean(rewards).item()
    metrics["reward_std"] = _nanstd(rewards).item()
    metrics["frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
    return GroupAdvantages(torch.nan_to_num(advantages, nan=0.0), rewards, metrics)


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
              loss_type: LossType = "dapo", beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, max_completion_length: int | None = None,
              num_items_in_batch: float | None = None, kl_ratio_correction: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate of PPO with GRPO's advantages and a k3 KL estimate to the reference.

    ``logps``/``old_logps``/``ref_logps``: per-token log-probs of the completions under the policy
    being trained, the policy that sampled them (None: the same, detached: one update per batch)
    and the reference. ``beta`` weighs the KL term (0: no reference needed); ``kl_ratio_correction``
    multiplies it by the importance ratio, which makes its gradient the unbiased reverse-KL gradient
    (DeepSeek-V3.2; TRL's default ``use_bias_correction_kl``). Returns the loss and
    the metrics TRL logs for it (kl, clip ratios)."""
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, float] = {}

    def masked_mean(x: torch.Tensor) -> float:
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()

    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's per-token log-probs")
        # k3 estimator of KL(policy || reference): unbiased, always >= 0
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if kl_ratio_correction:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl.detach())
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo divides by max_completion_length: pass it")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=logps.dtype)
        loss = (per_token * mask).sum() / items.clamp(min=1.0)
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}: grpo, bnpo, dr_grpo or dapo")
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(logps.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(logps.dtype)
        per_completion = mask.sum(-1)
        metrics["clip_ratio/low_mean"] = masked_mean(low)
        metrics["clip_ratio/high_mean"] = masked_mean(high)
        metrics["clip_ratio/region_mean"] = masked_mean(torch.maximum(low, high))
        # per completion, then the extreme over completions; an empty completion (NaN) is left out
        low_share, high_share = ((x * mask).sum(-1) / per_completion for x in (low, high))
        metrics["clip_ratio/low_min"] = _nan_extreme(low_share, torch.min)
        metrics["clip_ratio/high_max"] = _nan_extreme(high_share, torch.max)
    return loss, metrics


def _nan_extreme(x: torch.Tensor, extreme) -> float:
    kept = x[~torch.isnan(x)]
    return extreme(kept).item() if len(kept) else float("nan")


def completion_metrics(lengths: torch.Tensor, terminated: torch.Tensor) -> dict[str, float]:
    """TRL's completion-length metrics: over all completions, and over those that ended with EOS
    (the rest were cut at the token limit: ``clipped_ratio``; none ended: the terminated ones read 0)."""
    lengths = lengths.float()
    done = lengths[terminated.bool()] if terminated.any() else torch.zeros(1)
    return {"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": 1 - terminated.float().mean().item(),
            "completions/mean_terminated_length": done.mean().item(),
            "completions/min_terminated_length": done.min().item(),
            "completions/max_terminated_length": done.max().item()}
