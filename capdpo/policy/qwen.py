"""Dynamic-resolution Qwen adapters: Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Frames are resized to multiples of ``patch * merge`` within a pixel budget (``smart_resize``),
normalised, padded to a multiple of ``temporal_patch_size`` frames by repeating the last one and
flattened into ``(t * h * w, 3 * temporal_patch * patch * patch)`` patches in the order of
transformers' Qwen video processors. A video costs ``t * h * w / merge^2`` tokens:

    Qwen2-VL / 2.5-VL  <|vision_start|> <|video_pad|> x n <|vision_end|>
    Qwen3-VL           per temporal patch: "<1.5 seconds>" <|vision_start|> <|video_pad|> x n/t <|vision_end|>

Positions are multimodal RoPE ids that the model computes itself (``get_rope_index``) from the
token types, ``video_grid_thw`` and, for Qwen2.5-VL, the seconds per temporal patch. ``pair_logps``
computes them the same way for its packed rows and lets the rejected answer reuse the chosen one's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from capdpo.policy.base import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_FPS,
    SPEC_FILE,
    EncodedVideo,
    ModelParts,
    VideoLayout,
    VideoPolicy,
    read_processor_config,
    spec_from_dict,
)
from capdpo.policy.llava import CHATML, normalise


@dataclass(frozen=True)
class QwenSpec:
    """Video preprocessing of a Qwen checkpoint (defaults: transformers' Qwen2-VL video processor).
    Qwen2-VL caps each frame's area at ``max_pixels``; Qwen3-VL caps the whole clip's (t * h * w)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def save(self, model_dir: str | Path) -> None:
        (Path(model_dir) / SPEC_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, model_dir: Path, default: QwenSpec) -> QwenSpec:
        """capdpo's own file, else the checkpoint's video (or image) processor config over ``default``.
        Pixel limits come from a video processor config only: an image config's are for images."""
        if (model_dir / SPEC_FILE).exists():
            return spec_from_dict(cls, json.loads((model_dir / SPEC_FILE).read_text()))
        hf = read_processor_config(model_dir)
        video = (model_dir / "video_preprocessor_config.json").exists()
        size = hf.get("size") or {}
        return cls(
            patch_size=hf.get("patch_size", default.patch_size),
            temporal_patch_size=hf.get("temporal_patch_size", default.temporal_patch_size),
            merge_size=hf.get("merge_size", default.merge_size),
            min_pixels=(hf.get("min_pixels") or size.get("shortest_edge")) if video else default.min_pixels,
            max_pixels=(hf.get("max_pixels") or size.get("longest_edge")) if video else default.max_pixels,
            mean=tuple(hf.get("image_mean", default.mean)),
            std=tuple(hf.get("image_std", default.std)),
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's per-frame size: multiples of ``factor``, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible (transformers' ``smart_resize``)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's frame size: as ``smart_resize`` but the budget covers all frames (t * h * w)."""
    if num_frames < temporal_factor:
        raise ValueError(f"Qwen3-VL needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def patchify(x: torch.Tensor, patch: int, temporal_patch: int, merge: int) -> torch.Tensor:
    """``(T, C, H, W)`` frames -> ``(t * h * w, C * temporal_patch * patch^2)`` patches, merge
    windows contiguous (the layout of transformers' Qwen video processors)."""
    if pad := -x.shape[0] % temporal_patch:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = x.shape[0] // temporal_patch, x.shape[1], x.shape[2] // patch, x.shape[3] // patch
    x = x.reshape(t, temporal_patch, c, h // merge, merge, patch, w // merge, merge, patch)
    return x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, c * temporal_patch * patch * patch)


class QwenVLPolicy(VideoPolicy):
    """Qwen2-VL; Qwen2.5-VL and Qwen3-VL differ in a few hooks below."""

    model_class = "Qwen2VLForConditionalGeneration"
    uses_frame_times = True
    default_spec = QwenSpec()
    inline_video = "{video}{question}"  # Qwen's templates put the text right after the vision block
    fallback_template = CHATML

    @classmethod
    def read_spec(cls, path, config) -> QwenSpec:
        return QwenSpec.load(Path(path), cls.default_spec)

    @property
    def parts(self) -> ModelParts:
        return ModelParts(vision=("model.visual",), projector=("model.visual.merger",))

    # -- layout and pixels -------------------------------------------------------------------------
    def frame_size(self, num_frames: int, height: int, width: int, max_pixels: int) -> tuple[int, int]:
        s = self.spec
        return smart_resize(height, width, s.patch_size * s.merge_size, s.min_pixels, max_pixels)

    def layout(self, num_frames, height, width, *, frame_times=None, seconds_per_frame=None, max_pixels=None) -> VideoLayout:
        s = self.spec
        max_pixels = min(max_pixels or s.max_pixels, s.max_pixels)
        h, w = self.frame_size(num_frames, height, width, max_pixels)
        grid = (-(-num_frames // s.temporal_patch_size), h // s.patch_size, w // s.patch_size)
        step = seconds_per_frame if seconds_per_frame is not None else 1 / DEFAULT_FPS
        times = tuple(frame_times) if frame_times is not None else tuple(i * step for i in range(num_frames))
        return VideoLayout(num_frames, h, w, grid[0] * grid[1] * grid[2] // s.merge_size**2, frame_times=times,
                           seconds_per_frame=step, grid_thw=grid, max_pixels=max_pixels)

    def reductions(self, num_frames: int, height: int, width: int, max_pixels: int | None = None) -> Iterator[tuple[int, int | None]]:
        """Lower resolution first (as qwen-vl-utils fits a video into its pixel budget), down to
        ``min_pixels``; then fewer frames at that resolution, down to one temporal patch."""
        yield num_frames, max_pixels
        pixels = self.budget_area(self.layout(num_frames, height, width, max_pixels=max_pixels))
        while (pixels := pixels // 2) >= self.spec.min_pixels:
            yield num_frames, pixels
        for k in range(num_frames - 1, self.spec.temporal_patch_size - 1, -1):
            yield k, self.spec.min_pixels

    def budget_area(self, layout: VideoLayout) -> int:
        """The area ``max_pixels`` is compared with: one frame (Qwen2-VL, Qwen2.5-VL)."""
        return layout.height * layout.width

    def sized_frames(self, frames, layout: VideoLayout) -> list[Image.Image]:
        return [f.resize((layout.width, layout.height), Image.Resampling.BICUBIC) for f in frames]

    def _pixels(self, frames: list[Image.Image], layout: VideoLayout) -> torch.Tensor:
        s = self.spec
        return patchify(normalise(self.sized_frames(frames, layout), s.mean, s.std), s.patch_size, s.temporal_patch_size,
                        s.merge_size)

    def _hf_processor_kwargs(self, layout: VideoLayout) -> dict:
        # the exact pixel limits this layout was planned with; no extra per-frame cap
        return {"size": {"shortest_edge": self.spec.min_pixels, "longest_edge": layout.max_pixels}, "cap_pixels_per_frame": False}

    def _hf_pixels(self, processor, frames, layout: VideoLayout) -> torch.Tensor:
        import numpy as np

        out = processor(videos=[np.stack([np.asarray(f) for f in frames])], return_tensors="pt", do_sample_frames=False,
                        **self._hf_processor_kwargs(layout))
        if tuple(out["video_grid_thw"][0].tolist()) != layout.grid_thw:
            raise ValueError(f"{self.name}: transformers' processor made grid {out['video_grid_thw'][0].tolist()}, "
                             f"capdpo planned {layout.grid_thw}")
        return out["pixel_values_videos"]

    # -- text -------------------------------------------------------------------------------------------
    @property
    def video_placeholder(self) -> str:
        start, pad, end = self.tokenizer.convert_ids_to_tokens(
            [self.config.vision_start_token_id, self.video_token_id, self.config.vision_end_token_id])
        return start + pad + end

    def video_text(self, layout: VideoLayout) -> str:
        start, pad, end = self.tokenizer.convert_ids_to_tokens(
            [self.config.vision_start_token_id, self.video_token_id, self.config.vision_end_token_id])
        return start + pad * layout.n_visual + end

    # -- model inputs ---------------------------------------------------------------------------------
    def _encode(self, pixels: torch.Tensor, layout: VideoLayout) -> EncodedVideo:
        grid = torch.tensor([layout.grid_thw], device=pixels.device)
        out = self.model.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid)
        return EncodedVideo(layout, out.pooler_output[0])

    def _video_outputs(self, videos: Sequence[EncodedVideo]):
        return BaseModelOutputWithPooling(pooler_output=[v.embeds for v in videos])

    def _forward_kwargs(self, ids: torch.Tensor, videos: Sequence[EncodedVideo]) -> dict:
        return {"mm_token_type_ids": (ids == self.video_token_id).int() * 2,  # 0 text, 2 video
                "video_grid_thw": torch.tensor([v.layout.grid_thw for v in videos], device=ids.device)}

    def _position_ids(self, ids, attention_mask, videos) -> torch.Tensor:
        # (3, rows, length) temporal / height / width ids, from the model's own get_rope_index
        return self.model.model.get_rope_index(ids, attention_mask=attention_mask, **self._forward_kwargs(ids, videos))[0]

    def _left_padded_positions(self, mask: torch.Tensor) -> None:
        return None  # the model's forward computes its multimodal positions (and RoPE offsets) itself

    def _repeat_generation_state(self, n: int) -> None:
        self.model.model.rope_deltas = self.model.model.rope_deltas.repeat_interleave(n, 0)


class Qwen25VLPolicy(QwenVLPolicy):
    model_class = "Qwen2_5_VLForConditionalGeneration"

    def _forward_kwargs(self, ids, videos) -> dict:
        # temporal RoPE ids advance tokens_per_second * seconds per temporal patch: absolute time
        seconds = [self.spec.temporal_patch_size * v.layout.seconds_per_frame for v in videos]
        return {**super()._forward_kwargs(ids, videos), "second_per_grid_ts": torch.tensor(seconds, device=ids.device)}


class Qwen3VLPolicy(QwenVLPolicy):
    model_class = "Qwen3VLForConditionalGeneration"
    default_spec = QwenSpec(patch_size=16, min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32,
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    @property
    def parts(self) -> ModelParts:
        return ModelParts(vision=("model.visual",), projector=("model.visual.merger", "model.visual.deepstack_merger_list"))

    def frame_size(self, num_frames, height, width, max_pixels) -> tuple[int, int]:
        s = self.spec
        return smart_resize_video(num_frames, height, width, s.temporal_patch_size, s.patch_size * s.merge_size,
                                  s.min_pixels, max_pixels)

    def budget_area(self, layout: VideoLayout) -> int:
        tp = self.spec.temporal_patch_size
        return round(layout.num_frames / tp) * tp * layout.height * layout.width  # the whole clip

    def timestamps(self, layout: VideoLayout) -> list[float]:
        """Seconds of each temporal patch: the mean of its first and last frame (frames padded like the pixels)."""
        tp = self.spec.temporal_patch_size
        times = list(layout.frame_times) + [layout.frame_times[-1]] * (-len(layout.frame_times) % tp)
        return [(times[i] + times[i + tp - 1]) / 2 for i in range(0, len(times), tp)]

    def video_text(self, layout: VideoLayout) -> str:
        start, pad, end = self.tokenizer.convert_ids_to_tokens(
            [self.config.vision_start_token_id, self.video_token_id, self.config.vision_end_token_id])
        per_patch = layout.n_visual // layout.grid_thw[0]
        return "".join(f"<{t:.1f} seconds>{start}{pad * per_patch}{end}" for t in self.timestamps(layout))

    def _encode(self, pixels: torch.Tensor, layout: VideoLayout) -> EncodedVideo:
        grid = torch.tensor([layout.grid_thw], device=pixels.device)
        out = self.model.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid)
        return EncodedVideo(layout, out.pooler_output[0], tuple(layer[0] for layer in out.deepstack_features))

    def _video_outputs(self, videos: Sequence[EncodedVideo]):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        layers = range(len(videos[0].deepstack))
        return BaseModelOutputWithDeepstackFeatures(pooler_output=[v.embeds for v in videos],
                                                    deepstack_features=[[v.deepstack[j] for v in videos] for j in layers])
