"""capdpo's losses and metrics agree with TRL's DPOTrainer on the same model and text pairs.

TRL is a test-only dependency. Its loss has no stand-alone function: ``DPOTrainer._compute_loss`` runs the
policy and reference forwards and the loss in one go, so TRL gets the collated batch and its own (fused LM head)
log-probs, while capdpo gets log-probs summed here from plain forwards on independently tokenised sequences.
Agreement therefore covers tokenisation boundaries, token counts and the loss formulas together.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")  # test-only dependency; datasets comes with it
from datasets import Dataset
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from capdpo.losses import preference_loss

# TRL's config and Trainer emit transformers' deprecation warnings that say nothing about the losses
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

EOS, PAD = "</s>", "<pad>"
PAIRS = [
    {"prompt": "what is on the table", "chosen": " a red cup and a book", "rejected": " a dog"},
    {"prompt": "describe the video", "chosen": " a man opens a door", "rejected": " a man opens a red door slowly"},
    {"prompt": "what colour is the car", "chosen": " blue", "rejected": " the car is red and it is parked"},
]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the pairs' words: splitting on whitespace keeps the tokens of
    ``prompt + chosen`` equal to the prompt's tokens followed by the answer's, as TRL's prefix search expects."""
    words = sorted({w for p in PAIRS for text in p.values() for w in text.split()})
    vocab = {w: i for i, w in enumerate([PAD, EOS, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def tiny_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A random 2-layer Llama; a wide init spreads the log-probs so the two models' log-ratios are far from 0."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_llama(len(tokenizer), seed=0), tiny_llama(len(tokenizer), seed=1)


def answer_logps(model, tokenizer, prompt: str, answer: str) -> tuple[torch.Tensor, int]:
    """Summed log-prob of ``answer + EOS`` after ``prompt`` (one unpadded sequence), and its token count."""
    prompt_ids = tokenizer(prompt).input_ids
    answer_ids = tokenizer(answer).input_ids + [tokenizer.eos_token_id]  # TRL appends EOS to the answers
    ids = torch.tensor([prompt_ids + answer_ids])
    logps = torch.log_softmax(model(ids).logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt_ids) - 1:].sum(), len(answer_ids)


@pytest.fixture(scope="module")
def capdpo_inputs(models, tokenizer) -> dict[str, torch.Tensor]:
    """``preference_loss`` keyword inputs for PAIRS, from the untouched models (TRL patches their forward)."""
    policy, ref = models
    out = {}
    with torch.no_grad():
        for role, model in (("policy", policy), ("ref", ref)):
            for side in ("chosen", "rejected"):
                logps, counts = zip(*(answer_logps(model, tokenizer, p["prompt"], p[side]) for p in PAIRS))
                out[f"{role}_{side}"] = torch.stack(logps)
                out[f"{side}_tokens"] = torch.tensor(counts)
    return out


def trl_loss(models, tokenizer, tmp_path, loss_types, loss_weights=None, **config) -> tuple[float, dict[str, float]]:
    """TRL's loss and logged metrics for one batch holding all PAIRS."""
    policy, ref = (copy.deepcopy(m) for m in models)
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, save_strategy="no",
                     per_device_train_batch_size=len(PAIRS), loss_type=loss_types, loss_weights=loss_weights,
                     **config)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(PAIRS))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    return loss, {name: values[-1] for name, values in logged.items()}


# beta = 1 puts the hinge on both sides of its kink on these pairs (DPO margins range from about -0.4 to 5.7)
CASES = [
    pytest.param("sigmoid", {"beta": 0.1}, id="sigmoid"),
    pytest.param("hinge", {"beta": 1.0}, id="hinge"),
    pytest.param("ipo", {"beta": 0.5}, id="ipo"),
    pytest.param("robust", {"beta": 0.1, "label_smoothing": 0.2}, id="robust"),
    pytest.param([("sigmoid", 0.8), ("ipo", 0.1), ("sft", 1.0)], {"beta": 0.1}, id="mpo-mix-with-nll"),
]


@pytest.mark.parametrize(("loss", "params"), CASES)
def test_loss_and_metrics_match_trl(loss, params, models, tokenizer, capdpo_inputs, tmp_path):
    if isinstance(loss, str):
        trl_value, trl_metrics = trl_loss(models, tokenizer, tmp_path, [loss], **params)
    else:
        names, weights = zip(*loss)
        trl_value, trl_metrics = trl_loss(models, tokenizer, tmp_path, list(names), list(weights), **params)

    per_pair, metrics = preference_loss(loss, **capdpo_inputs, **params)
    assert per_pair.mean().item() == pytest.approx(trl_value, abs=1e-5)
    for name in METRICS:
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
