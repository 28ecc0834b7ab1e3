"""Run by ``torchrun --nproc_per_node 2`` in test_engines.py: capdpo's DPO step under DeepSpeed
ZeRO-2 / ZeRO-3 or torch FSDP2, on the gloo backend and the CPU (a helper, not a test file).

accelerate refuses DeepSpeed and FSDP on the CPU, so the engines are built directly around
capdpo's training module (``train.PairScorer``) by ``cpu_engines.py``, with the settings of the shipped
``configs/accelerate/<engine>.yaml`` (zero stage, offload, gradient clipping; FSDP2 reshard and wrap
policy). Every process also runs the same two steps alone on the whole batch (no engine); rank 0
writes ``RESULT`` (JSON): the engine's and the lone run's losses, the largest gradient and weight
differences, and those of the saved full checkpoint and of a run resumed from the step-1 checkpoint.

ENCODER ``frozen`` (the paper's setting) trains the LLM on cached video embeddings; ``trained`` trains
the vision tower and projector too, so every step encodes the pixels through the sharded encoder.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine_train.py ENGINE ENCODER PAIRS VIDEOS POLICY OUT CACHE RESULT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from cpu_engines import (
    DeepSpeedRun,
    FSDP2Run,
    LossOf,
    clipping,
    engine_run,
    engine_settings,
    max_diff,
    max_grad_diff,
    mean_over_processes,
)
from transformers import AutoModelForImageTextToText

from capdpo import train, training
from capdpo.config import FramesConfig, TrainConfig
from capdpo.models.load import load_policy
from capdpo.policy.base import VideoPolicy
from capdpo.policy.logps import TokenizedPair
from capdpo.policy.video import VideoEncoder
from capdpo.records import PreferencePair, RecordFile, ReferenceLogps, Video

FRAMES = FramesConfig(num_frames=4)
STEPS = 2

engine_name, encoder, pairs_path, videos_path, policy_dir, out, cache, result_path = sys.argv[1:]
out = Path(out)
settings = engine_settings(engine_name)


# -- the data and the reference, as run_train prepares them ------------------------------------------------
def fresh_policy() -> VideoPolicy:
    policy = load_policy(policy_dir, cache, "cpu", "float32")
    training.set_trainable(policy, cfg)
    return policy


frozen = encoder == "frozen"
cfg = TrainConfig(epochs=1, batch_size=1, lr=1e-3, lora=False, save_every=0, max_grad_norm=clipping(settings),
                  freeze_vision=frozen, freeze_projector=frozen)
accelerator = training.make_accelerator(cfg, out)  # MULTI_CPU on gloo: the process group the engines share
rank, world = accelerator.process_index, accelerator.num_processes
policy = load_policy(policy_dir, cache, "cpu", "float32")
videos, tokenized = train.prepare_pairs(RecordFile(pairs_path, PreferencePair), RecordFile(videos_path, Video),
                                        VideoEncoder(policy, FRAMES), cfg, fail_fast=True)
reference = train.prepare_reference(accelerator, policy, cfg, FRAMES, videos, tokenized,
                                    RecordFile(out / "reference.jsonl", ReferenceLogps))
tokenized.sort(key=lambda t: t.pair.id)
batches = [tokenized[world * s: world * (s + 1)] for s in range(STEPS)]  # step s: one pair per process


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# -- one process, the whole batch, no engine: what the engines must reproduce ------------------------------
def lone_run() -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    lone = fresh_policy()
    scorer = train.PairScorer(lone, cfg.shared_prefix)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, grads = [], {}
    for step, batch in enumerate(batches):
        # each pair in a row of its own, as on its process (pair_logps would pack pairs of one video
        # into one row: the same numbers up to rounding, which Adam's steps amplify past the tolerance)
        loss = sum(train.dpo_loss(scorer, lone, [pair], videos, reference, cfg)[0] for pair in batch) / len(batch)
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in lone.model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads, {k: v.detach().clone() for k, v in lone.model.state_dict().items()}


def engine(policy: VideoPolicy) -> DeepSpeedRun | FSDP2Run:
    return engine_run(settings)(train.PairScorer(policy, cfg.shared_prefix), policy, settings, cfg)


def dpo_loss_of(run: DeepSpeedRun | FSDP2Run, batch: list[TokenizedPair]) -> LossOf:
    return lambda module: train.dpo_loss(module, run.policy, batch, videos, reference, cfg)[0]


lone_losses, lone_grads, lone_weights = lone_run()

# the engine: two steps, the step-1 checkpoint saved on the way
run = engine(fresh_policy())
sharded = run.sharded()
losses, grads = [], {}
for step, batch in enumerate(batches):
    loss, step_grads = run.step(dpo_loss_of(run, batch[rank: rank + 1]))
    losses.append(mean_over_processes(loss))
    grads = grads or step_grads
    if step == 0:
        run.save(out / "checkpoint")
weights = run.full_state()
if rank == 0:  # the trained policy as the train stage writes it: a plain checkpoint
    training.write_policy(run.policy.model, weights, run.policy, out / "policy")
dist.barrier()

# resumed: a fresh engine loads the step-1 checkpoint and runs step 2
resumed = engine(fresh_policy())
resumed.load(out / "checkpoint")
resumed_loss, _ = resumed.step(dpo_loss_of(resumed, batches[1][rank: rank + 1]))
resumed_loss = mean_over_processes(resumed_loss)
resumed_weights = resumed.full_state()

if rank == 0:
    reloaded = load_policy(str(out / "policy"), cache, "cpu", "float32").model.state_dict()
    plain = AutoModelForImageTextToText.from_pretrained(out / "policy").state_dict()
    result = {"losses": losses, "lone_losses": lone_losses, "resumed_loss": resumed_loss,
              "trainable": len(trainable_names(run.policy.model)), "sharded": sharded, "grad_diff": max_grad_diff(grads, lone_grads),
              "grad_ratio": sum(g.norm().item() for g in grads.values()) / sum(g.norm().item() for g in lone_grads.values()),
              "weight_diff": max_diff(weights, lone_weights), "changed": max_diff(weights, fresh_policy().model.state_dict()),
              "resumed_diff": max_diff(resumed_weights, weights), "reloaded_diff": max_diff(reloaded, weights),
              "plain_diff": max_diff(plain, weights)}
    Path(result_path).write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
# Leave without interpreter finalization: there gloo's worker threads can still hold work objects
# whose destructors abort the process now and then ("terminate called without an active exception",
# seen once in a full `make test`; pytorch/pytorch#179291), after every result above is written.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
