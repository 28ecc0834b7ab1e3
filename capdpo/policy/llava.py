"""Fixed-resolution LLaVA-family adapters: LLaVA-NeXT-Video (and the built-in mini model),
Video-LLaVA and LLaVA-OneVision.

Each frame is resized (short side + centre crop, or squashed for OneVision) to the vision tower's
size and normalised, as the family's transformers video processor does. The ``<video>`` placeholder
expands to a fixed number of tokens per frame:

    LLaVA-NeXT-Video  (S/p // pool)^2 per frame       (CLS dropped, 2x2 average pooling)
    Video-LLaVA       (S/p)^2 + 1 per frame           (CLS kept)
    LLaVA-OneVision   ceil(S/p / 2)^2 per frame + 1   (bilinear 2x downsampling, one newline per video)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from capdpo.policy.base import EncodedVideo, ModelParts, TowerFeatures, VideoInputs, VideoLayout, VideoPolicy, VisionSpec

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def resize_short_side_crop(img: Image.Image, size: int) -> Image.Image:
    """Short side to ``size`` (long side truncated, as transformers computes it), centre ``size`` crop
    (offsets rounded, as torchvision's ``center_crop``)."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = round((nw - size) / 2), round((nh - size) / 2)
    return img.crop((left, top, left + size, top + size))


def normalise(frames: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(T, 3, H, W)`` float tensor of RGB frames: rescaled to [0, 1], then (x - mean) / std."""
    x = torch.from_numpy(np.stack([np.asarray(f, dtype=np.float32) for f in frames]) / 255.0).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class LlavaPolicy(VideoPolicy):
    """Shared by the three LLaVA-family adapters: fixed square frames, one embedding per token."""

    @classmethod
    def read_spec(cls, path, config) -> VisionSpec:
        # no capdpo or processor config: frames at the vision tower's own size, CLIP crop
        return VisionSpec.load(path, default=VisionSpec(image_size=config.vision_config.image_size))

    def tokens_per_frame(self) -> int:
        raise NotImplementedError

    def extra_tokens(self) -> int:
        return 0

    def layout(self, num_frames, height, width, *, frame_times=None, seconds_per_frame=None, max_pixels=None) -> VideoLayout:
        s = self.spec.image_size
        if max_pixels is not None and max_pixels != s * s:
            raise ValueError(f"{self.name} sees fixed {s}x{s} frames; frames.image_size must be None or {s}")
        return VideoLayout(num_frames, s, s, num_frames * self.tokens_per_frame() + self.extra_tokens())

    def sized_frames(self, frames, layout: VideoLayout) -> list[Image.Image]:
        s = self.spec.image_size
        return [resize_short_side_crop(f, s) if self.spec.crop else f.resize((s, s), Image.Resampling.BICUBIC) for f in frames]

    def _pixels(self, frames: list[Image.Image], layout: VideoLayout) -> torch.Tensor:
        return normalise(self.sized_frames(frames, layout), self.spec.mean, self.spec.std)

    def _encode(self, pixels: torch.Tensor, layout: VideoLayout) -> EncodedVideo:
        if self.splits_projector:  # one path: encode is the projector on the tower's output
            return self.project(self._tower_features(pixels, layout))
        features = self.model.model.get_video_features(pixel_values_videos=pixels.unsqueeze(0)).pooler_output
        return EncodedVideo(layout, features.reshape(-1, features.shape[-1]))

    def tower_features(self, inputs: VideoInputs) -> TowerFeatures:
        if not self.splits_projector:
            return super().tower_features(inputs)
        return self._tower_features(inputs.pixel_values.to(self.device, self.model.dtype), inputs.layout)

    def _tower_features(self, pixels: torch.Tensor, layout: VideoLayout) -> TowerFeatures:
        # transformers' own get_video_features up to the projector (layer choice, CLS drop, pooling),
        # its input caught by a hook and the projector's run discarded: a small MLP on a few tokens
        projector, caught = self.model.model.multi_modal_projector, []
        hook = projector.register_forward_pre_hook(lambda module, args: caught.append(args[0]))
        try:
            self.model.model.get_video_features(pixel_values_videos=pixels.unsqueeze(0))
        finally:
            hook.remove()
        return TowerFeatures(layout, caught[0])

    def project(self, features: TowerFeatures) -> EncodedVideo:
        if not self.splits_projector:
            return super().project(features)
        # the projector is the last step of both families' get_video_features: its output rows in
        # order are the video's tokens (frames, then each frame's tokens)
        embeds = self.model.model.multi_modal_projector(features.features.to(self.device, self.model.dtype))
        return EncodedVideo(features.layout, embeds.reshape(-1, embeds.shape[-1]))

    def _video_outputs(self, videos: Sequence[EncodedVideo]) -> BaseModelOutputWithPooling:
        # One (1, N, hidden) tensor for the whole batch: each LLaVA forward flattens it and scatters
        # it into the placeholders in row order, and rows may hold videos of different lengths.
        return BaseModelOutputWithPooling(pooler_output=torch.cat([v.embeds for v in videos]).unsqueeze(0))


class LlavaNextVideoPolicy(LlavaPolicy):
    model_class = "LlavaNextVideoForConditionalGeneration"
    splits_projector = True

    def tokens_per_frame(self) -> int:
        grid = self.spec.image_size // self.config.vision_config.patch_size
        return (grid // self.config.spatial_pool_stride) ** 2

    @property
    def parts(self) -> ModelParts:
        return ModelParts(vision=("model.vision_tower",),
                          projector=("model.multi_modal_projector", "model.vision_resampler", "model.image_newline"))


class VideoLlavaPolicy(LlavaPolicy):
    model_class = "VideoLlavaForConditionalGeneration"
    splits_projector = True

    def tokens_per_frame(self) -> int:
        return (self.spec.image_size // self.config.vision_config.patch_size) ** 2 + 1  # video features keep CLS

    @property
    def parts(self) -> ModelParts:
        return ModelParts(vision=("model.video_tower", "model.image_tower"), projector=("model.multi_modal_projector",))


class OneVisionPolicy(LlavaPolicy):
    model_class = "LlavaOnevisionForConditionalGeneration"
    fallback_template = CHATML

    @classmethod
    def read_spec(cls, path, config) -> VisionSpec:
        # no processor config: transformers' OneVision video processor squashes to the tower's size
        return VisionSpec.load(path, default=VisionSpec(image_size=config.vision_config.image_size, crop=False))

    def tokens_per_frame(self) -> int:
        # the model pools the grid of its config's image size, so frames must be that size
        grid = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return math.ceil(grid / 2) ** 2

    def extra_tokens(self) -> int:
        return 1  # image_newline closes the video

    @property
    def parts(self) -> ModelParts:
        return ModelParts(vision=("model.vision_tower",), projector=("model.multi_modal_projector", "model.image_newline"))
