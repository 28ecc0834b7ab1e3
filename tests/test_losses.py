"""The preference-loss family on tiny hand-checked tensors."""

from __future__ import annotations

import math

import pytest
import torch

from capdpo.losses import (
    LOSSES,
    chosen_nll,
    hinge_dpo,
    ipo,
    needs_reference,
    preference_loss,
    reward_metrics,
    robust_dpo,
    sigmoid_dpo,
    simpo,
)

BETA = 0.5
L_POS = math.log1p(math.exp(-1))  # -log sigmoid(1)  = 0.3132616875...
L_NEG = math.log1p(math.exp(1))  # -log sigmoid(-1) = 1.3132616875...


def pairs(**overrides):
    """Two pairs whose DPO margins are h = +2 and h = -2, so beta * h = +1 and -1.

    pair 0: (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2;  pair 1: (-3 + 2) - (-1 + 2) = -2.
    Token counts 2 / 4 (pair 0) and 4 / 2 (pair 1).
    """
    x = {"policy_chosen": torch.tensor([-1.0, -3.0]), "policy_rejected": torch.tensor([-3.0, -1.0]),
         "ref_chosen": torch.tensor([-2.0, -2.0]), "ref_rejected": torch.tensor([-2.0, -2.0]),
         "chosen_tokens": torch.tensor([2, 4]), "rejected_tokens": torch.tensor([4, 2])}
    return {**x, **overrides}


def positional(x):
    return x["policy_chosen"], x["policy_rejected"], x["ref_chosen"], x["ref_rejected"]


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-6)


def test_sigmoid_is_dpo():
    close(sigmoid_dpo(*positional(pairs()), BETA), [L_POS, L_NEG])


def test_sigmoid_label_smoothing_zero_equals_plain_dpo():
    pc, pr, rc, rr = (torch.randn(8) for _ in range(4))
    plain = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(sigmoid_dpo(pc, pr, rc, rr, 0.1, label_smoothing=0.0), plain)


def test_cdpo():
    # (1 - eps) * L(z) + eps * L(-z) with L(-z) = L(z) + z: pair 0 -> L_POS + 0.1, pair 1 -> L_NEG - 0.1
    close(sigmoid_dpo(*positional(pairs()), BETA, label_smoothing=0.1), [L_POS + 0.1, L_NEG - 0.1])


def test_robust():
    # ((1 - eps) L(z) - eps L(-z)) / (1 - 2 eps) = L(z) - eps z / (1 - 2 eps): shift -/+ 0.1 / 0.8
    close(robust_dpo(*positional(pairs()), BETA, 0.1), [L_POS - 0.125, L_NEG + 0.125])
    close(robust_dpo(*positional(pairs()), BETA, 0.0), [L_POS, L_NEG])
    with pytest.raises(ValueError):
        robust_dpo(*positional(pairs()), BETA, 0.5)


def test_hinge():
    close(hinge_dpo(*positional(pairs()), BETA), [0.0, 2.0])  # relu(1 - 1), relu(1 + 1)


def test_ipo_normalises_each_log_ratio_by_its_length():
    x = pairs()
    # pair 0: 1/2 - (-1)/4 = 0.75, target 1/(2*0.5) = 1 -> 0.0625; pair 1: -1/4 - 1/2 = -0.75 -> 3.0625
    close(ipo(*positional(x), x["chosen_tokens"], x["rejected_tokens"], BETA), [0.0625, 3.0625])


def test_simpo():
    pc, pr = torch.tensor([-2.0, -6.0]), torch.tensor([-6.0, -2.0])
    nc, nr = torch.tensor([2, 3]), torch.tensor([3, 2])
    # pair 0: 2 * (-1 - (-2)) - 1 = 1; pair 1: 2 * (-2 - (-1)) - 1 = -3
    close(simpo(pc, pr, nc, nr, beta=2.0, gamma=1.0), [L_POS, math.log1p(math.exp(3))])


def test_simpo_ignores_reference():
    x = pairs()
    a, _ = preference_loss("simpo", **x, beta=2.0, gamma=1.0)
    b, _ = preference_loss("simpo", **pairs(ref_chosen=torch.tensor([5.0, -9.0]), ref_rejected=None), beta=2.0,
                           gamma=1.0)
    torch.testing.assert_close(a, b)
    assert not needs_reference("simpo") and needs_reference([("simpo", 1.0), ("ipo", 1.0)])


def test_chosen_nll_is_the_batch_token_mean():
    close(chosen_nll(torch.tensor([-2.0, -6.0]), torch.tensor([2, 3])), [1.6, 1.6])  # (2 + 6) / (2 + 3)


def test_rpo_adds_weighted_nll_and_logs_it():
    x = pairs()
    loss, metrics = preference_loss("sigmoid", **x, beta=BETA, rpo_alpha=0.5)
    nll = 4 / 6  # (1 + 3) / (2 + 4)
    close(loss, [L_POS + 0.5 * nll, L_NEG + 0.5 * nll])
    assert metrics["nll_loss"] == pytest.approx(nll)


def test_mix_is_the_weighted_sum():
    x = pairs()
    terms = [("sigmoid", 0.8), ("hinge", 0.2), ("ipo", 0.5), ("sft", 1.0)]
    mixed, metrics = preference_loss(terms, **x, beta=BETA)
    expected = sum(w * preference_loss(name, **x, beta=BETA)[0] for name, w in terms)
    torch.testing.assert_close(mixed, expected)
    assert "nll_loss" in metrics


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_flow_to_the_policy(name):
    x = pairs(policy_chosen=torch.tensor([-1.0, -3.0], requires_grad=True),
              policy_rejected=torch.tensor([-3.5, -1.0], requires_grad=True))
    loss, _ = preference_loss(name, **x, beta=BETA, label_smoothing=0.1 if name == "robust" else 0.0)
    loss.mean().backward()
    assert x["policy_chosen"].grad.abs().sum() > 0
    assert name == "sft" or x["policy_rejected"].grad.abs().sum() > 0  # the NLL only reads chosen answers


def test_reward_metrics_match_trl_definitions():
    x = pairs()
    m = reward_metrics(*positional(x), BETA)
    # rewards: chosen beta*(pc - rc) = [0.5, -0.5], rejected beta*(pr - rr) = [-0.5, 0.5]
    assert m == pytest.approx({"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.5,
                               "rewards/margins": 0.0, "logps/chosen": -2.0, "logps/rejected": -2.0})


def test_reference_free_metrics_use_per_token_rewards():
    _, m = preference_loss("simpo", **pairs(), beta=2.0)
    # per-token logps: chosen [-0.5, -0.75], rejected [-0.75, -0.5]
    assert m["rewards/chosen"] == pytest.approx(2.0 * -0.625) and m["logps/chosen"] == pytest.approx(-0.625)
    assert m["rewards/accuracies"] == 0.5


def test_missing_inputs_are_reported():
    with pytest.raises(ValueError, match="reference"):
        preference_loss("sigmoid", **pairs(ref_chosen=None))
    with pytest.raises(ValueError, match="token counts"):
        preference_loss("ipo", **pairs(chosen_tokens=None))
    with pytest.raises(ValueError, match="unknown"):
        preference_loss("kto", **pairs())
