"""Preference losses on summed response log-probs, one value per pair (the trainer takes the mean).

Notation: ``pc, pr`` policy log-probs of the chosen / rejected answer, summed over its tokens; ``rc, rr`` the
reference's; ``nc, nr`` the answers' token counts (the tokens summed in ``pc`` / ``pr``). With the DPO margin

    h = (pc - rc) - (pr - rr)

the implicit rewards are ``beta * (pc - rc)`` and ``beta * (pr - rr)``. The losses mirror TRL 1.16's
``DPOTrainer`` loss types of the same names (``tests/test_trl_agreement.py`` checks this), SimPO mirrors TRL's
``CPOTrainer(loss_type="simpo")``. ``preference_loss`` is the single entry point: a loss name or a weighted mix
of names (MPO), optionally plus an NLL term on the chosen answers (RPO).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)``: the logistic loss when the label is flipped with
    probability ``eps`` (cDPO; TRL's CPO/SimPO smoothing)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _per_token(logps: Tensor, tokens: Tensor) -> Tensor:
    """Length-normalised log-prob ``logps / max(tokens, 1)`` (TRL clamps so empty answers do not divide by 0)."""
    return logps / tokens.clamp(min=1)


def sigmoid_dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023), conservative when ``label_smoothing = eps > 0`` (cDPO, Mitchell 2023)::

        -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    ``eps = 0`` is plain DPO, ``-log sigmoid(beta * h)``. TRL 1.16's ``loss_type="sigmoid"`` ignores
    ``label_smoothing``; ``eps > 0`` follows TRL's earlier sigmoid loss (and its CPO trainer) instead.
    """
    return _smoothed_logistic(beta * ((pc - rc) - (pr - rr)), label_smoothing)


def robust_dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under labels flipped with probability ``eps``::

        ((1 - eps) * -log sigmoid(beta * h) - eps * -log sigmoid(-beta * h)) / (1 - 2 * eps)
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    z = beta * ((pc - rc) - (pr - rr))
    return ((1 - label_smoothing) * -F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


def hinge_dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> Tensor:
    """SLiC-style hinge (Zhao et al. 2023): ``relu(1 - beta * h)``."""
    return torch.relu(1 - beta * ((pc - rc) - (pr - rr)))


def ipo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, nc: Tensor, nr: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17) on per-token log-ratios, as TRL computes it::

        ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2

    Both policy and reference log-probs are length-normalised (each log-ratio is divided by its answer's token
    count), which keeps the squared target ``1 / (2 beta)`` independent of answer length.
    """
    return (_per_token(pc - rc, nc) - _per_token(pr - rr, nr) - 1 / (2 * beta)) ** 2


def simpo(pc: Tensor, pr: Tensor, nc: Tensor, nr: Tensor, beta: float, gamma: float,
          label_smoothing: float = 0.0) -> Tensor:
    """SimPO (Meng et al. 2024), reference-free, with TRL's CPO label smoothing::

        -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z),   z = beta * (pc / nc - pr / nr) - gamma
    """
    return _smoothed_logistic(beta * (_per_token(pc, nc) - _per_token(pr, nr)) - gamma, label_smoothing)


def chosen_nll(pc: Tensor, nc: Tensor) -> Tensor:
    """Token-averaged NLL of the chosen answers (RPO's term, TRL's ``loss_type="sft"``)::

        -sum_i pc_i / sum_i nc_i, the same value for every pair

    The average is over all chosen tokens of the batch, like a cross-entropy, so the mean over pairs is exactly
    TRL's value; it is broadcast because it does not split into independent per-pair terms.
    """
    return (-pc.sum() / nc.sum().clamp(min=1)).expand_as(pc)


@dataclass(frozen=True)
class PairLogps:
    """Per-pair inputs of the losses, each of shape ``[pairs]``: summed log-probs and answer token counts.

    The reference log-probs are needed by every loss but ``simpo`` and ``sft``; the token counts by
    ``ipo``, ``simpo`` and ``sft``.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters; defaults are TRL's (``DPOConfig``, and ``CPOConfig.simpo_gamma`` for ``gamma``)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5


_Loss = Callable[[PairLogps, LossParams], Tensor]

LOSSES: dict[str, _Loss] = {
    "sigmoid": lambda x, p: sigmoid_dpo(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected,
                                        p.beta, p.label_smoothing),
    "robust": lambda x, p: robust_dpo(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected,
                                      p.beta, p.label_smoothing),
    "hinge": lambda x, p: hinge_dpo(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected, p.beta),
    "ipo": lambda x, p: ipo(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected,
                            x.chosen_tokens, x.rejected_tokens, p.beta),
    "simpo": lambda x, p: simpo(x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens,
                                p.beta, p.gamma, p.label_smoothing),
    "sft": lambda x, p: chosen_nll(x.policy_chosen, x.chosen_tokens),
}
"""Loss name (TRL's ``loss_type`` spelling) -> per-pair loss."""

REFERENCE_FREE = frozenset({"simpo", "sft"})
NEEDS_TOKEN_COUNTS = frozenset({"ipo", "simpo", "sft"})

Mix = Sequence[tuple[str, float]]


def _terms(loss: str | Mix, rpo_alpha: float | None) -> list[tuple[str, float]]:
    """Normalise a name or a weighted mix to ``[(name, weight), ...]``, with RPO's ``("sft", alpha)`` appended."""
    terms = [(loss, 1.0)] if isinstance(loss, str) else [(name, float(w)) for name, w in loss]
    if rpo_alpha is not None:
        terms.append(("sft", rpo_alpha))
    unknown = [name for name, _ in terms if name not in LOSSES]
    if unknown or not terms:
        raise ValueError(f"unknown loss {unknown or loss!r}; known: {sorted(LOSSES)}")
    return terms


def needs_reference(loss: str | Mix) -> bool:
    """Whether the loss (a name or a mix) reads reference log-probs, i.e. whether a reference pass is needed."""
    return any(name not in REFERENCE_FREE for name, _ in _terms(loss, None))


def mixed_loss(terms: Mix, x: PairLogps, params: LossParams) -> Tensor:
    """Weighted sum of registered losses (MPO, TRL's ``loss_type=[...]`` with ``loss_weights``):
    ``sum_k w_k * loss_k``, per pair."""
    return sum(weight * LOSSES[name](x, params) for name, weight in terms)


def reward_metrics(pc: Tensor, pr: Tensor, rc: Tensor | float, rr: Tensor | float, beta: float,
                   nll: Tensor | None = None) -> dict[str, float]:
    """TRL's DPO metrics, averaged over the batch: ``rewards/chosen = mean(beta * (pc - rc))``, likewise
    ``rewards/rejected``; ``rewards/margins`` the mean difference; ``rewards/accuracies`` the fraction of pairs
    whose chosen reward is strictly higher; ``logps/*`` the mean policy log-probs; ``nll_loss`` when given."""
    chosen = beta * (pc - rc).detach()
    rejected = beta * (pr - rr).detach()
    metrics = {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": pc.detach().mean().item(),
        "logps/rejected": pr.detach().mean().item(),
    }
    if nll is not None:
        metrics["nll_loss"] = nll.detach().mean().item()
    return metrics


def preference_loss(loss: str | Mix = "sigmoid", *, policy_chosen: Tensor, policy_rejected: Tensor,
                    ref_chosen: Tensor | None = None, ref_rejected: Tensor | None = None,
                    chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None,
                    beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5,
                    rpo_alpha: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Per-pair loss and TRL-style metrics for ``loss``: a name in ``LOSSES`` or a weighted mix
    ``[(name, weight), ...]``; ``rpo_alpha`` adds ``rpo_alpha * chosen_nll`` (RPO).

    Metrics follow ``DPOTrainer``; when no term reads the reference (SimPO), they follow ``CPOTrainer``
    instead: rewards ``beta * p / n`` and ``logps/*`` the per-token log-probs.
    """
    terms = _terms(loss, rpo_alpha)
    names = {name for name, _ in terms}
    x = PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)
    if names - REFERENCE_FREE and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"{sorted(names - REFERENCE_FREE)} need reference log-probs")
    if names & NEEDS_TOKEN_COUNTS and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"{sorted(names & NEEDS_TOKEN_COUNTS)} need answer token counts")

    per_pair = mixed_loss(terms, x, LossParams(beta, label_smoothing, gamma))
    nll = chosen_nll(policy_chosen, chosen_tokens) if "sft" in names else None
    if names <= REFERENCE_FREE:
        metrics = reward_metrics(_per_token(policy_chosen, chosen_tokens), _per_token(policy_rejected, rejected_tokens),
                                 0.0, 0.0, beta, nll)
    else:
        metrics = reward_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, nll)
    return per_pair, metrics
