"""``pair_logps``: chosen and rejected answers behind one shared prompt in one packed row, on a tiny
random model of every supported family. It must give the numbers (and gradients) of the two-row
``sequence_logps``, whatever the pair is batched with."""

from __future__ import annotations

import logging

import pytest
import torch
from test_families import DEVICE, FAMILIES, build, encode

from capdpo.models.load import load_policy
from capdpo.policy.base import PairLogprobs, VideoPolicy

ATOL = 1e-4  # float32 on CAPDPO_TEST_DEVICE (cpu, or cuda in the GPU check)


@pytest.fixture(scope="module", params=FAMILIES)
def policy(request, tmp_path_factory, smollm2, cache_dir) -> VideoPolicy:
    path = build(request.param, tmp_path_factory.mktemp(request.param), smollm2)
    return load_policy(str(path), cache_dir, device=DEVICE, dtype="float32", processor="capdpo")


@pytest.fixture(scope="module")
def tiny_policy(tiny_policy_dir, cache_dir) -> VideoPolicy:
    """The training path's model: LLaVA-NeXT-Video with a DINOv2 tower."""
    return load_policy(str(tiny_policy_dir), cache_dir, device=DEVICE, dtype="float32")


def pairs(policy: VideoPolicy) -> dict:
    """Three pairs: prompts of different lengths (videos of 4 and 2 frames, different questions), a
    1-token rejected answer, a rejected answer longer than its chosen one, a 1-token chosen one."""
    videos = [encode(policy, 2).detach(), encode(policy, 3, n=2).detach(), encode(policy, 2).detach()]
    questions = ["Which colour?", "How many shapes are there in the end?", "Is it moving?"]
    eos = policy.tokenizer.eos_token_id
    return {"videos": videos,
            "prompts": [policy.prompt_ids(q, v.layout) for q, v in zip(questions, videos)],
            "chosen": [policy.response_ids("A red square moving slowly to the left."), policy.response_ids("Two."), [eos]],
            "rejected": [[eos], policy.response_ids("There are three shapes, a circle and two squares."),
                         policy.response_ids("No, it stays still.")]}


def two_rows(policy: VideoPolicy, videos, prompts, chosen, rejected) -> PairLogprobs:
    n = len(prompts)
    logps, counts = policy.sequence_logps([*videos, *videos], prompts + prompts, chosen + rejected)
    return PairLogprobs(logps[:n], logps[n:], counts[:n], counts[n:])


def llm_grads(policy: VideoPolicy, logps: PairLogprobs) -> dict[str, torch.Tensor]:
    """Gradients of a DPO-like weighted difference w.r.t. the LLM's parameters (then cleared)."""
    policy.model.zero_grad(set_to_none=True)
    (logps.chosen * 1.3 - logps.rejected * 0.7).sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters()
             if policy.parts.part_of(n) == "llm" and p.grad is not None}
    policy.model.zero_grad(set_to_none=True)
    return grads


def max_grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[n] - b[n]).abs().max().item() for n in a)


def assert_same(packed: PairLogprobs, reference: PairLogprobs) -> None:
    assert packed.chosen_tokens.tolist() == reference.chosen_tokens.tolist()
    assert packed.rejected_tokens.tolist() == reference.rejected_tokens.tolist()
    torch.testing.assert_close(packed.chosen, reference.chosen, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed.rejected, reference.rejected, atol=ATOL, rtol=0)


def test_packed_logps_equal_two_rows(policy):
    batch = pairs(policy)
    assert policy.shares_prompt_prefix
    with torch.no_grad():
        packed, reference = policy.pair_logps(**batch), two_rows(policy, **batch)
    assert packed.chosen_tokens.tolist() == [len(c) for c in batch["chosen"]]
    assert_same(packed, reference)


def test_packed_gradients_equal_two_rows(policy):
    batch = pairs(policy)
    packed = llm_grads(policy, policy.pair_logps(**batch))
    reference = llm_grads(policy, two_rows(policy, **batch))
    assert max_grad_diff(packed, reference) < ATOL


def same_video_pairs(policy: VideoPolicy) -> dict:
    """Four pairs, three on one EncodedVideo (two questions, one asked twice) and one on another:
    the three share one packed row behind the video and the prompts' common start."""
    batch = pairs(policy)
    video = batch["videos"][0]
    questions = ["Which colour?", "Is it moving?", "Which colour?"]
    eos = policy.tokenizer.eos_token_id
    return {"videos": [video, batch["videos"][1], video, video],
            "prompts": [policy.prompt_ids(questions[0], video.layout), batch["prompts"][1],
                        policy.prompt_ids(questions[1], video.layout), policy.prompt_ids(questions[2], video.layout)],
            "chosen": [*batch["chosen"], policy.response_ids("Red.")],
            "rejected": [*batch["rejected"], [eos]]}


def test_pairs_of_one_video_share_a_row_with_the_numbers_of_two_rows(policy):
    batch = same_video_pairs(policy)
    with torch.no_grad():
        assert_same(policy.pair_logps(**batch), two_rows(policy, **batch))
    assert max_grad_diff(llm_grads(policy, policy.pair_logps(**batch)), llm_grads(policy, two_rows(policy, **batch))) < ATOL


def test_a_pair_does_not_depend_on_its_batch(policy):
    batch = pairs(policy)
    with torch.no_grad():
        together = policy.pair_logps(**batch)
        for i in range(len(batch["prompts"])):
            alone = policy.pair_logps(**{k: v[i : i + 1] for k, v in batch.items()})
            assert_same(alone, PairLogprobs(*(t[i : i + 1] for t in together)))


def test_eager_attention_takes_the_additive_mask(tiny_policy_dir, cache_dir):
    eager = load_policy(str(tiny_policy_dir), cache_dir, device=DEVICE, dtype="float32", attn_implementation="eager")
    batch = pairs(eager)
    assert eager.shares_prompt_prefix
    with torch.no_grad():
        assert_same(eager.pair_logps(**batch), two_rows(eager, **batch))


def test_flash_attention_does_not_share_the_prefix(tiny_policy, monkeypatch):
    monkeypatch.setattr(tiny_policy.model.config.get_text_config(), "_attn_implementation", "flash_attention_2")
    assert not tiny_policy.shares_prompt_prefix


def test_without_a_4d_mask_attention_it_runs_two_rows(tiny_policy, monkeypatch, caplog):
    batch = pairs(tiny_policy)
    with torch.no_grad():
        reference = two_rows(tiny_policy, **batch)
    # CPU has no flash attention to load: only the switch says the mask cannot be used
    monkeypatch.setattr(type(tiny_policy), "shares_prompt_prefix", property(lambda self: False))
    with caplog.at_level(logging.INFO, logger="capdpo.policy.base"), torch.no_grad():
        fallback = tiny_policy.pair_logps(**batch)
        tiny_policy.pair_logps(**batch)
    assert sum("two rows" in r.message for r in caplog.records) == 1  # logged once
    assert_same(fallback, reference)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_policy):
    batch = pairs(tiny_policy)
    reference = llm_grads(tiny_policy, two_rows(tiny_policy, **batch))
    tiny_policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as train.py
    tiny_policy.model.train()
    try:
        packed = llm_grads(tiny_policy, tiny_policy.pair_logps(**batch))
    finally:
        tiny_policy.model.gradient_checkpointing_disable()
        tiny_policy.model.eval()
    assert max_grad_diff(packed, reference) < ATOL
