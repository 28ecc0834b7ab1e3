"""Run by ``torchrun --nproc_per_node 2`` in test_engines.py: capdpo's DPO step under DeepSpeed
ZeRO-2 / ZeRO-3 or torch FSDP2, on the gloo backend and the CPU (a helper, not a test file).

accelerate refuses DeepSpeed and FSDP on the CPU, so the engines are built here directly around
capdpo's training module (``train.PairScorer``), with the settings of the shipped
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
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from transformers import AutoModelForImageTextToText

import capdpo.train as train
import capdpo.training as training
from capdpo.config import FramesConfig, TrainConfig
from capdpo.models.load import load_policy
from capdpo.policy.base import VideoPolicy
from capdpo.policy.logps import TokenizedPair
from capdpo.policy.video import VideoEncoder
from capdpo.records import PreferencePair, RecordFile, ReferenceLogps, Video

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
FRAMES = FramesConfig(num_frames=4)
STEPS = 2

engine_name, encoder, pairs_path, videos_path, policy_dir, out, cache, result_path = sys.argv[1:]
out = Path(out)
settings = yaml.safe_load((CONFIGS / f"{engine_name}.yaml").read_text())


# -- the data and the reference, as run_train prepares them ------------------------------------------------
def fresh_policy() -> VideoPolicy:
    policy = load_policy(policy_dir, cache, "cpu", "float32")
    training.set_trainable(policy, cfg)
    return policy


clipping = settings.get("deepspeed_config", {}).get("gradient_clipping", 1.0)
frozen = encoder == "frozen"
cfg = TrainConfig(epochs=1, batch_size=1, lr=1e-3, lora=False, save_every=0, max_grad_norm=clipping,
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


# -- the engines ---------------------------------------------------------------------------------------------
class DeepSpeedRun:
    """``deepspeed.initialize`` on the PairScorer with the zero2/zero3.yaml settings, fp32 (exact comparison)."""

    def __init__(self, policy: VideoPolicy):
        import deepspeed

        ds = settings["deepspeed_config"]
        self.stage = ds["zero_stage"]
        config = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
                  "gradient_clipping": ds["gradient_clipping"], "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": self.stage, "offload_optimizer": {"device": ds["offload_optimizer_device"]},
                                        "offload_param": {"device": ds["offload_param_device"]},
                                        "stage3_gather_16bit_weights_on_model_save": ds.get("zero3_save_16bit_model", False)}}
        scorer = train.PairScorer(policy, cfg.shared_prefix)
        optimizer = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=scorer, optimizer=optimizer, config=config)
        self.policy = policy

    def step(self, batch: list[TokenizedPair]) -> tuple[float, dict[str, torch.Tensor]]:
        from deepspeed.utils import safe_get_full_grad

        loss, _ = train.dpo_loss(self.engine, self.policy, batch, videos, reference, cfg)
        self.engine.backward(loss)
        grads = {n: safe_get_full_grad(p) for n, p in self.policy.model.named_parameters() if p.requires_grad}
        grads = {n: g.clone() for n, g in grads.items() if g is not None}
        self.engine.step()
        return loss.item(), grads

    def sharded(self) -> bool:
        """Whether this process holds only part of the state: ZeRO-3 a slice of every weight, ZeRO-2 of
        the fp32 master weights (and so of the gradients and optimizer states)."""
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        if self.stage == 3:
            return all(p.ds_tensor.numel() < p.ds_numel for p in params)
        held = sum(g.numel() for g in self.engine.optimizer.single_partition_of_fp32_groups)
        return held < sum(p.numel() for p in params)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every weight, whole (ZeRO-3 gathers them: what zero3_save_16bit_model saves)."""
        state = self.engine._zero3_consolidated_16bit_state_dict() if self.stage == 3 else self.engine.module.state_dict()
        return {k.removeprefix("model."): v for k, v in (state or {}).items()}

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag="step-1")

    def load(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path), tag="step-1")


class FSDP2Run:
    """``fully_shard`` per decoder layer (the model's own ``_no_split_modules``), then the PairScorer as
    the root, on a cpu mesh, with fsdp.yaml's reshard setting."""

    def __init__(self, policy: VideoPolicy):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fsdp = settings["fsdp_config"]
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        mesh = init_device_mesh("cpu", (world,))
        self.scorer = train.PairScorer(policy, cfg.shared_prefix)
        layers = set(self.scorer._no_split_modules)
        self.shards = [fully_shard(m, mesh=mesh, reshard_after_forward=fsdp["fsdp_reshard_after_forward"])
                       for m in list(self.scorer.modules()) if type(m).__name__ in layers]
        self.shards.append(fully_shard(self.scorer, mesh=mesh, reshard_after_forward=fsdp["fsdp_reshard_after_forward"]))
        self.params = [p for p in self.scorer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.policy = policy

    def step(self, batch: list[TokenizedPair]) -> tuple[float, dict[str, torch.Tensor]]:
        loss, _ = train.dpo_loss(self.scorer, self.policy, batch, videos, reference, cfg)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in self.policy.model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grads

    def sharded(self) -> bool:
        params = list(self.scorer.parameters())
        return sum(p.to_local().numel() for p in params) < sum(p.numel() for p in params)

    def full_state(self) -> dict[str, torch.Tensor]:
        """fsdp.yaml's FULL_STATE_DICT: every weight gathered, on rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in state.items()}

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.scorer, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.scorer, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        # a trainable weight that never had a gradient (LLaVA-NeXT's image_newline on videos) has no
        # AdamW state in the checkpoint; get_state_dict gave it a blank one here, which is what it had
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(self.scorer, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def mean_over_processes(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


def max_grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """A trainable weight the forward does not use (e.g. DINOv2's mask token) has no gradient in one
    run and may have zeros in another: a missing gradient counts as zeros."""
    zero = torch.zeros(())
    return max((a.get(k, zero) - b.get(k, zero)).abs().max().item() for k in a.keys() | b.keys())


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


Engine = DeepSpeedRun if settings["distributed_type"] == "DEEPSPEED" else FSDP2Run
lone_losses, lone_grads, lone_weights = lone_run()

# the engine: two steps, the step-1 checkpoint saved on the way
run = Engine(fresh_policy())
sharded = run.sharded()
losses, grads = [], {}
for step, batch in enumerate(batches):
    loss, step_grads = run.step(batch[rank: rank + 1])
    losses.append(mean_over_processes(loss))
    grads = grads or step_grads
    if step == 0:
        run.save(out / "checkpoint")
weights = run.full_state()
if rank == 0:  # the trained policy as the train stage writes it: a plain checkpoint
    training.write_policy(run.policy.model, weights, run.policy, out / "policy")
dist.barrier()

# resumed: a fresh engine loads the step-1 checkpoint and runs step 2
resumed = Engine(fresh_policy())
resumed.load(out / "checkpoint")
resumed_loss, _ = resumed.step(batches[1][rank: rank + 1])
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
