"""Stage 8: DPO of the video policy on preference pairs (method.md step 8).

The recipe, per optimizer step:

    1. look up each pair's video embeddings (encoded once: vision tower and projector are frozen)
    2. policy log-probs of chosen and rejected answers, in one forward of 2B rows
    3. reference log-probs of the same rows (LoRA: adapters disabled; full: a frozen copy)
    4. sigmoid DPO loss, backward, clip, step, log TRL's reward metrics

The result is a plain checkpoint (LoRA adapters merged) in ``out_dir/policy`` so the next stage
loads it like any other model.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from capdpo.config import FramesConfig, TrainConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.losses import reward_metrics, sigmoid_dpo
from capdpo.policy import EncodedVideo, VideoPolicy
from capdpo.records import PreferencePair, RecordFile, Video
from capdpo.sample import encode_video

log = logging.getLogger(__name__)
DONE = ".complete"


def set_trainable(policy: VideoPolicy, cfg: TrainConfig):
    """Freeze what the config freezes; wrap the LLM in LoRA if asked. Returns the PEFT model or None.
    The parts (vision tower, projector, LLM) come from the policy's family adapter."""
    model, parts = policy.model, policy.parts
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = None
    if cfg.lora:  # PEFT leaves only the adapters trainable
        peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                      lora_dropout=cfg.lora_dropout, target_modules=parts.lora_targets()))
    trains = {"vision": not cfg.freeze_vision, "projector": not cfg.freeze_projector, "llm": not cfg.lora}
    for name, p in model.named_parameters():
        part = parts.part_of(name)
        if part is not None and trains[part]:
            p.requires_grad_(True)
    return peft_model


def run_train(pairs_file: RecordFile[PreferencePair], videos_file: RecordFile[Video], policy: VideoPolicy,
              cfg: TrainConfig, frames: FramesConfig, out_dir: Path, *, fail_fast: bool = False) -> Path:
    """The ``train`` stage; returns the trained checkpoint dir. A finished run is not redone; an
    interrupted one restarts from the policy it was given."""
    out_dir = Path(out_dir)
    final = out_dir / "policy"
    if (final / DONE).exists():
        return final
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    pairs = pairs_file.all()
    if not pairs:
        raise ValueError(f"{pairs_file.path}: no preference pairs to train on")
    videos = videos_file.by_id()
    frozen_video = cfg.freeze_vision and cfg.freeze_projector
    if not frozen_video:
        raise NotImplementedError("train.freeze_vision=false / freeze_projector=false is not supported yet")

    # 1. every video encoded once, before training: the same embeddings serve chosen, rejected,
    #    reference and every epoch
    errors = ItemErrors("train", fail_fast)
    video_cache: dict[str, EncodedVideo] = {}
    prompts: dict[str, list[str]] = {}
    for p in pairs:
        prompts.setdefault(p.video_id, []).append(p.prompt)
    for vid in tqdm(sorted(prompts), desc="train: encode videos", unit="video"):
        try:
            video_cache[vid] = encode_video(policy, videos[vid], frames, prompts[vid], cfg.max_response_tokens).detach()
        except ITEM_ERRORS as e:
            errors.record(vid, e)
    pairs = [p for p in pairs if p.video_id in video_cache]

    reference = None if cfg.lora else copy.deepcopy(policy.model).eval().requires_grad_(False)
    peft_model = set_trainable(policy, cfg)
    if cfg.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(pairs) + cfg.batch_size - 1) // cfg.batch_size
    total = max(1, cfg.epochs * steps_per_epoch // cfg.grad_accum)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    opt, sched = accelerator.prepare(opt, sched)
    policy.model.train()

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    step = 0
    with tqdm(total=cfg.epochs * steps_per_epoch, desc="train", unit="batch") as bar, metrics_path.open("a") as metrics_file:
        for epoch in range(cfg.epochs):
            order = random.Random(cfg.seed + epoch).sample(pairs, len(pairs))
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                with accelerator.accumulate(policy.model):
                    metrics = dpo_step(policy, reference, peft_model, batch, video_cache, cfg, accelerator, trainable)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
                if step % cfg.log_every == 0:
                    metrics_file.write(json.dumps({"step": step, "epoch": epoch + start / len(order), "lr": sched.get_last_lr()[0], **metrics}) + "\n")
                    metrics_file.flush()

    model = peft_model.merge_and_unload() if peft_model is not None else policy.model
    tmp = out_dir / "policy.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    policy.tokenizer.save_pretrained(tmp)
    policy.spec.save(tmp)
    (tmp / DONE).write_text("")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    policy.model = model
    return final


def dpo_step(policy: VideoPolicy, reference, peft_model, batch: list[PreferencePair], video_cache: dict[str, EncodedVideo],
             cfg: TrainConfig, accelerator: Accelerator, trainable: list[torch.nn.Parameter]) -> dict[str, float]:
    """One DPO forward/backward on a batch of pairs; returns the logged metrics."""
    videos = [video_cache[p.video_id] for p in batch]
    prompts = [policy.prompt_ids(p.prompt, v.layout) for p, v in zip(batch, videos)]
    chosen = [policy.response_ids(p.chosen, cfg.max_response_tokens) for p in batch]
    rejected = [policy.response_ids(p.rejected, cfg.max_response_tokens) for p in batch]
    rows_videos = videos + videos  # chosen rows, then rejected rows

    # 2. policy log-probs
    with accelerator.autocast():
        logps, _ = policy.sequence_logps(rows_videos, prompts + prompts, chosen + rejected)
    pc, pr = logps.chunk(2)

    # 3. reference log-probs: the same model with adapters off, or the frozen copy
    with torch.no_grad(), accelerator.autocast():
        if peft_model is not None:
            with peft_model.disable_adapter():
                ref, _ = policy.sequence_logps(rows_videos, prompts + prompts, chosen + rejected)
        else:
            ref, _ = policy.with_model(reference, "reference").sequence_logps(rows_videos, prompts + prompts, chosen + rejected)
    rc, rr = ref.chunk(2)

    # 4. loss and update
    loss = sigmoid_dpo(pc, pr, rc, rr, cfg.beta).mean()
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm) if accelerator.sync_gradients else None
    return {"loss": loss.item(), **reward_metrics(pc, pr, rc, rr, cfg.beta),
            "grad_norm": float(grad_norm) if grad_norm is not None else None}
