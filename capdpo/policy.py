"""The video LMM behind ``sample``, ``train`` and ``evaluate``.

A ``VideoPolicy`` wraps a LLaVA-family checkpoint (``LlavaNextVideoForConditionalGeneration``: the
built-in mini model and LLaVA-NeXT-Video) with the few operations the pipeline needs:

    pixels = policy.pixel_values(frames)            # frames -> normalised tensor
    video = policy.video_embeds(pixels)             # vision tower + pooling + projector, once per video
    answers = policy.generate(video, question, n=4, temperature=1.0, top_p=0.95, seed=7)
    logps = policy.sequence_logps(videos, prompts, responses)   # summed response log-probs

The video is encoded once and its embeddings are scattered into the placeholder positions of
every sequence that uses it, so N samples, or a chosen and a rejected answer, never re-encode it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capdpo.config import BUILTIN_POLICY
from capdpo.frames import resize_center_crop
from capdpo.llm import resolve_device

VIDEO_TOKEN = "<video>"
SPEC_FILE = "capdpo_video.json"


@dataclass(frozen=True)
class VisionSpec:
    """How frames become pixels for this checkpoint; saved beside it as ``capdpo_video.json``."""

    image_size: int = 224
    num_frames: int = 8
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, the paper's setting
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def save(self, model_dir: str | Path) -> None:
        (Path(model_dir) / SPEC_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, model_dir: str | Path) -> VisionSpec:
        path = Path(model_dir) / SPEC_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else cls()


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class VideoPolicy:
    def __init__(self, model, tokenizer, spec: VisionSpec, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.name = name
        self.video_token_id = model.config.video_token_id
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def load(cls, model: str, cache_dir: str | Path, device: str = "auto", dtype: str = "auto") -> VideoPolicy:
        from transformers import AutoTokenizer, LlavaNextVideoForConditionalGeneration

        if model == BUILTIN_POLICY:
            from capdpo.models.mini import mini_model_dir

            path = mini_model_dir(Path(cache_dir))
        else:
            path = Path(model)
        dev = resolve_device(device)
        net = LlavaNextVideoForConditionalGeneration.from_pretrained(path, dtype=pick_dtype(dtype, dev)).to(dev).eval()
        return cls(net, AutoTokenizer.from_pretrained(path), VisionSpec.load(path), model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inputs -------------------------------------------------------------------------------
    def pixel_values(self, frames: list[Image.Image]) -> torch.Tensor:
        """``(T, 3, S, S)`` float tensor: short side resized, centre-cropped, normalised."""
        arrays = [np.asarray(resize_center_crop(f.convert("RGB"), self.spec.image_size), dtype=np.float32) / 255.0 for f in frames]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def video_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, n_visual, hidden)`` LLM-space embeddings of ``(B, T, 3, S, S)`` videos."""
        pixel_values = pixel_values.to(self.device, self.model.dtype)
        return self.model.model.get_video_features(pixel_values_videos=pixel_values).pooler_output

    def prompt_ids(self, question: str, n_visual: int) -> list[int]:
        """Chat-formatted ``<video>\\n{question}`` with the placeholder expanded to ``n_visual`` ids."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": f"{VIDEO_TOKEN}\n{question}"}],
                                                  tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        at = ids.index(self.video_token_id)
        return ids[:at] + [self.video_token_id] * n_visual + ids[at + 1 :]

    def response_ids(self, response: str, max_tokens: int | None = None) -> list[int]:
        """Response tokens ending with the end-of-turn token (kept even when the text is cut)."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if max_tokens is not None:
            ids = ids[: max_tokens - 1]
        return ids + [self.tokenizer.eos_token_id]

    def embed(self, input_ids: torch.Tensor, video_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each row's video placeholders replaced by that row's video."""
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = (input_ids == self.video_token_id).unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, video_embeds.to(embeds.dtype))

    # -- generation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, video: torch.Tensor, question: str, *, n: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, max_new_tokens: int = 64, seed: int | None = None) -> list[str]:
        """``n`` answers to one question about one encoded video (``(n_visual, hidden)``).
        The prompt is embedded once; generate expands it to ``n`` rows."""
        ids = torch.tensor([self.prompt_ids(question, video.shape[0])], device=self.device)
        embeds = self.embed(ids, video.unsqueeze(0))
        if seed is not None:
            torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  num_return_sequences=n, pad_token_id=self.tokenizer.pad_token_id, **sampling)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]

    # -- log-probs ----------------------------------------------------------------------------
    def sequence_logps(self, videos: torch.Tensor, prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-prob of each response given its prompt and video, and its token count.

        Rows are right-padded; positions past a row's end are masked out, so a row's result does
        not depend on what it is batched with.
        """
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
        hidden = self.model.model(inputs_embeds=self.embed(ids, videos), attention_mask=attn).last_hidden_state
        logits = self.model.lm_head(hidden[predicts]).float()
        targets = ids[:, 1:][predicts[:, :-1]]
        token_logps = logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        row = torch.arange(len(rows), device=self.device).unsqueeze(1).expand_as(predicts)[predicts]
        sums = torch.zeros(len(rows), device=self.device).index_add(0, row, token_logps)
        return sums, predicts.sum(-1)
