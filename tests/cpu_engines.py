"""DeepSpeed ZeRO-2 / ZeRO-3 and torch FSDP2 built directly around one of capdpo's scorer modules
(``train.PairScorer``, ``grpo.GroupScorer``) on the CPU and the gloo backend, with the settings of the
shipped ``configs/accelerate/<engine>.yaml``: accelerate refuses both engines on the CPU. Used by the
``torchrun`` scripts ``engine_train.py`` (DPO) and ``engine_grpo.py`` (GRPO); a helper, not a test file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from capdpo.config import TrainConfig
from capdpo.policy.base import VideoPolicy

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"

# the step's loss from the engine-wrapped scorer (its forward runs through the engine)
LossOf = Callable[[torch.nn.Module], torch.Tensor]


def engine_settings(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def clipping(settings: dict) -> float:
    return settings.get("deepspeed_config", {}).get("gradient_clipping", 1.0)


class DeepSpeedRun:
    """``deepspeed.initialize`` on the scorer with the zero2/zero3.yaml settings, fp32 (exact comparison)."""

    def __init__(self, scorer: torch.nn.Module, policy: VideoPolicy, settings: dict, cfg: TrainConfig):
        import importlib

        import deepspeed

        # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce kernel when its comm starts
        # (C++ with ninja: about half a minute of a 2-core machine, on every fresh machine); it is a
        # CPU-only fast path, no part of a GPU run, so these tests reduce through gloo instead.
        # (importlib: the attribute deepspeed.comm.torch is the torch package, not that module)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        ds = settings["deepspeed_config"]
        self.stage = ds["zero_stage"]
        config = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
                  "gradient_clipping": ds["gradient_clipping"], "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": self.stage, "offload_optimizer": {"device": ds["offload_optimizer_device"]},
                                        "offload_param": {"device": ds["offload_param_device"]},
                                        "stage3_gather_16bit_weights_on_model_save": ds.get("zero3_save_16bit_model", False)}}
        optimizer = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=scorer, optimizer=optimizer, config=config)
        self.module = self.engine
        self.policy = policy

    def step(self, loss_of: LossOf) -> tuple[float, dict[str, torch.Tensor]]:
        from deepspeed.utils import safe_get_full_grad

        loss = loss_of(self.engine)
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
    """``fully_shard`` per decoder layer (the model's own ``_no_split_modules``), then the scorer as
    the root, on a cpu mesh, with fsdp.yaml's reshard setting."""

    def __init__(self, scorer: torch.nn.Module, policy: VideoPolicy, settings: dict, cfg: TrainConfig):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fsdp = settings["fsdp_config"]
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        layers = set(scorer._no_split_modules)
        for m in list(scorer.modules()):
            if type(m).__name__ in layers:
                fully_shard(m, mesh=mesh, reshard_after_forward=fsdp["fsdp_reshard_after_forward"])
        self.module = fully_shard(scorer, mesh=mesh, reshard_after_forward=fsdp["fsdp_reshard_after_forward"])
        self.params = [p for p in scorer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.max_grad_norm = cfg.max_grad_norm
        self.policy = policy

    def step(self, loss_of: LossOf) -> tuple[float, dict[str, torch.Tensor]]:
        loss = loss_of(self.module)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in self.policy.model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grads

    def sharded(self) -> bool:
        params = list(self.module.parameters())
        return sum(p.to_local().numel() for p in params) < sum(p.numel() for p in params)

    def full_state(self) -> dict[str, torch.Tensor]:
        """fsdp.yaml's FULL_STATE_DICT: every weight gathered, on rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in state.items()}

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        # a trainable weight that never had a gradient (LLaVA-NeXT's image_newline on videos) has no
        # AdamW state in the checkpoint; get_state_dict gave it a blank one here, which is what it had
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def engine_run(settings: dict) -> type[DeepSpeedRun | FSDP2Run]:
    return DeepSpeedRun if settings["distributed_type"] == "DEEPSPEED" else FSDP2Run


def mean_over_processes(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def max_grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """A trainable weight the forward does not use (e.g. DINOv2's mask token) has no gradient in one
    run and may have zeros in another: a missing gradient counts as zeros."""
    zero = torch.zeros(())
    return max((a.get(k, zero) - b.get(k, zero)).abs().max().item() for k in a.keys() | b.keys())


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
