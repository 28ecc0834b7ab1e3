"""The one video path of every stage: frames planned within the token budget -> embedding cache -> encoded.

    encoder = VideoEncoder(policy, frames_cfg, embed_cache)   # embed_cache: None, or an EmbeddingCache
    images, layout = encoder.plan(video, prompts, new_tokens)  # frames and the layout that fits
    encoded = encoder.encode(video, prompts, new_tokens)      # vision tower + projector (or a cache hit)
    features = encoder.tower(video, prompts, new_tokens)      # the tower's output, for a projector that trains
    inputs = encoder.pixels(video, prompts, new_tokens)       # pixels, for a vision tower that trains

``plan_video`` decodes the frames and picks the layout (frame count, frame size) that fits the
policy's context for the longest prompt plus the tokens to generate. sample, reference, train,
evaluate and the reproduction's SFT all take their videos from here, so a video is planned the
same way wherever it is used, and its embeddings come from the cache wherever one is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from PIL import Image

from capdpo.config import FramesConfig
from capdpo.errors import OverBudgetError
from capdpo.media.frames import count_frames, frame_indices, frame_rate, sample_frames, window_bounds
from capdpo.policy.base import EncodedVideo, TowerFeatures, VideoInputs, VideoLayout, VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.prompts import ChatPrompt
from capdpo.records import Video


class PlannedVideo(NamedTuple):
    """A video's sampled frames and the layout they take in the policy's context."""

    images: list[Image.Image]
    layout: VideoLayout


def plan_video(policy: VideoPolicy, video: Video, frames: FramesConfig, prompts: Sequence[str | ChatPrompt] = (),
               new_tokens: int = 0) -> PlannedVideo:
    """Frames of ``video`` and the layout they take, within ``policy.max_tokens`` for the longest of
    ``prompts`` plus ``new_tokens``. Over budget: OverBudgetError naming the video, or with
    ``frames.on_over_budget == "reduce"`` the first cheaper setting that fits (lower resolution for
    Qwen, then fewer frames, re-sampled uniformly over the whole clip)."""
    images = sample_frames(video.video, frames.num_frames, window=video.window)
    height, width = images[0].height, images[0].width
    cap = frames.image_size**2 if frames.image_size else None
    item = f"video {video.id} ({video.video})"
    if policy.uses_frame_times:  # when the sampled frames were taken: Qwen models encode it
        total, fps = count_frames(video.video), frame_rate(video.video) or frames.fps
        if video.window is not None and video.window.fps:
            fps = video.window.fps
        # the part seen: the whole clip, or the window's frames
        first, last = (0, total - 1) if video.window is None else window_bounds(total, fps, video.window, video.video)
    first_error = None
    for k, max_pixels in policy.reductions(frames.num_frames, height, width, cap):
        timing = {}
        if policy.uses_frame_times:
            timing = {"frame_times": [i / fps for i in frame_indices(total, k, fps, video.window, video.video)],
                      "seconds_per_frame": (last - first + 1) / fps / k}
        layout = policy.layout(k, height, width, max_pixels=max_pixels, **timing)
        try:
            policy.check_budget(layout, prompts, new_tokens, item)
        except OverBudgetError as e:
            if frames.on_over_budget == "error":
                raise
            first_error = first_error or e
            continue
        return PlannedVideo(images if k == len(images) else sample_frames(video.video, k, window=video.window), layout)
    raise OverBudgetError(f"{first_error} (still over budget at the fewest frames and lowest resolution)")


class VideoEncoder:
    """``policy``'s view of a video under the frame settings ``frames``, through ``cache`` when given.

    Every method raises FrameError / OverBudgetError naming the video, as planning does."""

    def __init__(self, policy: VideoPolicy, frames: FramesConfig, cache: EmbeddingCache | None = None):
        self.policy = policy
        self.frames = frames
        self.cache = cache

    def plan(self, video: Video, prompts: Sequence[str | ChatPrompt] = (), new_tokens: int = 0) -> PlannedVideo:
        return plan_video(self.policy, video, self.frames, prompts, new_tokens)

    def pixels(self, video: Video, prompts: Sequence[str | ChatPrompt] = (), new_tokens: int = 0) -> VideoInputs:
        """The video's pixels in the family's input format: what a trained encoder encodes each step."""
        return self.policy.preprocess(*self.plan(video, prompts, new_tokens))

    def encode(self, video: Video, prompts: Sequence[str | ChatPrompt] = (), new_tokens: int = 0) -> EncodedVideo:
        """The video's embeddings on the policy's device, without autograd history (plain tensors,
        not inference-mode ones: a training forward may save them), from the cache when it holds
        them; on a miss, a family that splits its encoder projects cached tower features (a
        trained projector's checkpoint runs no vision tower for videos its base has seen)."""
        images, layout = self.plan(video, prompts, new_tokens)
        if self.cache is not None and (hit := self.cache.get(self.policy, video, layout)) is not None:
            return hit
        with torch.no_grad():
            if self.cache is not None and self.policy.splits_projector:
                encoded = self.policy.project(self._tower(video, images, layout))
            else:
                encoded = self.policy.encode(self.policy.preprocess(images, layout))
        if self.cache is not None:
            self.cache.put(self.policy, video, encoded)
        return encoded

    def tower(self, video: Video, prompts: Sequence[str | ChatPrompt] = (), new_tokens: int = 0) -> TowerFeatures:
        """The video's tower features (``VideoPolicy.tower_features``), without autograd history,
        from the cache when it holds them: what a step whose projector trains starts from."""
        return self._tower(video, *self.plan(video, prompts, new_tokens))

    def _tower(self, video: Video, images, layout: VideoLayout) -> TowerFeatures:
        if self.cache is not None and (hit := self.cache.get_tower(self.policy, video, layout)) is not None:
            return hit
        with torch.no_grad():
            features = self.policy.tower_features(self.policy.preprocess(images, layout))
        if self.cache is not None:
            self.cache.put_tower(self.policy, video, features)
        return features
