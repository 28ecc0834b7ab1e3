"""Run by ``torchrun --nproc_per_node 2`` in test_engines.py: capdpo's GRPO objective under DeepSpeed
ZeRO-2 / ZeRO-3 or torch FSDP2 (``cpu_engines.py``), on the gloo backend and the CPU (a helper, not a test file).

Under ZeRO-3 and FSDP2 no process holds the whole model, yet each samples its question's group with ``generate`` through
the engine's forward (ZeRO-3 gathers every module's weights on its hooks, FSDP2's root and layers
theirs; the processes run in lockstep with ``synced_gpus``), then scores the group through the
engine, with KL to a frozen reference copy. Every process also runs the same two steps alone on the whole batch (no engine);
rank 0 writes ``RESULT`` (JSON): the engine's and the lone run's losses and answer lengths, and the
largest gradient and weight differences.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine_grpo.py ENGINE QA VIDEOS POLICY OUT CACHE RESULT
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
from cpu_engines import (
    DeepSpeedRun,
    FSDP2Run,
    clipping,
    engine_run,
    engine_settings,
    max_diff,
    max_grad_diff,
    mean_over_processes,
)

from capdpo import grpo, training
from capdpo.config import FramesConfig, TrainConfig
from capdpo.models.load import load_policy
from capdpo.policy.base import VideoPolicy
from capdpo.policy.video import VideoEncoder
from capdpo.records import QAItem, RecordFile, Video

FRAMES = FramesConfig(num_frames=4)
STEPS = 2

engine_name, qa_path, videos_path, policy_dir, out, cache, result_path = sys.argv[1:]
out = Path(out)
settings = engine_settings(engine_name)
# dr_grpo divides by a constant (G x max_completion_length), so the mean of the processes' losses is
# the loss of the whole batch in one process, and so are the averaged gradients
cfg = TrainConfig(algorithm="grpo", epochs=1, lr=1e-3, lora=False, save_every=0, max_grad_norm=clipping(settings),
                  grpo={"num_generations": 3, "questions_per_step": 1, "max_completion_length": 6, "beta": 0.04,
                        "loss_type": "dr_grpo", "rewards": [{"name": "exact_match"}]})
accelerator = training.make_accelerator(cfg, out)  # MULTI_CPU on gloo: the process group the engines share
rank, world = accelerator.process_index, accelerator.num_processes
start = load_policy(policy_dir, cache, "cpu", "float32")
questions, videos = grpo.prepare_questions(RecordFile(qa_path, QAItem), RecordFile(videos_path, Video),
                                           VideoEncoder(start, FRAMES), cfg, fail_fast=True)
questions.sort(key=lambda q: q.qa.id)
batches = [questions[world * s: world * (s + 1)] for s in range(STEPS)]  # step s: one question per process
reference = grpo.GroupReference(True, frozen_copy=copy.deepcopy(start.model).eval().requires_grad_(False))


class AnswerLengthReward:
    """Stands in for the judge: rewards that differ within a random policy's group (its length mod 4)."""

    def __init__(self):
        self.names, self.weights = ["length"], torch.tensor([1.0])

    def submit(self, batch: Sequence[grpo.Question], texts: Sequence[Sequence[str]], step: int) -> Future[torch.Tensor]:
        done: Future[torch.Tensor] = Future()
        done.set_result(torch.tensor([[float(len(t) % 4)] for group in texts for t in group]))
        return done


rewards = AnswerLengthReward()


def fresh_policy() -> VideoPolicy:
    policy = load_policy(policy_dir, cache, "cpu", "float32")
    training.set_trainable(policy, cfg)
    return policy


def objective(scorer: torch.nn.Module, policy: VideoPolicy, batch: list[grpo.Question], step: int, sharded: bool
              ) -> tuple[torch.Tensor, dict[str, float]]:
    return grpo.grpo_objective(scorer, policy, batch, videos, rewards, reference, cfg, step, sharded=sharded)


# -- one process, the whole batch, no engine: what the engines must reproduce ------------------------------
def lone_run() -> tuple[list[float], list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    lone = fresh_policy()
    scorer = grpo.GroupScorer(lone, cfg.shared_prefix)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, lengths, grads = [], [], {}
    for step, batch in enumerate(batches, start=1):
        # each question as on its process; dr_grpo's sum over them is the whole batch's loss
        parts = [objective(scorer, lone, [q], step, sharded=False) for q in batch]
        loss = sum(loss for loss, _ in parts) / len(parts)
        loss.backward()
        if step == 1:
            grads = {n: p.grad.clone() for n, p in lone.model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        lengths.append(sum(m["completions/mean_length"] for _, m in parts) / len(parts))
    return losses, lengths, grads, {k: v.detach().clone() for k, v in lone.model.state_dict().items()}


lone_losses, lone_lengths, lone_grads, lone_weights = lone_run()

# the engine: every process samples, scores and updates on its own question
policy = fresh_policy()
run: DeepSpeedRun | FSDP2Run = engine_run(settings)(grpo.GroupScorer(policy, cfg.shared_prefix), policy, settings, cfg)
sharded = run.sharded()
whole_model_sharded = engine_name != "zero2"  # ZeRO-2 shards the optimizer state only: no lockstep sampling
losses, lengths, grads = [], [], {}
for step, batch in enumerate(batches, start=1):
    metrics = {}

    def loss_of(module: torch.nn.Module, batch=batch, step=step, metrics=metrics) -> torch.Tensor:
        loss, found = objective(module, run.policy, batch[rank: rank + 1], step, sharded=whole_model_sharded)
        metrics.update(found)
        return loss

    loss, step_grads = run.step(loss_of)
    losses.append(mean_over_processes(loss))
    lengths.append(mean_over_processes(metrics["completions/mean_length"]))
    grads = grads or step_grads
weights = run.full_state()

if rank == 0:
    result = {"losses": losses, "lone_losses": lone_losses, "lengths": lengths, "lone_lengths": lone_lengths,
              "sharded": sharded, "grad_diff": max_grad_diff(grads, lone_grads),
              "grad_norm": sum(g.norm().item() for g in lone_grads.values()),
              "weight_diff": max_diff(weights, lone_weights), "changed": max_diff(weights, fresh_policy().model.state_dict())}
    Path(result_path).write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
# Leave without interpreter finalization: there gloo's worker threads can still hold work objects
# whose destructors abort the process now and then ("terminate called without an active exception",
# seen once in a full `make test`; pytorch/pytorch#179291), after every result above is written.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
