"""The video LMM behind ``sample``, ``train`` and ``evaluate``: one interface over several families.

``VideoPolicy.load`` reads the checkpoint's ``config.model_type`` and returns that family's adapter
(``capdpo.models.load``: LLaVA-NeXT-Video and the built-in mini model, Video-LLaVA, LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL). Every adapter offers the same operations:

    policy = VideoPolicy.load("Qwen/Qwen2-VL-7B-Instruct", cache_dir, dtype="bfloat16")
    layout = policy.layout(num_frames=8, height=480, width=640)   # token cost, before running anything
    inputs = policy.preprocess(frames, layout)                    # the family's own resize/normalise/patchify
    video = policy.encode(inputs)                                 # vision tower + projector, once per video
    features = policy.tower_features(inputs)                      # LLaVA-NeXT-Video, Video-LLaVA: the frozen
    video = policy.project(features)                              # tower's output, then the projector alone
    answers = policy.generate(video, question, n=4, temperature=1.0, top_p=0.95, seed=7)
    logps, counts = policy.sequence_logps([video, video], prompts, responses)
    pair = policy.pair_logps([video], [prompt], [chosen], [rejected])  # one row: both answers share the prompt
    policy.parts                                                  # vision / projector / LLM parameter names

An ``EncodedVideo`` is all a later forward needs (embeddings, plus the patch grid and deepstack
features of Qwen models). It is handed to the model as ``mm_encoder_outputs``, so the model
scatters it into the placeholder positions of every row that uses it, and computes its own
(multimodal rotary) positions: N samples, or a chosen and a rejected answer, never re-encode it.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import GenerationMixin, LogitsProcessorList

from capdpo.errors import OverBudgetError
from capdpo.policy.packing import TREE_MASK_ATTENTION, Branch, behind_shared_prefix, pack_branches, tree_mask
from capdpo.policy.sampling import RowSampler
from capdpo.prompts import ChatPrompt

logger = logging.getLogger(__name__)
# transformers renamed generate's and forward's past_key_values to cache (the old name is deprecated)
CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"

VIDEO_TOKEN = "<video>"
LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a decoder layer's linear layers
SPEC_FILE = "capdpo_video.json"
DEFAULT_FPS = 2.0  # frame rate assumed for frames without timing (the paper's frame folders are 2 fps)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, the paper's setting
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSpec:
    """How frames become pixels for a fixed-resolution (LLaVA-family) checkpoint; saved beside it
    as ``capdpo_video.json``. ``crop``: resize the short side then centre-crop (LLaVA-NeXT-Video,
    Video-LLaVA), else squash to ``image_size`` x ``image_size`` (LLaVA-OneVision)."""

    image_size: int = 224
    num_frames: int = 8
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop: bool = True

    def save(self, model_dir: str | Path) -> None:
        (Path(model_dir) / SPEC_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, model_dir: str | Path, default: VisionSpec | None = None) -> VisionSpec:
        """capdpo's own file, else the checkpoint's Hugging Face (video) processor config, else ``default``."""
        model_dir = Path(model_dir)
        if (model_dir / SPEC_FILE).exists():
            return spec_from_dict(cls, json.loads((model_dir / SPEC_FILE).read_text()))
        hf = read_processor_config(model_dir)
        if not hf:
            return default or cls()
        crop = hf.get("crop_size") if hf.get("do_center_crop", True) else None
        size = crop or hf.get("size") or {}
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        return cls(image_size=side or cls.image_size, mean=tuple(hf.get("image_mean", cls.mean)),
                   std=tuple(hf.get("image_std", cls.std)), crop=bool(crop))


def read_processor_config(model_dir: Path) -> dict:
    """The checkpoint's video processor config, else its image processor config, else ``{}``."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (model_dir / name).exists():
            return json.loads((model_dir / name).read_text())
    return {}


@dataclass(frozen=True)
class VideoLayout:
    """Where one video's tokens go, known before the model runs (the token budget uses it).

    ``frame_times`` are the seconds of the sampled frames and ``seconds_per_frame`` the clip length
    over the frame count: Qwen2.5-VL spaces its temporal positions and Qwen3-VL writes timestamps
    with them. ``grid_thw`` is Qwen's (temporal, height, width) patch grid before merging."""

    num_frames: int
    height: int
    width: int
    n_visual: int
    frame_times: tuple[float, ...] = ()
    seconds_per_frame: float = 1 / DEFAULT_FPS
    grid_thw: tuple[int, int, int] | None = None
    max_pixels: int | None = None  # Qwen: the pixel cap the frame size was planned with


@dataclass(frozen=True)
class VideoInputs:
    """A video's pixels in its family's input format, and its layout."""

    pixel_values: torch.Tensor  # LLaVA family: (T, 3, S, S); Qwen: (patches, 3 * temporal_patch * patch * patch)
    layout: VideoLayout


@dataclass
class EncodedVideo:
    """One encoded video: everything a later forward needs, on the model's device."""

    layout: VideoLayout
    embeds: torch.Tensor  # (n_visual, hidden) in the LLM's embedding space
    deepstack: tuple[torch.Tensor, ...] = ()  # Qwen3-VL: (n_visual, hidden) per deepstack LLM layer

    def detach(self) -> EncodedVideo:
        return EncodedVideo(self.layout, self.embeds.detach().clone(), tuple(d.detach().clone() for d in self.deepstack))


class PairLogprobs(NamedTuple):
    """Per pair: summed log-prob of the chosen and of the rejected answer, and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class TowerFeatures:
    """One video through the vision tower only: the projector's input. With the tower frozen and the
    projector training, it is all a training step needs to encode the video again."""

    layout: VideoLayout
    features: torch.Tensor  # the projector's input, as the family's model hands it over


@dataclass(frozen=True)
class ModelParts:
    """Parameter-name prefixes of the three parts, for freezing and LoRA targets. The projector is
    matched first: in Qwen models it lives inside the vision module (``model.visual.merger``)."""

    vision: tuple[str, ...]
    projector: tuple[str, ...]
    llm: tuple[str, ...] = ("model.language_model", "lm_head")

    def part_of(self, name: str) -> str | None:
        def under(prefixes):
            return any(name == p or name.startswith(p + ".") for p in prefixes)

        return "projector" if under(self.projector) else "vision" if under(self.vision) else "llm" if under(self.llm) else None

    def lora_targets(self, modules: Sequence[str] = LLM_LINEAR) -> str:
        """Regex (PEFT ``target_modules``) of the language model's linear layers named ``modules``
        (default: all of them), never the vision tower's or the projector's."""
        prefixes = "|".join(p.replace(".", r"\.") for p in self.llm if p != "lm_head")
        return rf"({prefixes})\..*\.({'|'.join(modules)})"


class VideoPolicy:
    """A video LMM behind one interface; subclasses in ``capdpo.models.load`` hold what differs per family.

    A subclass sets ``model_class`` and implements ``read_spec``, ``layout``, ``sized_frames``,
    ``_pixels``, ``_encode``, ``_video_outputs`` and ``parts``; Qwen models add position inputs
    through ``_forward_kwargs``."""

    model_class: ClassVar[str]  # transformers class of the family
    # the projector is the encoder's last step (tower_features + project): a frozen tower's output can
    # be kept while the projector trains
    splits_projector: ClassVar[bool] = False
    uses_frame_times: ClassVar[bool] = False  # Qwen models encode when each frame was taken
    inline_video: ClassVar[str] = "{video}\n{question}"  # user turn when the chat template takes plain text only
    # Used only when neither the tokenizer nor the checkpoint has a chat template. Video-LLaVA and
    # LLaVA-NeXT-Video 7B are Vicuna-style ("USER: <video>\nQ ASSISTANT:"); Qwen adapters use ChatML.
    fallback_template: ClassVar[str] = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: "
        "{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")

    def __init__(self, model, tokenizer, spec, name: str, *, config=None, path: Path | None = None,
                 max_tokens: int | None = None, processor: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.name = name
        self.config = config if config is not None else model.config
        self.path = path
        self.max_tokens = max_tokens or self.config.get_text_config().max_position_embeddings
        self.video_token_id = self.config.video_token_id
        self.processor = processor
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.chat_template is None:
            tokenizer.chat_template = checkpoint_chat_template(path) or self.fallback_template

    @classmethod
    def read_spec(cls, path: Path, config):
        """The checkpoint's preprocessing settings (``capdpo_video.json``, else its processor config)."""
        raise NotImplementedError

    def with_model(self, model, name: str) -> VideoPolicy:
        """The same adapter around another copy of the model (e.g. the frozen DPO reference)."""
        return type(self)(model, self.tokenizer, self.spec, name, config=self.config, path=self.path,
                          max_tokens=self.max_tokens, processor=self.processor)

    def save(self, out_dir: str | Path) -> None:
        """A checkpoint ``load`` reads back: weights, tokenizer (with its chat template) and spec."""
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.spec.save(out_dir)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def parts(self) -> ModelParts:
        raise NotImplementedError

    def vision_module(self) -> torch.nn.Module:
        """The vision encoder, e.g. to count its calls with a forward hook."""
        return self.model.get_submodule(self.parts.vision[0])

    # -- frames -> pixels -----------------------------------------------------------------------
    def layout(self, num_frames: int, height: int, width: int, *, frame_times: Sequence[float] | None = None,
               seconds_per_frame: float | None = None, max_pixels: int | None = None) -> VideoLayout:
        """Tokens and input size of ``num_frames`` frames of ``height`` x ``width``, before any model runs.
        ``max_pixels`` caps a dynamic-resolution (Qwen) frame's area; fixed-resolution families
        accept only their own size."""
        raise NotImplementedError

    def reductions(self, num_frames: int, height: int, width: int, max_pixels: int | None = None) -> Iterator[tuple[int, int | None]]:
        """``(frames, max_pixels)`` settings from the configured one to the cheapest, in the order the
        frame budget's "reduce" mode tries them. Fixed-resolution families can only drop frames."""
        for k in range(num_frames, 0, -1):
            yield k, max_pixels

    def visual_tokens(self, num_frames: int, height: int, width: int) -> int:
        return self.layout(num_frames, height, width).n_visual

    def preprocess(self, frames: Sequence[Image.Image], layout: VideoLayout | None = None) -> VideoInputs:
        """The family's pixel tensors for ``frames`` (sampled already). Uses the checkpoint's own
        transformers video processor when ``processor`` allows it and torchvision is importable."""
        frames = [f.convert("RGB") for f in frames]
        if layout is None:
            layout = self.layout(len(frames), frames[0].height, frames[0].width)
        if len(frames) != layout.num_frames:
            raise ValueError(f"{len(frames)} frames for a layout of {layout.num_frames}")
        hf = self.hf_video_processor()
        pixels = self._hf_pixels(hf, frames, layout) if hf is not None else self._pixels(frames, layout)
        return VideoInputs(pixels, layout)

    def sized_frames(self, frames: Sequence[Image.Image], layout: VideoLayout) -> list[Image.Image]:
        """RGB frames at the size the model sees (what the vLLM backend hands to vLLM's processor)."""
        raise NotImplementedError

    def _pixels(self, frames: list[Image.Image], layout: VideoLayout) -> torch.Tensor:
        raise NotImplementedError

    def _hf_pixels(self, processor, frames: list[Image.Image], layout: VideoLayout) -> torch.Tensor:
        import numpy as np

        out = processor(videos=[np.stack([np.asarray(f) for f in frames])], return_tensors="pt", do_sample_frames=False,
                        **self._hf_processor_kwargs(layout))
        return out["pixel_values_videos"][0]

    def _hf_processor_kwargs(self, layout: VideoLayout) -> dict:
        return {}

    def hf_video_processor(self):
        """The checkpoint's transformers video processor, or None: ``processor='capdpo'``, no
        torchvision (transformers' video processors need it), or no processor config."""
        if self.processor == "capdpo" or self.path is None or not read_processor_config(self.path):
            return None
        if not hasattr(self, "_hf_processor"):
            try:
                import torchvision  # noqa: F401
                from transformers import AutoVideoProcessor

                self._hf_processor = AutoVideoProcessor.from_pretrained(self.path)
            except (ImportError, OSError, ValueError):  # auto: capdpo's own preprocessing instead
                if self.processor == "hf":
                    raise
                self._hf_processor = None
        return self._hf_processor

    # -- pixels -> embeddings --------------------------------------------------------------------
    def encode(self, inputs: VideoInputs) -> EncodedVideo:
        """Vision tower + projector on one video. Runs with autograd when the caller allows it
        (SFT trains the projector through it)."""
        return self._encode(inputs.pixel_values.to(self.device, self.model.dtype), inputs.layout)

    def _encode(self, pixels: torch.Tensor, layout: VideoLayout) -> EncodedVideo:
        raise NotImplementedError

    def tower_features(self, inputs: VideoInputs) -> TowerFeatures:
        """The vision tower's output for one video, which ``project`` turns into what ``encode``
        returns (families with ``splits_projector``)."""
        raise NotImplementedError(f"{type(self).__name__} does not split its encoder at the projector")

    def project(self, features: TowerFeatures) -> EncodedVideo:
        """The projector on a video's tower features, with autograd when the caller allows it:
        ``project(tower_features(x))`` is ``encode(x)``."""
        raise NotImplementedError(f"{type(self).__name__} does not split its encoder at the projector")

    def embeddings(self, video: EncodedVideo | TowerFeatures | VideoInputs) -> EncodedVideo:
        """A video's embeddings, with autograd where the caller allows it: as they are, the
        projector on tower features, or the whole encoder on pixels."""
        if isinstance(video, EncodedVideo):
            return video
        return self.project(video) if isinstance(video, TowerFeatures) else self.encode(video)

    def _video_outputs(self, videos: Sequence[EncodedVideo]):
        """``mm_encoder_outputs["video"]`` for a batch with one video per row, in the model's format."""
        raise NotImplementedError

    def _forward_kwargs(self, ids: torch.Tensor, videos: Sequence[EncodedVideo]) -> dict:
        """Extra forward inputs (Qwen: token types, grids, temporal spacing for multimodal RoPE)."""
        return {}

    def _position_ids(self, ids: torch.Tensor, attention_mask: torch.Tensor, videos: Sequence[EncodedVideo]) -> torch.Tensor:
        """Rotary position ids the model would give right-padded rows itself, sequence dimension
        last: ``(rows, length)`` 0, 1, 2, ... for a 1D RoPE LLM (Qwen's multimodal RoPE overrides)."""
        return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    # -- text ---------------------------------------------------------------------------------------
    @property
    def video_placeholder(self) -> str:
        """What the chat template writes for a video, before expansion to the video's tokens."""
        return self.tokenizer.convert_ids_to_tokens(self.video_token_id)

    def prompt_text(self, question: str | ChatPrompt) -> str:
        """The chat-formatted user turn with one unexpanded video placeholder (vLLM's prompt format);
        a :class:`~capdpo.prompts.ChatPrompt` adds its system turn before it and its prefill after
        the generation prompt.

        A multimodal chat template renders ``{"type": "video"}`` content itself; a text-only one gets
        the family's inline form (``<video>\\n{question}`` for LLaVA models)."""
        prompt = question if isinstance(question, ChatPrompt) else ChatPrompt(question)
        system = [{"role": "system", "content": prompt.system}] if prompt.system is not None else []
        tried = ([{"type": "video"}, {"type": "text", "text": prompt.text}],
                 self.inline_video.format(video=self.video_placeholder, question=prompt.text))
        for content in tried:
            try:
                text = self.tokenizer.apply_chat_template([*system, {"role": "user", "content": content}], tokenize=False,
                                                          add_generation_prompt=True)
            except (TypeError, TemplateError):  # a text-only template may choke on list content; the inline form follows
                continue
            if text.count(self.video_placeholder) == 1:
                return text + prompt.prefill
        raise ValueError(f"{self.name}: the chat template does not render the video placeholder {self.video_placeholder!r}")

    def video_text(self, layout: VideoLayout) -> str:
        """The placeholder expanded to one token per visual embedding (and any markers around them)."""
        return self.video_placeholder * layout.n_visual

    def prompt_ids(self, question: str | ChatPrompt, layout: VideoLayout) -> list[int]:
        """Token ids of the chat-formatted question with the video expanded for ``layout``."""
        text = self.prompt_text(question).replace(self.video_placeholder, self.video_text(layout), 1)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.video_token_id) != layout.n_visual:
            raise ValueError(f"{self.name}: prompt holds {ids.count(self.video_token_id)} video tokens, expected {layout.n_visual}")
        return ids

    def response_ids(self, response: str, max_tokens: int | None = None) -> list[int]:
        """Response tokens ending with the end-of-turn token (kept even when the text is cut)."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if max_tokens is not None:
            ids = ids[: max_tokens - 1]
        return ids + [self.tokenizer.eos_token_id]

    # -- token budget ------------------------------------------------------------------------------
    def tokens_needed(self, layout: VideoLayout, prompts: Sequence[str | ChatPrompt], new_tokens: int) -> int:
        """Longest prompt (visual tokens included) plus ``new_tokens`` answer tokens."""
        return max((len(self.prompt_ids(p, layout)) for p in prompts), default=self.video_tokens(layout)) + new_tokens

    def video_tokens(self, layout: VideoLayout) -> int:
        return len(self.tokenizer(self.video_text(layout), add_special_tokens=False)["input_ids"])

    def check_budget(self, layout: VideoLayout, prompts: Sequence[str | ChatPrompt], new_tokens: int, item: str) -> None:
        need = self.tokens_needed(layout, prompts, new_tokens)
        if need > self.max_tokens:
            raise OverBudgetError(
                f"{item}: {need} tokens ({layout.n_visual} visual for {layout.num_frames} frames at {layout.height}x{layout.width}, "
                f"the longest question and {new_tokens} answer tokens) exceed the policy's budget of {self.max_tokens} "
                "(policy.max_tokens); use fewer frames or set frames.on_over_budget=reduce")

    # -- generation --------------------------------------------------------------------------------
    def generate(self, video: EncodedVideo, question: str, *, n: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, max_new_tokens: int = 64, seed: int | None = None) -> list[str]:
        """``n`` answers to one question about one encoded video, as one batch of ``n`` rows that
        share the video's embeddings (the video is not encoded again)."""
        [answers] = self.generate_batch([(video, question)], n=n, temperature=temperature, top_p=top_p,
                                        max_new_tokens=max_new_tokens, seeds=None if seed is None else [seed])
        return answers

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[tuple[EncodedVideo, str | ChatPrompt]], *, n: int = 1, temperature: float = 0.0,
                       top_p: float = 1.0, max_new_tokens: int = 64, seeds: Sequence[int] | None = None) -> list[list[str]]:
        """``generate_ids``' answers as text."""
        groups = self.generate_ids(requests, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seeds=seeds)
        return [[self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in group] for group in groups]

    def generate_ids(self, requests: Sequence[tuple[EncodedVideo, str | ChatPrompt]], *, n: int = 1, temperature: float = 0.0,
                     top_p: float = 1.0, max_new_tokens: int = 64, seeds: Sequence[int] | None = None,
                     synced_gpus: bool = False) -> list[list[list[int]]]:
        """The token ids of ``n`` answers to each ``(video, question)`` request (ending with the
        end-of-turn token unless cut at ``max_new_tokens``), all in one ``generate`` call of
        ``len(requests) * n`` left-padded rows (each video's embeddings shared by its rows).
        ``synced_gpus``: go on with forward passes until every process is done (a sharded model).

        Sampling (``temperature`` > 0) draws each row's tokens from its own generator, seeded by the
        request's seed and the row's index, so an answer depends on its own seed only, never on the
        other requests batched with it: a resumed or re-batched run samples the same answers."""
        prompts = [self.prompt_ids(question, video.layout) for video, question in requests]
        videos = [video for video, _ in requests]
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        if temperature > 0:
            row_seeds = [None] * (len(requests) * n) if seeds is None else [seed * 1_000_003 + k for seed in seeds for k in range(n)]
            sampling = {"do_sample": False, "logits_processor": LogitsProcessorList([RowSampler(row_seeds, temperature, top_p)])}
        else:
            sampling = {"do_sample": False}
        sampling["synced_gpus"] = synced_gpus
        if n == 1:
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      mm_encoder_outputs={"video": self._video_outputs(videos)}, pad_token_id=pad,
                                      **self._forward_kwargs(ids, videos), **sampling)
        else:
            # The prompt (video tokens included) runs once per request; its key/value cache is copied to the
            # request's n rows, which generate then continues from the prompt's last token.
            cache = self._prompt_cache(ids[:, :-1], mask[:, :-1], videos)
            cache.batch_repeat_interleave(n)
            self._repeat_generation_state(n)
            out = self.model.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                                      max_new_tokens=max_new_tokens, pad_token_id=pad, **{CACHE_KWARG: cache}, **sampling)
        eos = self.tokenizer.eos_token_id
        answers = []
        for row in out[:, width:].tolist():  # up to and with the first end-of-turn; the rest is padding
            if eos in row:
                row = row[: row.index(eos) + 1]
            else:
                while row and row[-1] == pad:  # stopped by another stop token, padded after it
                    row.pop()
            answers.append(row)
        return [answers[i * n:(i + 1) * n] for i in range(len(requests))]

    def _prompt_cache(self, ids: torch.Tensor, mask: torch.Tensor, videos: Sequence[EncodedVideo]):
        """The key/value cache of left-padded prompt rows, each with its video."""
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, position_ids=self._left_padded_positions(mask),
                         mm_encoder_outputs={"video": self._video_outputs(videos)}, **self._forward_kwargs(ids, videos))
        return getattr(out, CACHE_KWARG)

    def _left_padded_positions(self, mask: torch.Tensor) -> torch.Tensor | None:
        """Position ids of left-padded rows, as ``generate`` gives them (Qwen computes its own multimodal ones)."""
        return (mask.cumsum(-1) - 1).clamp(min=0)

    def _repeat_generation_state(self, n: int) -> None:
        """Per-row state the model keeps between generation steps, repeated for ``n`` rows a prompt
        (Qwen: the multimodal RoPE offsets)."""

    # -- log-probs -----------------------------------------------------------------------------------
    def token_logps(self, videos: Sequence[EncodedVideo], prompts: list[list[int]], responses: list[list[int]]) -> list[torch.Tensor]:
        """Per-token log-prob of each response given its prompt and video (one tensor per row)."""
        flat, row = self._response_logps(videos, prompts, responses)
        return [flat[row == i] for i in range(len(prompts))]

    def sequence_logps(self, videos: Sequence[EncodedVideo], prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-prob of each response given its prompt and video, and its token count."""
        flat, row = self._response_logps(videos, prompts, responses)
        sums = torch.zeros(len(prompts), device=flat.device, dtype=flat.dtype).index_add(0, row, flat)
        return sums, torch.bincount(row, minlength=len(prompts))

    @property
    def shares_prompt_prefix(self) -> bool:
        """Whether ``pair_logps`` runs a pair's two answers behind one shared prompt in a single row.
        It needs an attention implementation that takes a custom 4D mask, and no sliding-window
        layers (the tree mask would override their window)."""
        text = self.model.config.get_text_config()
        return text._attn_implementation in TREE_MASK_ATTENTION and "sliding_attention" not in (getattr(text, "layer_types", None) or ())

    def pair_logps(self, videos: Sequence[EncodedVideo], prompts: list[list[int]], chosen: list[list[int]],
                   rejected: list[list[int]]) -> PairLogprobs:
        """Summed log-probs and token counts of ``chosen[i]`` and ``rejected[i]`` given ``prompts[i]``
        and ``videos[i]``: the numbers of ``sequence_logps(videos + videos, prompts + prompts,
        chosen + rejected)``, with the prompt (video tokens included) run once for both answers:
        each pair is a pair of branches behind a tree-shaped mask (``capdpo.policy.packing``), and
        the pairs given the same ``EncodedVideo`` object share one row, its video run once. Without
        a 4D-mask attention (``shares_prompt_prefix`` false) it runs two rows per pair."""
        n = len(prompts)
        text = self.model.config.get_text_config()
        if not self.shares_prompt_prefix:
            log_once(f"{self.name}: pair log-probs run chosen and rejected as two rows (attention "
                     f"{text._attn_implementation!r} takes no custom 4D mask, or sliding-window layers)")
            logps, counts = self.sequence_logps([*videos, *videos], prompts + prompts, chosen + rejected)
            return PairLogprobs(logps[:n], logps[n:], counts[:n], counts[n:])
        # the pairs of one video (the same EncodedVideo) share one row: the video's tokens and the
        # prompts' common start run once, each pair's answers (after the rest of its question) behind them
        groups: dict[int, list[int]] = {}
        for i, video in enumerate(videos):
            groups.setdefault(id(video), []).append(i)
        rows = [behind_shared_prefix([prompts[i] for i in members], [[chosen[i], rejected[i]] for i in members])
                for members in groups.values()]
        order = [i for members in groups.values() for i in members]
        logps, counts = self.branch_logps([videos[members[0]] for members in groups.values()], rows)
        slot = torch.empty(n, dtype=torch.long, device=logps.device)
        slot[torch.tensor(order, device=logps.device)] = torch.arange(n, device=logps.device)  # pair i's branches: 2 slot[i], +1
        return PairLogprobs(logps[2 * slot], logps[2 * slot + 1], counts[2 * slot], counts[2 * slot + 1])

    def branch_logps(self, videos: Sequence[EncodedVideo], rows: Sequence[tuple[list[int], Sequence[Branch]]]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs and counts of every branch's scored tokens, numbered in order over all
        rows: row i is ``rows[i]``'s prefix (holding ``videos[i]``'s tokens) run once, each of its
        branches behind it (``capdpo.policy.packing.pack_branches``, tree attention mask). Needs
        ``shares_prompt_prefix``."""
        flat, slot = self.branch_token_logps(videos, rows)
        branches = sum(len(b) for _, b in rows)
        sums = torch.zeros(branches, device=flat.device, dtype=flat.dtype).index_add(0, slot, flat)
        return sums, torch.bincount(slot, minlength=branches)

    def branch_token_logps(self, videos: Sequence[EncodedVideo], rows: Sequence[tuple[list[int], Sequence[Branch]]]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``branch_logps`` token by token: each scored token's log-prob, branch after branch in
        order, and its branch's number (what GRPO's per-token ratios need)."""
        text = self.model.config.get_text_config()
        packed = pack_branches(rows, self.tokenizer.pad_token_id, self.device)
        natural = self._position_ids(packed.ids, packed.real, videos)
        hidden = self.model.model(input_ids=packed.ids, use_cache=False,
                                  attention_mask=tree_mask(packed.segment, text._attn_implementation, self.model.dtype),
                                  position_ids=natural.gather(-1, packed.source.expand_as(natural)),
                                  mm_encoder_outputs={"video": self._video_outputs(videos)},
                                  **self._forward_kwargs(packed.ids, videos)).last_hidden_state
        return self._logps_at(hidden, packed.row, packed.position, packed.target), packed.slot

    def _logps_at(self, hidden: torch.Tensor, row: torch.Tensor, position: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Log-prob of each ``target`` under the hidden state at (``row``, ``position``). Only these
        states go through the vocabulary projection, not the thousands of visual tokens."""
        logits = self.model.lm_head(hidden[row, position]).float()
        return logits.log_softmax(-1).gather(1, target.unsqueeze(1)).squeeze(1)

    def _response_logps(self, videos, prompts, responses) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of all response tokens, flat, with each token's row index.

        Rows are right-padded; positions past a row's end are masked out, so a row's result does
        not depend on what it is batched with."""
        rows = [p + r for p, r in zip(prompts, responses)]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        # hidden state t predicts token t+1: keep the positions that predict a response token, so
        # the vocabulary projection runs on answers only, not on thousands of visual tokens
        predicts = torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            predicts[i, len(p) - 1 : len(p) + len(r) - 1] = True
        hidden = self.model.model(input_ids=ids, attention_mask=attn, use_cache=False,
                                  mm_encoder_outputs={"video": self._video_outputs(videos)},
                                  **self._forward_kwargs(ids, videos)).last_hidden_state
        row, position = predicts.nonzero(as_tuple=True)
        return self._logps_at(hidden, row, position, ids[row, position + 1]), row


@functools.cache
def log_once(message: str) -> None:
    logger.info(message)


def checkpoint_chat_template(path: Path | None) -> str | None:
    """A chat template shipped with the checkpoint's processor (llava-hf and Qwen repos keep it
    there rather than in the tokenizer)."""
    if path is None:
        return None
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").exists():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


def spec_from_dict(cls, data: dict):
    """A spec dataclass from a JSON dict, ignoring keys it does not have (older or foreign files)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})

