"""Supervised fine-tuning of a video policy: the phases of ``capdpo sft``.

``run_phases`` is the stage's machinery (capdpo/sft.py describes the stage): every phase of an
``SFTConfig`` in order, each training the parts it names at their own learning rates on a
ratio-mixed sample of its sources' examples, with the train stage's accelerate set-up,
checkpoints, resume and metrics (``capdpo.training``). It lives below the stages so that a build
of a model (``capdpo.models.mini``) can train through the same phases:

    examples = lambda source: run_examples(source, RunRecords(videos, questions), cfg.seed, errors)
    checkpoint = run_phases(policy, cfg, frames, out_dir, examples)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from torch.utils.data import DataLoader
from tqdm import tqdm

from capdpo.config import FramesConfig, SFTConfig, SFTPhase, SFTSource, TrainConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.media.synthetic import QUESTION_KINDS, every_question
from capdpo.policy.base import EncodedVideo, TowerFeatures, VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.policy.logps import answer_logps
from capdpo.policy.video import VideoEncoder
from capdpo.records import QAItem, RecordFile, Video
from capdpo.training import (
    DONE,
    MixtureSampler,
    PreparedVideo,
    check_setup,
    encode_once,
    finish,
    make_accelerator,
    parameter_groups,
    prepare_optimisation,
    run_steps,
    set_trainable,
    start_steps,
)

log = logging.getLogger(__name__)


# -- the phases of `capdpo sft` -------------------------------------------------------------------------
# What the stage (capdpo.sft) and any build that trains a model through its phases share: each phase
# trains the parts its config names at their own learning rates on a ratio-mixed sample of its
# sources' examples, on the train stage's machinery (capdpo.training); see capdpo/sft.py.

# LLaVA's detailed-description instructions (Liu et al. 2023, the detail_23k prompts) asked of a
# video: the caption answers whichever one its video drew
DESCRIBE_PROMPTS = (
    "Describe the video in detail.",  # capdpo.formats.DESCRIBE_PROMPT, the ShareGPTVideo caption rows' prompt
    "Provide a detailed description of the given video.",
    "Give an elaborate explanation of the video you see.",
    "Share a comprehensive rundown of the presented video.",
    "Offer a thorough analysis of the video.",
    "Explain the various aspects of the video before you.",
    "Clarify the contents of the displayed video with great detail.",
    "Characterize the video using a well-detailed description.",
    "Break down the elements of the video in a detailed manner.",
    "Walk through the important details of the video.",
    "Portray the video with a rich, descriptive narrative.",
    "Narrate the contents of the video with precision.",
    "Analyze the video in a comprehensive and detailed manner.",
    "Illustrate the video through a descriptive explanation.",
    "Examine the video closely and share its details.",
    "Write an exhaustive depiction of the given video.",
)
ENCODER = frozenset({"vision", "projector"})


@dataclass(frozen=True)
class Example:
    """One supervised answer: a prompt about a video and the response trained on."""

    video: Video  # its id keys the prepared video that the video's examples share
    prompt: str
    response: str
    where: str  # the row it comes from (file:line, or the run's video or question), for errors


@dataclass(frozen=True)
class TokenizedExample:
    example: Example
    prompt: list[int]  # the chat-formatted prompt with the video's tokens
    response: list[int]  # the answer tokens, ending with end-of-turn: the only ones scored

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.response)


@dataclass(frozen=True)
class RunRecords:
    """What the run-folder sources read: the run's videos (with their split) and questions."""

    videos: dict[str, Video]
    questions: list[QAItem]

    @classmethod
    def read(cls, videos_file: RecordFile[Video] | None, qa_file: RecordFile[QAItem] | None) -> RunRecords:
        have = lambda f: f is not None and f.exists()  # noqa: E731
        return cls(videos_file.by_id() if have(videos_file) else {}, qa_file.all() if have(qa_file) else [])

    @classmethod
    def of_synthetic(cls, clips, kinds: Sequence[str] | None = None, *, exhaustive: bool = False) -> RunRecords:
        """Synthetic clips (``capdpo.media.synthetic.SyntheticClip``) as a run's train records: every
        video in the train split with its exact caption, and its exact questions of ``kinds`` (None:
        all) tagged ``scene:<kind>`` as ``capdpo data`` tags them. ``exhaustive``: each scene's every
        count, shape and colour question in every phrasing (``synthetic.every_question``), not only
        the ones its clip was given."""
        def asked(clip) -> list[tuple[str, str, str]]:
            return [q.as_tuple() for q in every_question(clip.scene, kinds or QUESTION_KINDS)] if exhaustive else clip.qa

        videos = {c.video.id: c.video.model_copy(update={"split": "train"}) for c in clips}
        questions = [QAItem(id=f"{c.video.id}_{i}", video_id=c.video.id, question=q, answer=a, source=f"scene:{kind}",
                            split="train")
                     for c in clips for i, (q, a, kind) in enumerate(asked(c)) if kinds is None or kind in kinds]
        return cls(videos, questions)

    def held_out(self, video_path: str) -> bool:
        """Whether a foreign row's video is one of the run's test videos (same file, or its id as the file's stem)."""
        test = [v for v in self.videos.values() if v.split == "test"]
        path = Path(video_path)
        return path.resolve() in {Path(v.video).resolve() for v in test} or path.stem in {v.id for v in test}


def run_phases(policy: VideoPolicy, cfg: SFTConfig, frames: FramesConfig, out_dir: Path,
               examples: Callable[[SFTSource], list[Example]], *, embed_cache: EmbeddingCache | None = None,
               errors: ItemErrors | None = None) -> Path:
    """Every phase of ``cfg`` in order on ``policy`` (trained in place); returns ``out_dir/policy``.
    ``examples(source)`` gives a phase's source its examples (``run_examples`` for the run's
    captions and questions). A finished run is not redone, a finished phase is not redone (the
    next starts from its saved weights), an interrupted phase resumes from its newest checkpoint.
    ``embed_cache`` keeps the frozen parts' outputs on disk (None: in memory for this run);
    ``errors`` collects the bad items (default: recorded and skipped). The returned checkpoint
    always holds the result; ``policy.model`` holds it too when a phase ran in this call."""
    out_dir = Path(out_dir)
    final = out_dir / "policy"
    if (final / DONE).exists():
        return final
    errors = errors or ItemErrors("sft", fail_fast=False)
    changed: set[str] = set()  # parts earlier phases trained
    weights_from: Path | None = None  # a finished phase's weights that the policy in memory does not hold yet
    for index, phase in enumerate(cfg.phases):
        result = phase_result(out_dir, cfg, index)
        if (result / DONE).exists():
            log.info("sft: phase %s already done (%s)", phase.name, result)
            weights_from = result
        else:
            if weights_from is not None:
                load_weights(policy, weights_from)
            run_phase(policy, cfg, index, [examples(source) for source in phase.sources], frames, out_dir, embed_cache,
                      errors, changed)
            weights_from = None
        changed |= set(phase.lr)
    state = PartialState()
    if state.is_main_process and not (final / DONE).exists():  # the last phase's weights are the stage's result
        phase_result(out_dir, cfg, len(cfg.phases) - 1).rename(final)
    state.wait_for_everyone()
    if errors.errors:
        log.warning("sft: %s", errors.summary())
    return final


def phase_result(out_dir: Path, cfg: SFTConfig, index: int) -> Path:
    """Where phase ``index`` leaves its weights (the last one's move to ``out_dir/policy`` once all are done)."""
    return out_dir / cfg.phases[index].name / "policy"


def run_phase(policy: VideoPolicy, cfg: SFTConfig, index: int, examples: list[list[Example]], frames: FramesConfig,
              out_dir: Path, embed_cache: EmbeddingCache | None, errors: ItemErrors, changed: set[str]) -> None:
    """One phase on ``policy``, from its newest checkpoint if it has one; ``policy.model`` ends as
    the phase's result (LoRA merged), saved in ``sft/<phase>/policy``."""
    phase = cfg.phases[index]
    phase_dir = out_dir / phase.name
    settings = phase_settings(cfg, phase)
    accelerator = make_accelerator(settings, phase_dir)
    check_setup(settings, accelerator)
    if accelerator.num_processes > 1:  # each process works on its own device (cuda:<local rank>)
        policy.model.to(accelerator.device)

    # a. each video once, as this phase holds it, and every example's tokens
    prepare = video_holder(policy, frames, embed_cache, set(phase.lr), changed)
    videos, pools = prepare_examples(policy, phase, examples, prepare, cfg.max_response_tokens, errors)
    log.info("sft %s: %s examples (%s) of %d videos", phase.name, "+".join(str(len(p)) for p in pools),
             "+".join(s.kind for s in phase.sources), len(videos))
    # b. the trainable parts, each at its learning rate; LoRA's initial weights depend on the seed and
    # the phase only, so a phase resumed in a fresh process starts where an uninterrupted run's did
    torch.manual_seed(cfg.seed * 1_000_003 + index)
    peft_model = set_trainable(policy, settings, phase.lora_modules)
    if cfg.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loader = example_loader(pools, [s.ratio for s in phase.sources], phase, cfg.seed * 1_000 + index)
    optimisation = prepare_optimisation(accelerator, AnswerScorer(policy), loader, settings, parameter_groups(policy, phase.lr))

    progress = start_steps(accelerator, settings, phase_dir)

    def step(batch: list[TokenizedExample], _: int) -> dict[str, float]:
        return sft_step(optimisation.scorer, batch, videos, accelerator, optimisation.trainable, phase.max_grad_norm)

    run_steps(accelerator, optimisation, settings, progress, phase_dir, step, desc=f"sft {phase.name}", postfix={"loss": "loss"},
              labels={"phase": phase.name})
    policy.model = finish(accelerator, settings, optimisation, peft_model, policy, phase_dir)
    accelerator.free_memory()


def sft_step(scorer: AnswerScorer, batch: list[TokenizedExample], videos: dict[str, PreparedVideo], accelerator: Accelerator,
             trainable: list[torch.nn.Parameter], max_grad_norm: float) -> dict[str, float]:
    """One forward/backward on a batch: the mean NLL of its answer tokens. Returns the logged metrics."""
    logps, counts = scorer([videos[t.example.video.id] for t in batch], batch)
    loss = -(logps.sum() / counts.sum())
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(trainable, max_grad_norm) if accelerator.sync_gradients else None
    return {"loss": loss.item(), "answer_tokens": float(counts.sum()), "examples": float(len(batch)),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "tokens": sum(t.tokens for t in batch)}


class AnswerScorer(torch.nn.Module):
    """The module the engines wrap: a batch of examples -> each answer's summed log-prob and token
    count (``answer_logps``: a video's examples in one packed row, answer tokens only)."""

    def __init__(self, policy: VideoPolicy):
        super().__init__()
        self.model = policy.model  # registered, so the engines see (and shard) the parameters
        self.policy = policy
        self._no_split_modules = policy.model._no_split_modules

    def forward(self, videos: Sequence[PreparedVideo], batch: Sequence[TokenizedExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features or pixels (a training projector or tower) are encoded here, once per video, with autograd."""
        return answer_logps(self.policy, encode_once(self.policy, videos), [t.prompt for t in batch], [t.response for t in batch])


def phase_settings(cfg: SFTConfig, phase: SFTPhase) -> TrainConfig:
    """The phase in the form ``capdpo.training`` reads its settings: the accelerator, the frozen
    parts and LoRA, the schedule (its learning rates come from ``parameter_groups``), checkpoints and metrics."""
    trains_llm = "llm" in phase.lr
    return TrainConfig(lr=max(phase.lr.values()), epochs=phase.epochs, max_steps=phase.max_steps, batch_size=phase.batch_size,
                       grad_accum=phase.grad_accum, warmup_ratio=phase.warmup_ratio, weight_decay=phase.weight_decay,
                       max_grad_norm=phase.max_grad_norm, lora=phase.lora and trains_llm, lora_r=phase.lora_r,
                       lora_alpha=phase.lora_alpha, lora_dropout=phase.lora_dropout, freeze_vision="vision" not in phase.lr,
                       freeze_projector="projector" not in phase.lr, freeze_llm=not trains_llm,
                       max_response_tokens=cfg.max_response_tokens, gradient_checkpointing=cfg.gradient_checkpointing,
                       mixed_precision=cfg.mixed_precision, seed=cfg.seed, log_every=cfg.log_every,
                       save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints)


def run_examples(source: SFTSource, records: RunRecords, seed: int, errors: ItemErrors) -> list[Example]:
    """The examples of a captions or qa source, from the run's train videos and questions only:
    never a held-out video's caption or question."""
    if source.kind == "captions":
        prompts = source.prompts or DESCRIBE_PROMPTS
        return [Example(v, random.Random(f"{seed}:{v.id}").choice(prompts), v.caption, f"video {v.id}")
                for v in records.videos.values() if v.split == "train" and v.caption.strip()]
    if source.kind == "qa":
        if not records.questions:
            raise ValueError("sft: a qa source needs the run's qa.jsonl (run `capdpo qa` first)")
        kinds = {f"scene:{k}" for k in source.question_kinds} if source.question_kinds else None
        examples = []
        for q in records.questions:
            video = records.videos.get(q.video_id)
            if q.split != "train" or (kinds is not None and q.source not in kinds):
                continue
            if video is None:
                errors.record(f"question {q.id}", KeyError(f"{q.id}: names video {q.video_id}, which is not in the run's videos"))
            elif video.split == "train":
                examples.append(Example(video, q.question, q.answer, f"question {q.id}"))
        return examples
    raise ValueError(f"sft: a {source.kind} source reads its own rows file (capdpo.sft.source_examples)")


def video_holder(policy: VideoPolicy, frames: FramesConfig, cache: EmbeddingCache | None, trains: set[str],
                 changed: set[str]) -> Callable[[Video, Sequence[str], int], PreparedVideo]:
    """How a phase that trains ``trains`` holds each video: pixels when the vision tower trains;
    the tower's features when the projector trains and the family splits its encoder there (the
    step runs the projector alone); else embeddings. The disk cache serves only weights no earlier
    phase (``changed``) trained: its keys hash a model's weights once per model object, and an
    earlier phase changed them in place; embeddings of a changed projector are projected here."""
    if "vision" in trains:
        return VideoEncoder(policy, frames).pixels
    if policy.splits_projector:
        tower = VideoEncoder(policy, frames, None if "vision" in changed else cache).tower
        if "projector" in trains:
            return tower
        if not changed & ENCODER:
            return VideoEncoder(policy, frames, cache).encode
        return lambda video, prompts, new_tokens: projected(policy, tower(video, prompts, new_tokens))
    if "projector" in trains:
        return VideoEncoder(policy, frames).pixels
    return VideoEncoder(policy, frames, None if changed & ENCODER else cache).encode


def projected(policy: VideoPolicy, features: TowerFeatures) -> EncodedVideo:
    with torch.no_grad():
        return policy.project(features)


def prepare_examples(policy: VideoPolicy, phase: SFTPhase, examples: list[list[Example]],
                     prepare: Callable[[Video, Sequence[str], int], PreparedVideo], max_response_tokens: int,
                     errors: ItemErrors) -> tuple[dict[str, PreparedVideo], list[list[TokenizedExample]]]:
    """Every video of the phase's examples once, planned for all its prompts, and each source's
    examples with their tokens. A video that cannot be read (or is over the token budget) is
    recorded naming the first row that uses it, and its examples are dropped; a source left
    without examples stops the phase, since its ratio cannot be honoured."""
    by_video: dict[str, list[Example]] = {}
    for example in (e for source in examples for e in source):
        by_video.setdefault(example.video.id, []).append(example)
    videos: dict[str, PreparedVideo] = {}
    for video_id in tqdm(sorted(by_video), desc=f"sft {phase.name}: videos", unit="video"):
        group = by_video[video_id]
        try:
            videos[video_id] = prepare(group[0].video, sorted({e.prompt for e in group}), max_response_tokens)
        except ITEM_ERRORS as e:
            errors.record(group[0].where, e)
    pools = [[TokenizedExample(e, policy.prompt_ids(e.prompt, videos[e.video.id].layout),
                               policy.response_ids(e.response, max_response_tokens))
              for e in source if e.video.id in videos] for source in examples]
    for source, pool in zip(phase.sources, pools):
        if not pool:
            raise ValueError(f"sft phase {phase.name}: its {source.kind} source{f' ({source.path})' if source.path else ''} "
                             "has no usable example (held-out or unreadable videos, or nothing to read)")
    return videos, pools


def example_loader(pools: list[list[TokenizedExample]], ratios: list[float], phase: SFTPhase, seed: int) -> DataLoader:
    """Batches of the phase's mixture: each epoch ``examples_per_epoch`` examples (default: all the
    pools hold), each source its ratio's share, a video's examples together (``MixtureSampler``)."""
    dataset = [t for pool in pools for t in pool]
    sampler = MixtureSampler([len(p) for p in pools], ratios, phase.examples_per_epoch or len(dataset),
                             [t.example.video.id for t in dataset], seed)
    return DataLoader(dataset, batch_size=phase.batch_size, sampler=sampler, collate_fn=list)


def load_weights(policy: VideoPolicy, checkpoint: Path) -> None:
    """Put a finished phase's saved weights into ``policy`` (a phase resumed in a fresh process
    starts from them, as it would have from the weights in memory)."""
    model = type(policy.model).from_pretrained(checkpoint, dtype=policy.model.dtype,
                                               attn_implementation=policy.model.config._attn_implementation)
    policy.model = model.to(policy.device).eval()
