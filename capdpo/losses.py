"""Preference losses on summed response log-probs.

Notation: ``pc, pr`` policy log-probs of the chosen / rejected answer, ``rc, rr`` the reference's;
the implicit rewards are ``beta * (pc - rc)`` and ``beta * (pr - rr)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_dpo(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> torch.Tensor:
    """Standard DPO (Rafailov et al. 2023): ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``, per pair."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def reward_metrics(pc, pr, rc, rr, beta: float) -> dict[str, float]:
    """TRL's DPO metrics, averaged over the batch."""
    chosen = beta * (pc - rc).detach()
    rejected = beta * (pr - rr).detach()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": pc.detach().mean().item(),
        "logps/rejected": pr.detach().mean().item(),
    }
