"""capdpo's GRPO advantages, loss and metrics agree with TRL's GRPOTrainer on the same completions and rewards.

TRL samples the completions (``_generate_and_score_completions``: rewards, group advantages, reference
log-probs) and computes its loss on them (``_compute_loss``); capdpo gets the same completion tokens, its
own per-token log-probs from plain unpadded forwards, the rewards of the same functions, and its own
formulas (``capdpo.grpo_loss``). Agreement covers padding, masks, the advantage normalisation, every loss
variant and the logged metrics.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")  # test-only dependency; datasets comes with it
from datasets import Dataset
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from capdpo.grpo_loss import completion_metrics, group_advantages, grpo_loss

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

EOS, PAD = "</s>", "<pad>"
PROMPTS = ["what is on the table", "describe the video"]
WORDS = ["a", "red", "blue", "cup", "book", "dog", "man", "opens", "door", "slowly", "the", "is", "on", "table", "what", "describe", "video", "car"]
G = 4  # completions per prompt
MAX_TOKENS = 6


def mentions_red(completions, **_):
    return [float("red" in c.split()) for c in completions]


def shortness(completions, **_):
    return [1.0 / (1 + len(c.split())) for c in completions]


def only_first_prompt(prompts, completions, **_):
    """A rule reward that applies to one kind of question only (None elsewhere), like exact match on multiple choice."""
    return [float("cup" in c) if p == PROMPTS[0] else None for p, c in zip(prompts, completions)]


REWARDS = [mentions_red, shortness, only_first_prompt]
WEIGHTS = [1.0, 0.5, 2.0]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([PAD, EOS, *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def tiny_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def per_token_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """Log-probs of the completion tokens after the prompt, one unpadded sequence."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt_ids) - 1:]


def trl_batch(tokenizer, tmp_path, **config):
    """TRL's scored generation batch and loss for all PROMPTS x G, with its logged metrics."""
    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, save_strategy="no",
                      per_device_train_batch_size=len(PROMPTS) * G, num_generations=G,
                      max_completion_length=MAX_TOKENS, reward_weights=WEIGHTS, seed=3, **config)
    # TRL builds its reference from the policy's saved checkpoint (a path), then gets other weights below
    tiny_llama(len(tokenizer), seed=0).save_pretrained(tmp_path / "policy")
    trainer = GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=REWARDS, args=args,
                          processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]))
    if trainer.ref_model is not None:  # a reference that differs from the policy, so the KL term is not 0
        trainer.ref_model.load_state_dict(tiny_llama(len(tokenizer), seed=1).state_dict())
    inputs = [{"prompt": p} for p in PROMPTS for _ in range(G)]
    torch.manual_seed(0)
    trainer.model.train()  # TRL logs under "train" only while the model is in training mode
    batch = trainer._generate_and_score_completions(inputs)
    # the completions as if sampled by a policy a few updates older: ratios up to exp(+-0.3), so the clipping
    # (epsilon 0.2) acts on some tokens and not others
    shift = (torch.rand(batch["completion_ids"].shape, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.6
    batch["old_per_token_logps"] = padded_logps(trainer.model, batch) + shift
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, which this skips
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch).item()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return trainer, batch, loss, metrics


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [[t for t, m in zip(row.tolist(), keep.tolist()) if m] for row, keep in zip(ids, mask)]


def padded_logps(model, batch) -> torch.Tensor:
    """Per-token completion log-probs of ``model``, right-padded to TRL's completion width."""
    width = batch["completion_ids"].shape[1]
    with torch.no_grad():
        rows = [per_token_logps(model, p, c) for p, c in zip(unpadded(batch["prompt_ids"], batch["prompt_mask"]),
                                                            unpadded(batch["completion_ids"], batch["completion_mask"]))]
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])


def capdpo_figures(trainer, batch, tokenizer, scale, **loss_kwargs):
    completion_ids = unpadded(batch["completion_ids"], batch["completion_mask"])
    prompts = [p for p in PROMPTS for _ in range(G)]
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
    rewards = torch.tensor([[math.nan if r is None else r for r in fn(prompts=prompts, completions=completions)] for fn in REWARDS]).T
    advantages = group_advantages(rewards, torch.tensor(WEIGHTS), G, [fn.__name__ for fn in REWARDS], scale)
    ref = padded_logps(trainer.ref_model, batch) if trainer.ref_model is not None else None
    loss, metrics = grpo_loss(padded_logps(trainer.model, batch), advantages.advantages, batch["completion_mask"],
                              old_logps=batch["old_per_token_logps"], ref_logps=ref,
                              max_completion_length=MAX_TOKENS, **loss_kwargs)
    lengths = batch["completion_mask"].sum(1)
    terminated = torch.tensor([bool(ids) and ids[-1] == tokenizer.eos_token_id for ids in completion_ids])
    return advantages, loss.item(), {**metrics, **advantages.metrics, **completion_metrics(lengths, terminated)}


CASES = [
    pytest.param({"loss_type": "grpo", "beta": 0.04}, id="grpo-kl"),
    pytest.param({"loss_type": "bnpo", "beta": 0.0}, id="bnpo"),
    pytest.param({"loss_type": "dr_grpo", "beta": 0.1, "scale_rewards": "none"}, id="dr_grpo-unscaled"),
    pytest.param({"loss_type": "grpo", "beta": 0.1, "use_bias_correction_kl": False}, id="grpo-plain-kl"),
    pytest.param({"loss_type": "dapo", "beta": 0.0, "scale_rewards": "batch"}, id="dapo-batch-scaled"),
]
METRICS = ["reward", "reward_std", "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/high_mean",
           "clip_ratio/region_mean", "completions/mean_length", "completions/min_length", "completions/max_length",
           "completions/clipped_ratio", "completions/mean_terminated_length"]


@pytest.mark.parametrize("config", CASES)
def test_grpo_matches_trl(config, tokenizer, tmp_path):
    trainer, batch, trl_loss, trl_metrics = trl_batch(tokenizer, tmp_path, **config)
    scale = config.get("scale_rewards", "group")
    kwargs = {"loss_type": config["loss_type"], "beta": config["beta"],
              "kl_ratio_correction": config.get("use_bias_correction_kl", True)}
    if config["loss_type"] == "dapo":
        kwargs["num_items_in_batch"] = batch["num_items_in_batch"].item()
    advantages, loss, metrics = capdpo_figures(trainer, batch, tokenizer, scale, **kwargs)
    assert torch.allclose(advantages.advantages, batch["advantages"].float(), atol=1e-5)
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    names = METRICS + [f"rewards/{fn.__name__}/{s}" for fn in REWARDS for s in ("mean", "std")]
    names += ["kl"] if config["beta"] else []
    for name in names:
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5, nan_ok=True), name
