"""What the training stages share: the accelerate set-up, the trainable parts, resumable checkpoints,
per-step metrics and the saved policy.

``train`` (offline DPO on preference pairs) and ``grpo`` (online GRPO with judge rewards) are two
recipes over this machinery, so both run on one CPU, DDP, DeepSpeed ZeRO-2/3 and FSDP, resume an
interrupted run exactly (weights, optimizer, scheduler, RNG states and the data position), write one
metrics line per step and end with a plain checkpoint (LoRA adapters merged) in ``out_dir/policy``.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from capdpo.config import TrainConfig
from capdpo.policy.base import EncodedVideo, TowerFeatures, VideoInputs, VideoPolicy
from capdpo.policy.packing import video_grouped_order
from capdpo.policy.video import VideoEncoder
from capdpo.records import json_line, remove_own_dir

log = logging.getLogger(__name__)
DONE = ".complete"
STATE_FILE = "trainer_state.json"

# embeddings of a frozen encoder, a frozen tower's features that a training projector projects, or
# pixels a training vision tower encodes
PreparedVideo = EncodedVideo | TowerFeatures | VideoInputs


# -- set-up --------------------------------------------------------------------------------------------
def make_accelerator(cfg: TrainConfig, out_dir: Path) -> Accelerator:
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                       log_with=cfg.report_to or None, project_dir=str(out_dir),
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def check_setup(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Refuse an engine the settings cannot train on, before any work (the settings alone are
    checked when the config loads: config.TrainConfig)."""
    if cfg.lora and sharded_engine(accelerator):
        raise ValueError("train.lora=true needs the whole LLM in each process to merge the adapters: use DDP or "
                         "DeepSpeed ZeRO-2 (configs/accelerate/); ZeRO-3 and FSDP are for full fine-tuning (train.lora=false)")


def frozen_encoder(cfg: TrainConfig) -> bool:
    """Vision tower and projector frozen: a video's embeddings never change, so they can be cached."""
    return cfg.freeze_vision and cfg.freeze_projector


def video_preparer(encoder: VideoEncoder, cfg: TrainConfig) -> Callable[..., PreparedVideo]:
    """How a training run holds each video before its steps: embeddings when vision tower and
    projector are frozen; the tower's features when only the tower is and the family splits its
    encoder there (the step then runs the projector alone); else pixels. Each from the encoder's
    disk cache when it has one (pixels excepted)."""
    if frozen_encoder(cfg):
        return encoder.encode
    if cfg.freeze_vision and encoder.policy.splits_projector:
        return encoder.tower
    return encoder.pixels


def encode_once(policy: VideoPolicy, videos: Sequence[PreparedVideo]) -> list[EncodedVideo]:
    """The batch's videos encoded, each distinct one once (its pairs or questions then share one packed row)."""
    encoded: dict[int, EncodedVideo] = {}
    for v in videos:
        if id(v) not in encoded:
            encoded[id(v)] = policy.embeddings(v)
    return [encoded[id(v)] for v in videos]


def set_trainable(policy: VideoPolicy, cfg: TrainConfig, lora_modules: Sequence[str] | None = None) -> PeftModel | None:
    """Freeze what the config freezes; wrap the LLM in LoRA if asked. Returns the PEFT model or None.
    The parts (vision tower, projector, LLM) come from the policy's family adapter; ``lora_modules``
    names the LLM's linear layers that get adapters (None: all of them, ``ModelParts.lora_targets``)."""
    model, parts = policy.model, policy.parts
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = None
    if cfg.lora and not cfg.freeze_llm:  # PEFT leaves only the adapters trainable
        targets = parts.lora_targets() if lora_modules is None else parts.lora_targets(lora_modules)
        peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                      lora_dropout=cfg.lora_dropout, target_modules=targets))
    trains = {"vision": not cfg.freeze_vision, "projector": not cfg.freeze_projector,
              "llm": not cfg.lora and not cfg.freeze_llm}
    for name, p in model.named_parameters():
        part = parts.part_of(name)
        if part is not None and trains[part]:
            p.requires_grad_(True)
    return peft_model


def parameter_groups(policy: VideoPolicy, lrs: dict[str, float]) -> list[dict]:
    """AdamW parameter groups of the policy's trainable parameters, one per part ("vision",
    "projector", "llm"; LoRA adapters belong to "llm") at that part's learning rate in ``lrs``;
    each group carries its part's ``name`` (the metrics log ``lr/<name>``)."""
    params: dict[str, list[torch.nn.Parameter]] = {part: [] for part in lrs}
    for name, p in policy.model.named_parameters():
        part = policy.parts.part_of(name)
        if p.requires_grad:
            if part not in params:
                raise ValueError(f"{name} trains but its part {part!r} has no learning rate (given: {sorted(lrs)})")
            params[part].append(p)
    return [{"params": params[part], "lr": lr, "name": part} for part, lr in lrs.items() if params[part]]


class VideoGroupedSampler(Sampler[int]):
    """Pair indices in a seeded random order of videos, each video's pairs together (in a random
    order of their own): consecutive batches then hold whole videos, whose pairs share one packed
    row. The order depends on the seed and the epoch only (``set_epoch``), so a resumed run
    replays it."""

    def __init__(self, video_ids: Sequence[str], seed: int):
        self.video_ids, self.seed, self.epoch = list(video_ids), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(video_grouped_order(self.video_ids, self.seed * 1_000_003 + self.epoch))

    def __len__(self) -> int:
        return len(self.video_ids)


def mixture_quotas(shares: Sequence[float], size: int) -> list[int]:
    """Items each source gives an epoch of ``size`` items: its share of ``size`` (shares are
    normalised), rounded by largest remainder so the quotas add up to ``size`` (ties: the earlier source)."""
    total = sum(shares)
    exact = [share / total * size for share in shares]
    quotas = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: size - sum(quotas)]:
        quotas[i] += 1
    return quotas


class MixtureSampler(Sampler[int]):
    """Indices of a dataset made of several sources laid end to end (``sizes``), each epoch
    ``mixture_quotas(shares, epoch_size)`` of them from each source, in video-grouped order.

    A source's items are drawn without replacement: the source is walked in a seeded random
    permutation, continued from one epoch to the next, and a fresh permutation starts only once
    every item has been drawn; so an item repeats only when the source's quota over the epochs
    so far exceeds its size (with replacement across passes, never within one). The epoch's
    items are then ordered with each video's items together (``video_grouped_order``), so a
    batch holds whole videos whose items share one packed row. Every draw depends on the seed
    and the epoch only (``set_epoch``): a resumed run replays it."""

    def __init__(self, sizes: Sequence[int], shares: Sequence[float], epoch_size: int, video_ids: Sequence[str], seed: int):
        if any(size == 0 for size in sizes):
            raise ValueError(f"every source needs at least one item (sizes {list(sizes)})")
        self.sizes, self.video_ids, self.seed, self.epoch = list(sizes), list(video_ids), seed, 0
        self.quotas = mixture_quotas(shares, epoch_size)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_items(self, epoch: int) -> list[int]:
        """The dataset indices drawn for ``epoch``, source after source (before ordering)."""
        picks = []
        for source, (size, quota, offset) in enumerate(zip(self.sizes, self.quotas, self.offsets)):
            passes: dict[int, list[int]] = {}
            for position in range(epoch * quota, (epoch + 1) * quota):
                walk = position // size
                if walk not in passes:
                    passes[walk] = random.Random(f"{self.seed}:{source}:{walk}").sample(range(size), size)
                picks.append(offset + passes[walk][position % size])
        return picks

    def __iter__(self):
        picks = self.epoch_items(self.epoch)
        order = video_grouped_order([self.video_ids[i] for i in picks], self.seed * 1_000_003 + self.epoch)
        return iter([picks[j] for j in order])

    def __len__(self) -> int:
        return sum(self.quotas)


@dataclass
class Optimisation:
    """The prepared (engine-wrapped) module, optimizer, scheduler and loader, and the step count."""

    scorer: torch.nn.Module  # what the engine wraps: a batch -> the policy's log-probs
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    trainable: list[torch.nn.Parameter]  # the wrapped ones: FSDP clips its own flat parameters
    total: int  # optimizer steps of the whole run


def prepare_optimisation(accelerator: Accelerator, scorer: torch.nn.Module, loader: DataLoader, cfg: TrainConfig,
                         groups: list[dict] | None = None) -> Optimisation:
    """AdamW on ``scorer``'s trainable parameters (at ``cfg.lr``, or as the parameter ``groups`` of
    ``parameter_groups`` say, each at its own learning rate) and a linear warm-up schedule over the
    run's optimizer steps (``epochs`` passes over ``loader``, at most ``max_steps``); all wrapped by
    the accelerator's engine."""
    if groups is None:
        groups = [{"params": [p for p in scorer.parameters() if p.requires_grad], "lr": cfg.lr}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(loader) // (cfg.grad_accum * accelerator.num_processes))
    total = min(cfg.max_steps or 10**12, max(1, cfg.epochs * steps_per_epoch))
    # accelerate steps a prepared scheduler once per process per optimizer step: count in those units
    ticks = total * accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * ticks), ticks)
    scorer, optimizer, loader, scheduler = accelerator.prepare(scorer, optimizer, loader, scheduler)
    return Optimisation(scorer, optimizer, scheduler, loader, list(scorer.parameters()), total)


def run_steps(accelerator: Accelerator, optimisation: Optimisation, cfg: TrainConfig, progress: Progress, out_dir: Path,
              step: Callable[[list, int], dict[str, float] | None], desc: str, postfix: dict[str, str],
              labels: dict[str, str] | None = None) -> None:
    """Optimizer steps from ``progress`` to ``optimisation.total``: ``step(batch, step_number)`` runs
    the batch's forward and backward and returns its metrics (``tokens``: its token count, for
    ``tokens_per_s``); then the update, the metrics line and, every ``save_every`` steps, a
    checkpoint. A ``step`` that returns None had nothing to learn from and ran no backward: its
    batch is used up, but no update is made (the gradients accumulated with it are dropped), counted
    or logged. ``postfix`` names the metrics shown on the progress bar; ``labels`` are written
    into every metrics line as they are (an SFT phase's name). Named parameter groups
    (``parameter_groups``) log their learning rates as ``lr/<name>``."""
    scorer, loader, total = optimisation.scorer, optimisation.loader, optimisation.total
    checkpoints, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    scorer.train()
    bar = tqdm(total=total, initial=progress.step, desc=desc, unit="step", disable=not accelerator.is_local_main_process)
    step_start, tokens = time.perf_counter(), 0
    while progress.step < total and progress.epoch < cfg.epochs:
        loader.set_epoch(progress.epoch)  # the order depends on seed and epoch only: resumable
        batches = accelerator.skip_first_batches(loader, progress.batch) if progress.batch else loader
        for batch in batches:
            with accelerator.accumulate(scorer):
                metrics = step(batch, progress.step)
                if metrics is not None:
                    optimisation.optimizer.step()
                    optimisation.scheduler.step()
                optimisation.optimizer.zero_grad(set_to_none=True)
            progress.batch += 1
            if metrics is None:
                continue
            tokens += metrics.pop("tokens", 0)
            if not accelerator.sync_gradients:  # gradients still accumulating: no optimizer step yet
                continue
            progress.step += 1
            elapsed = time.perf_counter() - step_start
            metrics.update({"step_time_s": elapsed, "peak_memory_mb": peak_memory_mb(accelerator.device)})
            if tokens:
                metrics["tokens_per_s"] = tokens * accelerator.num_processes / elapsed
            metrics = gather_metrics(accelerator, metrics)
            bar.update()
            bar.set_postfix({name: f"{metrics[key]:.4f}" for name, key in postfix.items()})
            lrs = optimisation.scheduler.get_last_lr()
            groups = optimisation.optimizer.param_groups
            metrics.update({f"lr/{group['name']}": lr for group, lr in zip(groups, lrs) if "name" in group})
            write_metrics(accelerator, cfg, metrics_path, progress, len(loader), lrs[0], metrics, labels)
            if cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < total:
                save_checkpoint(accelerator, checkpoints, progress, cfg.keep_checkpoints)
            if progress.step >= total:
                break
            step_start, tokens = time.perf_counter(), 0
        else:
            progress.epoch, progress.batch = progress.epoch + 1, 0
    bar.close()


def start_steps(accelerator: Accelerator, cfg: TrainConfig, out_dir: Path) -> Progress:
    """The run folder, resumed from its newest checkpoint (a fresh run starts at zero), and its
    metrics file keeping the lines of the steps already done."""
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = resume(accelerator, out_dir / "checkpoints")
    open_metrics(accelerator, cfg, out_dir / "metrics.jsonl", progress)
    return progress


def finish(accelerator: Accelerator, cfg: TrainConfig, optimisation: Optimisation, peft_model: PeftModel | None,
           policy: VideoPolicy, out_dir: Path) -> torch.nn.Module:
    """Trackers closed, ``out_dir/policy`` written (LoRA merged), the checkpoints removed; returns the model."""
    if cfg.report_to:
        accelerator.end_training()
    model = save_policy(accelerator, optimisation.scorer, peft_model, policy, out_dir)
    if accelerator.is_main_process:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    return model


# -- checkpoints and metrics ------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where training is: optimizer steps done, and the epoch and batch the next step starts at."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already consumed

    @classmethod
    def load(cls, checkpoint: Path) -> Progress:
        return cls(**json.loads((checkpoint / STATE_FILE).read_text()))


def latest_checkpoint(checkpoints: Path) -> Path | None:
    done = [d for d in checkpoints.glob("step-*") if (d / STATE_FILE).exists()]
    return max(done, key=lambda d: int(d.name.removeprefix("step-")), default=None)


def resume(accelerator: Accelerator, checkpoints: Path) -> Progress:
    """Restore the newest checkpoint's state and return its position; a fresh run starts at zero."""
    latest = latest_checkpoint(checkpoints)
    if latest is None:
        return Progress()
    accelerator.load_state(str(latest))
    progress = Progress.load(latest)
    log.info("train: resuming from %s (step %d)", latest, progress.step)
    return progress


def save_checkpoint(accelerator: Accelerator, checkpoints: Path, progress: Progress, keep: int) -> None:
    """accelerate's full state (model, optimizer, scheduler, RNG of every process) plus the data
    position; the state file is written last, so a half-written checkpoint is never resumed."""
    path = checkpoints / f"step-{progress.step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps(progress.__dict__))
        done = sorted((d for d in checkpoints.glob("step-*") if (d / STATE_FILE).exists()),
                      key=lambda d: int(d.name.removeprefix("step-")))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def open_metrics(accelerator: Accelerator, cfg: TrainConfig, path: Path, progress: Progress) -> None:
    """The metrics file, keeping the lines of the steps a resumed run does not redo; trackers started."""
    if accelerator.is_main_process:
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= progress.step] \
            if path.exists() else []
        path.write_text("".join(line + "\n" for line in kept))
    if cfg.report_to:
        # trackers take scalar hyper-parameters only: lists (a loss mix) and None as JSON text
        hparams = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in cfg.model_dump(mode="json").items()}
        accelerator.init_trackers(f"capdpo-{cfg.algorithm}", config=hparams)


def write_metrics(accelerator: Accelerator, cfg: TrainConfig, path: Path, progress: Progress, batches_per_epoch: int,
                  lr: float, metrics: dict[str, float], labels: dict[str, str] | None = None) -> None:
    """One optimizer step's metrics: a line of the metrics file every ``log_every`` steps, and the trackers."""
    if accelerator.is_main_process and progress.step % cfg.log_every == 0:
        row = {**(labels or {}), "step": progress.step, "epoch": progress.epoch + progress.batch / batches_per_epoch, "lr": lr,
               **metrics}
        with path.open("a") as f:
            f.write(json_line(row) + "\n")  # a NaN (no gradient this step, no reward) as null: still JSON
    if cfg.report_to:
        accelerator.log(metrics, step=progress.step)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the accelerator's allocator on CUDA, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gather_metrics(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Every metric averaged over the processes (peak memory: the largest), identical on each."""
    if accelerator.num_processes == 1:
        return metrics
    names = sorted(metrics)
    values = torch.tensor([metrics[k] for k in names], device=accelerator.device, dtype=torch.float64)
    mean = accelerator.reduce(values.clone(), "mean")
    peak = accelerator.reduce(values.clone(), "max") if "peak_memory_mb" in metrics else mean
    return {k: (peak if k == "peak_memory_mb" else mean)[i].item() for i, k in enumerate(names)}



# -- the result ----------------------------------------------------------------------------------------------
def sharded_engine(accelerator: Accelerator) -> bool:
    """ZeRO-3 or FSDP: no process holds the whole model, the engine gathers it for saving."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def save_policy(accelerator: Accelerator, scorer: torch.nn.Module, peft_model: PeftModel | None, policy: VideoPolicy,
                out_dir: Path) -> torch.nn.Module:
    """Write ``out_dir/policy`` (LoRA merged) from the main process, atomically; returns the model."""
    model = accelerator.unwrap_model(scorer).model
    state = None
    if sharded_engine(accelerator):  # full weights gathered from every process's shard
        state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(scorer).items()}
    elif peft_model is not None:
        model = peft_model.merge_and_unload()
    if accelerator.is_main_process:
        write_policy(model, state, policy, out_dir / "policy")
    accelerator.wait_for_everyone()
    return model


def write_policy(model: torch.nn.Module, state: dict[str, torch.Tensor] | None, policy: VideoPolicy, final: Path) -> None:
    """A plain checkpoint in ``final``, atomically: ``model``'s config with the full weights ``state``
    (gathered by a sharding engine; None: the model's own), the tokenizer and the vision spec."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp, state_dict=state)
    policy.tokenizer.save_pretrained(tmp)
    policy.spec.save(tmp)
    (tmp / DONE).write_text("")
    remove_own_dir(final, proof=(DONE,))  # an earlier policy written here; a folder capdpo did not write stays
    tmp.rename(final)
