"""Stage 8, online: GRPO of the video policy with the caption-grounded reward (``train.algorithm: grpo``).

DPO learns from answers sampled once, before training. GRPO samples while it trains; per optimizer step:

  1. ``grpo.questions_per_step`` train questions, in a seeded order that keeps a video's questions together
  2. G answers to each from the policy being trained, in one ``generate`` call (a video's embeddings
     computed once); each answer's row is seeded by (seed, step, question), so a resumed run samples
     the same answers
  3. rewards: the judge service's caption-grounded score (reply cache, retries, budget) and/or rule
     rewards, weighted and summed (``capdpo.rewards``); a remote judge's requests go out on a thread
     and are in flight while step 4 runs (``grpo.judge_overlap``)
  4. per-token log-probs of the G answers in one packed row: the video and question run once, the
     answers behind them under a tree mask (``capdpo.policy.logps.group_token_logps``); the
     reference's the same way without gradients (LoRA adapters off, or a frozen copy) when ``beta`` > 0
  5. advantages normalised within each question's group (``capdpo.grpo_loss.group_advantages``)
  6. the clipped policy-gradient loss (``capdpo.grpo_loss.grpo_loss``), backward, clip, step, metrics

One update per generation batch (TRL's default ``num_iterations=1``): the sampling policy is the one
being trained, so the "old" log-probs are the current ones detached. Checkpoints, metrics, engines and
the saved policy are the DPO stage's (``capdpo.training``).

A batch with nothing to learn from - the judge scored none of its answers (its endpoint is down), or no
reward applies to any - is not trained on: no backward, no optimizer step, no metrics line. After
``grpo.max_failed_steps`` such batches in a row GRPO saves a checkpoint at the first of them and stops with
:class:`~capdpo.errors.RewardsMissing`; run it again once the judge is back and it resumes there. A run
that learned nothing never ends with a policy saved as trained.
"""

from __future__ import annotations

import copy
import logging
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from capdpo.config import FramesConfig, GRPOConfig, TrainConfig
from capdpo.errors import ITEM_ERRORS, BudgetExceeded, ItemErrors, RewardsMissing
from capdpo.grpo_loss import completion_metrics, group_advantages, grpo_loss
from capdpo.judge.judge import CaptionJudge, JudgeItem
from capdpo.policy.base import VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.policy.logps import group_token_logps
from capdpo.policy.video import VideoEncoder
from capdpo.records import QAItem, RecordFile, Video
from capdpo.rewards import RULES, judge_rewards
from capdpo.training import (
    DONE,
    PreparedVideo,
    Progress,
    VideoGroupedSampler,
    check_setup,
    encode_once,
    finish,
    make_accelerator,
    prepare_optimisation,
    run_steps,
    save_checkpoint,
    set_trainable,
    sharded_engine,
    start_steps,
    video_preparer,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    """A train question with its video record (the judge reads the caption)."""

    qa: QAItem
    video: Video


# -- the recipe --------------------------------------------------------------------------------------------
def run_grpo(qa_file: RecordFile[QAItem], videos_file: RecordFile[Video], policy: VideoPolicy, cfg: TrainConfig,
             frames: FramesConfig, out_dir: Path, *, judge: CaptionJudge | None = None,
             embed_cache: EmbeddingCache | None = None, fail_fast: bool = False) -> Path:
    """The online ``train`` stage; returns the trained checkpoint dir. A finished run is not redone;
    an interrupted one resumes from its newest checkpoint (``out_dir/checkpoints``)."""
    out_dir = Path(out_dir)
    final = out_dir / "policy"
    if (final / DONE).exists():
        return final
    rewards = Rewards(cfg.grpo, judge)
    accelerator = make_accelerator(cfg, out_dir)
    check_setup(cfg, accelerator)
    if accelerator.num_processes > 1:
        policy.model.to(accelerator.device)
    torch.manual_seed(cfg.seed)

    # the questions and their videos, each video once (embeddings cached when the encoder is frozen)
    questions, videos = prepare_questions(qa_file, videos_file, VideoEncoder(policy, frames, embed_cache), cfg, fail_fast)
    # the reference, before any weight moves: a frozen copy for full fine-tuning (LoRA: adapters off)
    frozen_copy = copy.deepcopy(policy.model).eval().requires_grad_(False) if cfg.grpo.beta and not cfg.lora else None
    peft_model = set_trainable(policy, cfg)
    reference = GroupReference(cfg.grpo.beta > 0, peft_model, frozen_copy)
    if cfg.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimisation = prepare_optimisation(accelerator, GroupScorer(policy, cfg.shared_prefix), question_loader(questions, cfg), cfg)

    progress = start_steps(accelerator, cfg, out_dir)
    unrewarded: list[Progress] = []  # where each batch of the current run of batches without rewards started

    def step(batch: list[Question], step_number: int) -> dict[str, float] | None:
        try:
            metrics = grpo_step(optimisation.scorer, batch, videos, rewards, reference, cfg, accelerator,
                                optimisation.trainable, step_number)
        except BudgetExceeded as e:  # keep what is trained; a later run with a larger budget resumes here
            save_checkpoint(accelerator, out_dir / "checkpoints", progress, cfg.keep_checkpoints)
            raise BudgetExceeded(f"{e}; GRPO stopped at step {progress.step} of {optimisation.total} with a checkpoint: "
                                 "raise the judge's budget and run train again to go on") from e
        if metrics is not None:
            unrewarded.clear()
            return metrics
        unrewarded.append(Progress(**progress.__dict__))
        why = rewards.missing_reason()
        log.warning("grpo: step %d not taken: %s (%d of grpo.max_failed_steps=%d in a row)", progress.step + 1, why,
                    len(unrewarded), cfg.grpo.max_failed_steps)
        if len(unrewarded) >= cfg.grpo.max_failed_steps:
            # nothing moved since the first of these batches: resuming there loses nothing and redoes them
            save_checkpoint(accelerator, out_dir / "checkpoints", unrewarded[0], cfg.keep_checkpoints)
            raise RewardsMissing(f"GRPO stopped: {len(unrewarded)} steps in a row had nothing to learn from ({why}). "
                                 f"{progress.step} of {optimisation.total} steps are trained and saved in a checkpoint "
                                 f"in {out_dir / 'checkpoints'}; bring the judge back and run train again to go on there")
        return None

    run_steps(accelerator, optimisation, cfg, progress, out_dir, step, desc="grpo", postfix={"loss": "loss", "reward": "reward"})
    policy.model = finish(accelerator, cfg, optimisation, peft_model, policy, out_dir)
    return final


def grpo_step(scorer: GroupScorer, batch: list[Question], videos: dict[str, PreparedVideo], rewards: Rewards,
              reference: GroupReference, cfg: TrainConfig, accelerator: Accelerator,
              trainable: list[torch.nn.Parameter], step: int) -> dict[str, float] | None:
    """Sample, reward, score and update on one batch of questions; returns the logged metrics, or
    None - no backward run - when no process's batch has a reward to learn from."""
    policy: VideoPolicy = accelerator.unwrap_model(scorer).policy
    loss, metrics = grpo_objective(scorer, policy, batch, videos, rewards, reference, cfg, step, accelerator.autocast,
                                   sharded=sharded_engine(accelerator))
    if on_every_process(accelerator, metrics.pop(UNREWARDED) == 1.0):
        return None
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm) if accelerator.sync_gradients else None
    return {"loss": loss.item(), **metrics, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}


def grpo_objective(scorer: torch.nn.Module, policy: VideoPolicy, batch: Sequence[Question], videos: dict[str, PreparedVideo],
                   rewards: Rewards, reference: GroupReference, cfg: TrainConfig, step: int,
                   autocast: Callable[[], AbstractContextManager] = nullcontext, *, sharded: bool = False
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's clipped policy-gradient loss (with its graph) and metrics. ``scorer`` is the
    engine-wrapped ``GroupScorer`` (accelerate's, or DeepSpeed's / FSDP2's directly), ``policy`` the
    unwrapped one; ``sharded``: no process holds the whole model (ZeRO-3, FSDP)."""
    g = cfg.grpo
    batch_videos = [videos[q.video.id] for q in batch]
    # 1-2. G answers per question from the current policy
    answers = sample_groups(scorer, policy, batch, batch_videos, g, seed=cfg.seed, step=step, synced=sharded)
    texts = [[policy.tokenizer.decode(a, skip_special_tokens=True).strip() for a in group] for group in answers]
    # 3. rewards: a remote judge works on them while the policy scores the answers
    pending = rewards.submit(batch, texts, step)
    # 4. per-token log-probs: the policy's (with its graph), the reference's (none)
    prompts = [policy.prompt_ids(q.qa.question, v.layout) for q, v in zip(batch, batch_videos)]
    logps, mask = scorer(batch_videos, prompts, answers)
    ref_logps = reference.logps(policy, batch_videos, prompts, answers, cfg.shared_prefix, autocast)
    # 5. advantages within each question's group
    values = pending.result()
    scored = group_advantages(values, rewards.weights, g.num_generations, rewards.names, g.scale_rewards)
    # 6. the clipped objective
    loss, metrics = grpo_loss(logps, scored.advantages.to(logps.device, logps.dtype), mask, ref_logps=ref_logps,
                              loss_type=g.loss_type, beta=g.beta, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high,
                              max_completion_length=g.max_completion_length, kl_ratio_correction=g.kl_ratio_correction)
    eos = policy.tokenizer.eos_token_id
    flat = [a for group in answers for a in group]
    lengths = torch.tensor([len(a) for a in flat])
    terminated = torch.tensor([bool(a) and a[-1] == eos for a in flat])
    return loss, {**metrics, **scored.metrics, **completion_metrics(lengths, terminated),
                  UNREWARDED: float(nothing_to_learn(values, rewards.names))}


UNREWARDED = "unrewarded"
"""The key of :func:`grpo_objective`'s metrics that is 1.0 when the batch has nothing to learn from
(:func:`nothing_to_learn`); :func:`grpo_step` takes it out before the metrics are logged."""


def nothing_to_learn(rewards: torch.Tensor, names: Sequence[str]) -> bool:
    """Whether a batch's ``(answers, functions)`` rewards teach nothing: the judge, when it is a
    reward, scored none of the answers (its failure is no verdict on them), or no reward applies to any."""
    missing = torch.isnan(rewards)
    judge_missing = "caption_judge" in names and bool(missing[:, list(names).index("caption_judge")].all())
    return judge_missing or bool(missing.all())


def on_every_process(accelerator: Accelerator, flag: bool) -> bool:
    """``flag`` holds on every process; all of them must agree before one skips a backward that the
    others' gradients would wait for."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "min").item() == 1.0


def sample_groups(scorer: torch.nn.Module, policy: VideoPolicy, batch: Sequence[Question], videos: Sequence[PreparedVideo],
                  g: GRPOConfig, *, seed: int, step: int, synced: bool = False) -> list[list[list[int]]]:
    """``g.num_generations`` answers (token ids) to each question, one ``generate`` call through the
    engine-wrapped ``scorer``, no gradients. Row seeds depend on (seed, step, question id) only: a
    resumed run samples the same answers. ``synced``: every process runs as many forward passes as
    the longest generation needs (a sharded model gathers its weights in each, so all take part)."""
    was_training = policy.model.training
    policy.model.eval()
    with torch.no_grad():
        sampling = GroupSampling(questions=[q.qa.question for q in batch], n=g.num_generations, temperature=g.temperature,
                                 top_p=g.top_p, max_new_tokens=g.max_completion_length, synced=synced,
                                 seeds=[zlib.crc32(f"{seed}|{step}|{q.qa.id}".encode()) for q in batch])
        groups = scorer(videos, sampling=sampling)
    policy.model.train(was_training)
    eos = policy.tokenizer.eos_token_id
    return [[a or [eos] for a in group] for group in groups]  # an empty answer is scored as its end-of-turn


# -- rewards and reference -----------------------------------------------------------------------------
class Rewards:
    """The configured reward functions: ``(answers, functions)`` rewards of a batch's groups, NaN
    where a function does not apply.

    ``submit`` returns a future. With overlap (a remote judge, or ``judge_overlap: on``) one worker
    thread computes the rewards while the caller goes on: the judge's HTTP requests wait on the
    network, not on the policy's device, and an error of the judge (a spent budget) is raised by
    ``result()``. An in-process judge runs at once on the caller's thread (two models on one CPU or
    GPU would only take turns). Either way the rewards are the same."""

    def __init__(self, g: GRPOConfig, judge: CaptionJudge | None):
        self.names = [r.name for r in g.rewards]
        self.weights = torch.tensor([r.weight for r in g.rewards])
        if "caption_judge" in self.names:
            if judge is None:
                raise ValueError("train.grpo.rewards: caption_judge needs the run's judge")
            if judge.cfg.protocol != "caption_reward":
                raise ValueError(f"train.grpo.rewards: caption_judge reads 1-5 caption_reward scores; judge.protocol is {judge.cfg.protocol!r}")
        self.judge = judge
        self.judge_failure: str | None = None  # why the judge scored none of the last batch's answers, if it did not
        remote = judge is not None and all(j.backend == "openai" for j in (judge.cfg.llm, *judge.cfg.ensemble))
        overlap = g.judge_overlap == "on" or (g.judge_overlap == "auto" and remote and "caption_judge" in self.names)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpo-judge") if overlap else None

    def submit(self, batch: Sequence[Question], texts: Sequence[Sequence[str]], step: int) -> Future[torch.Tensor]:
        if self._worker is not None:
            return self._worker.submit(self, batch, texts, step)
        done: Future[torch.Tensor] = Future()
        done.set_result(self(batch, texts, step))
        return done

    def __call__(self, batch: Sequence[Question], texts: Sequence[Sequence[str]], step: int) -> torch.Tensor:
        columns = []
        for name in self.names:
            if name == "caption_judge":
                # the reply cache keys on the prompt, so an answer judged at an earlier step (or before a kill) costs nothing again
                items = [JudgeItem.for_answer(q.video, q.qa, text, f"{q.qa.id}#grpo{step}.{k}")
                         for q, group in zip(batch, texts) for k, text in enumerate(group)]
                judgments = self.judge.judge(items)
                self.judge_failure = next((j.failure for j in judgments if j.failure is not None), None)
                columns.append(judge_rewards(judgments))
            else:
                columns.append([RULES[name](text, q.qa.answer) for q, group in zip(batch, texts) for text in group])
        return torch.tensor(columns, dtype=torch.float32).T

    def missing_reason(self) -> str:
        """Why the last batch had nothing to learn from (:func:`nothing_to_learn`), for the log and the error."""
        if "caption_judge" in self.names and self.judge_failure is not None:
            return f"the judge scored none of its answers: {self.judge_failure}"
        return f"none of the rewards {self.names} applies to any of its answers"


@dataclass
class GroupReference:
    """The reference's per-token log-probs of the groups' answers, when ``needed`` (beta > 0): the
    policy with its ``lora`` adapters off, or the ``frozen_copy`` of a fully trained model."""

    needed: bool
    lora: PeftModel | None = None
    frozen_copy: torch.nn.Module | None = None

    def logps(self, policy: VideoPolicy, videos: Sequence[PreparedVideo], prompts: Sequence[list[int]],
              answers: Sequence[Sequence[list[int]]], shared_prefix: bool, autocast) -> torch.Tensor | None:
        if not self.needed:
            return None
        with torch.no_grad(), autocast():
            encoded = encode_once(policy, videos)
            if self.lora is not None:
                with self.lora.disable_adapter():
                    return group_token_logps(policy, encoded, prompts, answers, shared_prefix)[0]
            return group_token_logps(policy.with_model(self.frozen_copy, "reference"), encoded, prompts, answers, shared_prefix)[0]


# -- what the engines wrap --------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupSampling:
    """What ``GroupScorer`` samples: ``n`` answers to each question, each question's rows seeded."""

    questions: list[str]
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seeds: list[int]
    synced: bool


class GroupScorer(torch.nn.Module):
    """The module accelerate wraps: a batch of questions' groups -> per-token log-probs of every
    answer and their mask (``group_token_logps``), videos encoded here once when the encoder trains.

    Sampling goes through ``forward`` too (``sampling=``): the engine's hooks around it are what
    gather a sharded model's weights (FSDP2's root holds those outside the decoder layers)."""

    def __init__(self, policy: VideoPolicy, shared_prefix: bool):
        super().__init__()
        self.model = policy.model
        self.policy = policy
        self.shared_prefix = shared_prefix
        self._no_split_modules = policy.model._no_split_modules

    def forward(self, videos: Sequence[PreparedVideo], prompts: Sequence[list[int]] = (),
                answers: Sequence[Sequence[list[int]]] = (), *, sampling: GroupSampling | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | list[list[list[int]]]:
        encoded = encode_once(self.policy, videos)
        if sampling is not None:
            return self.policy.generate_ids(list(zip(encoded, sampling.questions)), n=sampling.n, temperature=sampling.temperature,
                                            top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens, seeds=sampling.seeds,
                                            synced_gpus=sampling.synced)
        return group_token_logps(self.policy, encoded, prompts, answers, self.shared_prefix)


# -- set-up --------------------------------------------------------------------------------------------
def prepare_questions(qa_file: RecordFile[QAItem], videos_file: RecordFile[Video], encoder: VideoEncoder,
                      cfg: TrainConfig, fail_fast: bool) -> tuple[list[Question], dict[str, PreparedVideo]]:
    """The train questions whose video is usable, and each video once: embeddings for a frozen
    encoder (from the disk cache when there is one), else pixels the step encodes with autograd.
    A bad video is recorded and its questions dropped."""
    questions = [q for q in qa_file.all() if q.split == "train"]
    if not questions:
        raise ValueError(f"{qa_file.path}: no train questions to sample answers for")
    records = videos_file.by_id()
    prompts: dict[str, list[str]] = {}
    for q in questions:
        prompts.setdefault(q.video_id, []).append(q.question)
    prepare = video_preparer(encoder, cfg)
    errors = ItemErrors("train", fail_fast)
    videos: dict[str, PreparedVideo] = {}
    for video_id in tqdm(sorted(prompts), desc="grpo: videos", unit="video"):
        try:
            if video_id not in records:
                raise KeyError(f"{video_id}: questions name a video that is not in the run's videos")
            videos[video_id] = prepare(records[video_id], prompts[video_id], cfg.grpo.max_completion_length)
        except (*ITEM_ERRORS, KeyError) as e:
            errors.record(video_id, e)
    usable = [Question(q, records[q.video_id]) for q in questions if q.video_id in videos]
    if not usable:
        raise ValueError(f"{qa_file.path}: no train question has a usable video")
    return usable, videos


def question_loader(questions: list[Question], cfg: TrainConfig) -> DataLoader:
    """Batches of ``grpo.questions_per_step`` questions, a video's questions together, in an order of seed and epoch."""
    return DataLoader(questions, batch_size=cfg.grpo.questions_per_step, collate_fn=list,
                      sampler=VideoGroupedSampler([q.video.id for q in questions], cfg.seed))
