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
reference, trainable parts, optimiser and data, resume), then the steps (``capdpo.training.run_steps``,
the loop the DPO and GRPO stages share, around ``dpo_step``), then ``finish`` (the saved policy).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from capdpo.config import FramesConfig, TrainConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.losses import needs_reference, preference_loss
from capdpo.policy.base import PairLogprobs, VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.policy.logps import TokenizedPair, by_video, pair_logps, tokenize_pair
from capdpo.policy.reference_logps import append_reference, load_reference, pairs_to_score, reference_fingerprint
from capdpo.policy.video import VideoEncoder
from capdpo.records import PreferencePair, RecordFile, ReferenceLogps, Video
from capdpo.training import (
    DONE,
    PreparedVideo,
    VideoGroupedSampler,
    check_setup,
    encode_once,
    finish,
    make_accelerator,
    prepare_optimisation,
    run_steps,
    set_trainable,
    start_steps,
    video_preparer,
)

log = logging.getLogger(__name__)



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
    optimisation = prepare_optimisation(accelerator, PairScorer(policy, cfg.shared_prefix), pair_loader(tokenized, cfg), cfg)

    progress = start_steps(accelerator, cfg, out_dir)
    run_steps(accelerator, optimisation, cfg, progress, out_dir,
              lambda batch, _: dpo_step(optimisation.scorer, batch, videos, reference, cfg, accelerator, optimisation.trainable),
              desc="train", postfix={"loss": "loss", "acc": "rewards/accuracies"})
    policy.model = finish(accelerator, cfg, optimisation, peft_model, policy, out_dir)
    return final


def dpo_step(scorer: PairScorer, batch: list[TokenizedPair], videos: dict[str, PreparedVideo], reference: Reference,
             cfg: TrainConfig, accelerator: Accelerator, trainable: list[torch.nn.Parameter]) -> dict[str, float]:
    """One forward/backward on a batch of pairs; returns the logged metrics (this process's)."""
    policy: VideoPolicy = accelerator.unwrap_model(scorer).policy
    loss, metrics = dpo_loss(scorer, policy, batch, videos, reference, cfg, accelerator.autocast)
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm) if accelerator.sync_gradients else None
    return {"loss": loss.item(), **metrics, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": sum(t.tokens for t in batch)}


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


# -- set-up --------------------------------------------------------------------------------------------
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
    """Each pair's video, planned for all its pairs' prompts, as ``video_preparer`` holds it. A bad
    video is recorded and its pairs dropped."""
    prompts = {video_id: [p.prompt for p in group] for video_id, group in by_video(pairs).items()}
    prepare = video_preparer(encoder, cfg)
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
                    with torch.no_grad():  # features or pixels of an encoder that trains: encoded once here
                        video = policy.embeddings(videos[video_id])
                    yield from ((tokens[p.id], video) for p in group)

            with tqdm(total=len(todo), desc="reference", unit="pair") as bar:
                append_reference(reference_file, policy, cfg, fingerprint, encoded_pairs(), cfg.batch_size, bar)
        return load_reference(reference_file, pairs, fingerprint, cfg.max_response_tokens)


def pair_loader(tokenized: list[TokenizedPair], cfg: TrainConfig) -> DataLoader:
    """Batches of pairs shuffled by seed and epoch; with ``group_by_video`` a video's pairs together."""
    if cfg.group_by_video:
        return DataLoader(tokenized, batch_size=cfg.batch_size, collate_fn=list,
                          sampler=VideoGroupedSampler([t.pair.video_id for t in tokenized], cfg.seed))
    return DataLoader(tokenized, batch_size=cfg.batch_size, shuffle=True, collate_fn=list,
                      generator=torch.Generator().manual_seed(cfg.seed))





