"""Stage 8: DPO of the video policy on preference pairs (method.md step 8), on accelerate.

Video DPO is expensive because of the video: 8 frames are hundreds to thousands of visual tokens, an
answer often under 100. The standard formulation encodes each video again for the chosen answer, the
rejected answer and the reference model on every step. Here, with the vision tower and projector frozen
(the paper's setting):

    before training
      a. every video is encoded once; its embeddings live on disk (``EmbeddingCache``) and serve
         chosen, rejected, reference, every epoch and every later run
      b. the reference log-probs of every pair are computed once, from those embeddings and the
         pairs' tokens (``capdpo.policy.reference_logps``, the pass the ``reference`` stage runs), and
         cached, so no reference model is held in memory (``train.reference='precomputed'``)
    per optimizer step
      1. the batch's videos: cached embeddings (or pixels encoded now, when the encoder trains)
      2. policy log-probs of chosen and rejected: one packed row per pair sharing the video +
         question prefix (``capdpo.policy.logps.pair_logps``), or two rows per pair
      3. reference log-probs: the cache, or a no-grad forward (LoRA adapters off / a frozen copy)
      4. the configured preference loss (``capdpo.losses``), backward, clip, step, log metrics

The loop is accelerate's, so the same code runs on one CPU, DDP, DeepSpeed ZeRO-2/3 and FSDP
(``configs/accelerate/``); the step's loss without accelerate (``dpo_loss`` on the ``PairScorer`` the
engines wrap) is what ``tests/test_engines.py`` runs under DeepSpeed and FSDP2 directly, on the CPU.
Every ``save_every`` optimizer steps a checkpoint holds weights, optimizer, scheduler, RNG states and
the data position; an interrupted run resumes from the newest one and ends with the same weights as an
uninterrupted run. The result is a plain checkpoint (LoRA adapters merged)
in ``out_dir/policy`` that the next stage loads like any other model.

``run_train`` reads as the recipe: set-up functions (checks, accelerator, videos and tokens,
reference, trainable parts, optimiser and data, resume), then ``train_loop``, then ``save_policy``.
"""

from __future__ import annotations

import copy
import json
import logging
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from capdpo.config import FramesConfig, TrainConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.losses import needs_reference, preference_loss
from capdpo.policy.base import EncodedVideo, PairLogprobs, VideoInputs, VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.policy.logps import TokenizedPair, by_video, pair_logps, tokenize_pair
from capdpo.policy.packing import video_grouped_order
from capdpo.policy.reference_logps import append_reference, load_reference, pairs_to_score, reference_fingerprint
from capdpo.policy.video import VideoEncoder
from capdpo.records import PreferencePair, RecordFile, ReferenceLogps, Video

log = logging.getLogger(__name__)
DONE = ".complete"
STATE_FILE = "trainer_state.json"

PreparedVideo = EncodedVideo | VideoInputs  # embeddings of a frozen encoder, or pixels an encoder that trains encodes


# -- the recipe --------------------------------------------------------------------------------------------
def run_train(pairs_file: RecordFile[PreferencePair], videos_file: RecordFile[Video], policy: VideoPolicy,
              cfg: TrainConfig, frames: FramesConfig, out_dir: Path, *, embed_cache: EmbeddingCache | None = None,
              reference_file: RecordFile[ReferenceLogps] | None = None, fail_fast: bool = False) -> Path:
    """The ``train`` stage; returns the trained checkpoint dir. A finished run is not redone; an
    interrupted one resumes from its newest checkpoint (``out_dir/checkpoints``).

    ``embed_cache`` keeps the frozen encoder's video embeddings on disk (None: in memory for this run);
    ``reference_file`` the cached reference log-probs (default ``out_dir/reference.jsonl``)."""
    out_dir = Path(out_dir)
    final = out_dir / "policy"
    if (final / DONE).exists():
        return final
    accelerator = make_accelerator(cfg, out_dir)
    check_setup(cfg, accelerator)
    if accelerator.num_processes > 1:  # each process works on its own device (cuda:<local rank>)
        policy.model.to(accelerator.device)
    torch.manual_seed(cfg.seed)

    # a. every video once, every pair tokenised once (b. and every step use both)
    videos, tokenized = prepare_pairs(pairs_file, videos_file, VideoEncoder(policy, frames, embed_cache), cfg, fail_fast)
    # b. reference log-probs, before any weight moves: the policy as loaded is the reference
    reference_file = reference_file or RecordFile(out_dir / "reference.jsonl", ReferenceLogps)
    reference = prepare_reference(accelerator, policy, cfg, frames, videos, tokenized, reference_file)
    peft_model = set_trainable(policy, cfg)
    reference.lora = peft_model  # without precomputed rows, LoRA's reference is the policy with adapters off
    if cfg.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimisation = prepare_optimisation(accelerator, policy, cfg, tokenized)

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = out_dir / "checkpoints"
    progress = resume(accelerator, checkpoints)
    metrics_path = open_metrics(accelerator, cfg, out_dir / "metrics.jsonl", progress)
    train_loop(accelerator, optimisation, videos, reference, cfg, progress, metrics_path, checkpoints)
    if cfg.report_to:
        accelerator.end_training()

    policy.model = save_policy(accelerator, optimisation.scorer, peft_model, policy, out_dir)
    if accelerator.is_main_process:
        shutil.rmtree(checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def train_loop(accelerator: Accelerator, optimisation: Optimisation, videos: dict[str, PreparedVideo],
               reference: Reference, cfg: TrainConfig, progress: Progress, metrics_path: Path, checkpoints: Path) -> None:
    """Optimizer steps from ``progress`` to ``optimisation.total``; a checkpoint every ``save_every``."""
    scorer, loader, total = optimisation.scorer, optimisation.loader, optimisation.total
    scorer.train()
    bar = tqdm(total=total, initial=progress.step, desc="train", unit="step", disable=not accelerator.is_local_main_process)
    step_start, tokens = time.perf_counter(), 0
    while progress.step < total and progress.epoch < cfg.epochs:
        loader.set_epoch(progress.epoch)  # the shuffle depends on seed and epoch only: resumable
        batches = accelerator.skip_first_batches(loader, progress.batch) if progress.batch else loader
        for batch in batches:
            with accelerator.accumulate(scorer):
                metrics = dpo_step(scorer, batch, videos, reference, cfg, accelerator, optimisation.trainable)
                optimisation.optimizer.step()
                optimisation.scheduler.step()
                optimisation.optimizer.zero_grad(set_to_none=True)
            progress.batch += 1
            tokens += sum(t.tokens for t in batch)
            if not accelerator.sync_gradients:  # gradients still accumulating: no optimizer step yet
                continue
            progress.step += 1
            elapsed = time.perf_counter() - step_start
            metrics.update({"step_time_s": elapsed, "tokens_per_s": tokens * accelerator.num_processes / elapsed,
                            "peak_memory_mb": peak_memory_mb(accelerator.device)})
            metrics = gather_metrics(accelerator, metrics)
            bar.update()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            write_metrics(accelerator, cfg, metrics_path, progress, len(loader), optimisation.scheduler.get_last_lr()[0], metrics)
            if cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < total:
                save_checkpoint(accelerator, checkpoints, progress, cfg.keep_checkpoints)
            if progress.step >= total:
                break
            step_start, tokens = time.perf_counter(), 0
        else:
            progress.epoch, progress.batch = progress.epoch + 1, 0
    bar.close()


def dpo_step(scorer: PairScorer, batch: list[TokenizedPair], videos: dict[str, PreparedVideo], reference: Reference,
             cfg: TrainConfig, accelerator: Accelerator, trainable: list[torch.nn.Parameter]) -> dict[str, float]:
    """One forward/backward on a batch of pairs; returns the logged metrics (this process's)."""
    policy: VideoPolicy = accelerator.unwrap_model(scorer).policy
    loss, metrics = dpo_loss(scorer, policy, batch, videos, reference, cfg, accelerator.autocast)
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm) if accelerator.sync_gradients else None
    return {"loss": loss.item(), **metrics, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}


def dpo_loss(scorer: torch.nn.Module, policy: VideoPolicy, batch: Sequence[TokenizedPair], videos: dict[str, PreparedVideo],
             reference: Reference, cfg: TrainConfig, autocast: Callable[[], AbstractContextManager] = nullcontext
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's mean preference loss (with its graph) and metrics. ``scorer`` is the engine-wrapped
    ``PairScorer`` (accelerate's, or DeepSpeed's / FSDP2's directly), ``policy`` the unwrapped one."""
    # 1. the batch's videos
    batch_videos = [videos[t.pair.video_id] for t in batch]
    # 2. policy log-probs of chosen and rejected
    pc, pr, nc, nr = scorer(batch_videos, batch)
    # 3. reference log-probs: the cache, or a forward without gradients
    rc, rr = reference.logps(policy, batch_videos, batch, cfg, autocast, like=pc)
    # 4. the configured loss
    per_pair, metrics = preference_loss(cfg.loss, policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr,
                                        chosen_tokens=nc.to(pc.dtype), rejected_tokens=nr.to(pc.dtype), beta=cfg.beta,
                                        label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha)
    return per_pair.mean(), metrics


# -- what the engines wrap ---------------------------------------------------------------------------
class PairScorer(torch.nn.Module):
    """The module accelerate wraps (DDP, FSDP, DeepSpeed): a batch of pairs -> the policy's summed
    answer log-probs. Routing the forward through one module call is what lets the engines hook
    their gradient sync, parameter gathering and autocast around it."""

    def __init__(self, policy: VideoPolicy, shared_prefix: bool):
        super().__init__()
        self.model = policy.model  # registered, so the engines see (and shard) the parameters
        self.policy = policy
        self.shared_prefix = shared_prefix
        self._no_split_modules = policy.model._no_split_modules  # FSDP wraps the model's own decoder layers

    def forward(self, videos: Sequence[PreparedVideo], batch: Sequence[TokenizedPair]) -> PairLogprobs:
        """``(chosen logps, rejected logps, chosen tokens, rejected tokens)``, one entry per pair.
        Pixels (a trained encoder) are encoded here, once per video of the batch, with autograd."""
        return pair_logps(self.policy, encode_once(self.policy, videos), batch, self.shared_prefix)


def encode_once(policy: VideoPolicy, videos: Sequence[PreparedVideo]) -> list[EncodedVideo]:
    """The batch's videos encoded, each distinct one once (its pairs then share one packed row)."""
    encoded: dict[int, EncodedVideo] = {}
    for v in videos:
        if id(v) not in encoded:
            encoded[id(v)] = v if isinstance(v, EncodedVideo) else policy.encode(v)
    return [encoded[id(v)] for v in videos]


@dataclass
class Reference:
    """Where a batch's reference log-probs come from: the precomputed ``rows``, else a forward
    without gradients of the policy with its ``lora`` adapters off or of a frozen copy ``model``
    (``train.reference='model'``). ``needed`` false: the loss takes no reference (SimPO)."""

    needed: bool
    rows: dict[str, ReferenceLogps] | None = None
    model: torch.nn.Module | None = None
    lora: PeftModel | None = None

    def logps(self, policy: VideoPolicy, videos: Sequence[PreparedVideo], batch: Sequence[TokenizedPair],
              cfg: TrainConfig, autocast: Callable[[], AbstractContextManager], like: torch.Tensor
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Reference log-probs of the batch's chosen and rejected answers, on ``like``'s device and dtype;
        a live forward runs under ``autocast`` (the engine's mixed precision)."""
        if self.rows is not None:
            return (torch.tensor([self.rows[t.pair.id].chosen_logp for t in batch], device=like.device, dtype=like.dtype),
                    torch.tensor([self.rows[t.pair.id].rejected_logp for t in batch], device=like.device, dtype=like.dtype))
        if not self.needed:
            return None, None
        with torch.no_grad(), autocast():
            encoded = encode_once(policy, videos)
            if self.lora is not None:
                with self.lora.disable_adapter():
                    rc, rr, _, _ = pair_logps(policy, encoded, batch, cfg.shared_prefix)
            else:
                rc, rr, _, _ = pair_logps(policy.with_model(self.model, "reference"), encoded, batch, cfg.shared_prefix)
        return rc, rr


@dataclass
class Optimisation:
    """The prepared (engine-wrapped) module, optimizer, scheduler and loader, and the step count."""

    scorer: PairScorer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    trainable: list[torch.nn.Parameter]  # the wrapped ones: FSDP clips its own flat parameters
    total: int  # optimizer steps of the whole run


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


def prepare_pairs(pairs_file: RecordFile[PreferencePair], videos_file: RecordFile[Video], encoder: VideoEncoder,
                  cfg: TrainConfig, fail_fast: bool) -> tuple[dict[str, PreparedVideo], list[TokenizedPair]]:
    """Every pair's video, once, and the token ids of every pair whose video is ready."""
    pairs = pairs_file.all()
    if not pairs:
        raise ValueError(f"{pairs_file.path}: no preference pairs to train on")
    videos = prepare_videos(pairs, videos_file.by_id(), encoder, cfg, ItemErrors("train", fail_fast))
    tokenized = [tokenize_pair(encoder.policy, p, videos[p.video_id].layout, cfg.max_response_tokens)
                 for p in pairs if p.video_id in videos]
    if not tokenized:
        raise ValueError(f"{pairs_file.path}: no pair has a usable video")
    return videos, tokenized


def prepare_videos(pairs: list[PreferencePair], videos: dict[str, Video], encoder: VideoEncoder, cfg: TrainConfig,
                   errors: ItemErrors) -> dict[str, PreparedVideo]:
    """Each pair's video, planned for all its pairs' prompts: embeddings for a frozen encoder
    (from the encoder's disk cache when it has one), else pixels that the step encodes with
    autograd. A bad video is recorded and its pairs dropped."""
    prompts = {video_id: [p.prompt for p in group] for video_id, group in by_video(pairs).items()}
    prepare = encoder.encode if frozen_encoder(cfg) else encoder.pixels
    out: dict[str, PreparedVideo] = {}
    for video_id in tqdm(sorted(prompts), desc="train: videos", unit="video"):
        try:
            if video_id not in videos:
                raise KeyError(f"{video_id}: pairs name a video that is not in the run's videos")
            out[video_id] = prepare(videos[video_id], prompts[video_id], cfg.max_response_tokens)
        except (*ITEM_ERRORS, KeyError) as e:
            errors.record(video_id, e)
    return out


def prepare_reference(accelerator: Accelerator, policy: VideoPolicy, cfg: TrainConfig, frames: FramesConfig,
                      videos: dict[str, PreparedVideo], tokenized: list[TokenizedPair],
                      reference_file: RecordFile[ReferenceLogps]) -> Reference:
    """The reference, taken before any weight moves: precomputed rows, or a frozen copy of the
    model for full fine-tuning with ``train.reference='model'`` (LoRA's adapters come later)."""
    needed = needs_reference(cfg.loss)
    if needed and cfg.reference == "precomputed":
        return Reference(needed, rows=precompute_reference(accelerator, policy, cfg, frames, videos, tokenized, reference_file))
    if needed and not cfg.lora:
        return Reference(needed, model=copy.deepcopy(policy.model).eval().requires_grad_(False))
    return Reference(needed)


def precompute_reference(accelerator: Accelerator, policy: VideoPolicy, cfg: TrainConfig, frames: FramesConfig,
                         videos: dict[str, PreparedVideo], tokenized: list[TokenizedPair],
                         reference_file: RecordFile[ReferenceLogps]) -> dict[str, ReferenceLogps]:
    """``{pair id: ReferenceLogps}`` of the trained pairs: the rows ``reference_file`` lacks are
    computed from the prepared videos and tokens (the reference stage's pass), then all are read back."""
    fingerprint = reference_fingerprint(policy, cfg, frames)
    pairs = [t.pair for t in tokenized]
    with accelerator.main_process_first():  # one process computes, the others read its file
        if accelerator.is_main_process:
            todo = pairs_to_score(reference_file, fingerprint, pairs, cfg.max_response_tokens, recompute=False)
            tokens = {t.pair.id: t for t in tokenized}

            def encoded_pairs():
                for video_id, group in by_video(todo).items():
                    video = videos[video_id]
                    if not isinstance(video, EncodedVideo):  # pixels of an encoder that trains: encoded once here
                        with torch.no_grad():
                            video = policy.encode(video)
                    yield from ((tokens[p.id], video) for p in group)

            with tqdm(total=len(todo), desc="reference", unit="pair") as bar:
                append_reference(reference_file, policy, cfg, fingerprint, encoded_pairs(), cfg.batch_size, bar)
        return load_reference(reference_file, pairs, fingerprint, cfg.max_response_tokens)


def set_trainable(policy: VideoPolicy, cfg: TrainConfig) -> PeftModel | None:
    """Freeze what the config freezes; wrap the LLM in LoRA if asked. Returns the PEFT model or None.
    The parts (vision tower, projector, LLM) come from the policy's family adapter."""
    model, parts = policy.model, policy.parts
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = None
    if cfg.lora and not cfg.freeze_llm:  # PEFT leaves only the adapters trainable
        peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                      lora_dropout=cfg.lora_dropout, target_modules=parts.lora_targets()))
    trains = {"vision": not cfg.freeze_vision, "projector": not cfg.freeze_projector,
              "llm": not cfg.lora and not cfg.freeze_llm}
    for name, p in model.named_parameters():
        part = parts.part_of(name)
        if part is not None and trains[part]:
            p.requires_grad_(True)
    return peft_model


def prepare_optimisation(accelerator: Accelerator, policy: VideoPolicy, cfg: TrainConfig,
                         tokenized: list[TokenizedPair]) -> Optimisation:
    """AdamW on the trainable parameters, a linear warm-up schedule, a loader shuffled by seed and
    epoch; all wrapped by the accelerator's engine."""
    scorer = PairScorer(policy, cfg.shared_prefix)
    optimizer = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.group_by_video:
        loader = DataLoader(tokenized, batch_size=cfg.batch_size, collate_fn=list,
                            sampler=VideoGroupedSampler([t.pair.video_id for t in tokenized], cfg.seed))
    else:
        loader = DataLoader(tokenized, batch_size=cfg.batch_size, shuffle=True, collate_fn=list,
                            generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = -(-len(loader) // (cfg.grad_accum * accelerator.num_processes))
    total = min(cfg.max_steps or 10**12, max(1, cfg.epochs * steps_per_epoch))
    # accelerate steps a prepared scheduler once per process per optimizer step: count in those units
    ticks = total * accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * ticks), ticks)
    scorer, optimizer, loader, scheduler = accelerator.prepare(scorer, optimizer, loader, scheduler)
    return Optimisation(scorer, optimizer, scheduler, loader, list(scorer.parameters()), total)


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


def open_metrics(accelerator: Accelerator, cfg: TrainConfig, path: Path, progress: Progress) -> Path:
    """The metrics file, keeping the lines of the steps a resumed run does not redo; trackers started."""
    if accelerator.is_main_process:
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= progress.step] \
            if path.exists() else []
        path.write_text("".join(line + "\n" for line in kept))
    if cfg.report_to:
        # trackers take scalar hyper-parameters only: lists (a loss mix) and None as JSON text
        hparams = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in cfg.model_dump(mode="json").items()}
        accelerator.init_trackers("capdpo-train", config=hparams)
    return path


def write_metrics(accelerator: Accelerator, cfg: TrainConfig, path: Path, progress: Progress, batches_per_epoch: int,
                  lr: float, metrics: dict[str, float]) -> None:
    """One optimizer step's metrics: a line of the metrics file every ``log_every`` steps, and the trackers."""
    if accelerator.is_main_process and progress.step % cfg.log_every == 0:
        row = {"step": progress.step, "epoch": progress.epoch + progress.batch / batches_per_epoch, "lr": lr, **metrics}
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
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
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
