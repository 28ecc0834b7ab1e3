"""One video path for every stage: frames planned within the token budget -> cache -> encoded.

    images, layout = plan_video(policy, video, frames_cfg, prompts, new_tokens)
    encoded = encode_video(policy, video, frames_cfg, prompts, new_tokens)

``plan_video`` decodes the frames and picks the layout (frame count, frame size) that fits the
policy's context for the longest prompt plus the tokens to generate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from capdpo.config import FramesConfig
from capdpo.errors import OverBudgetError
from capdpo.media.frames import count_frames, frame_rate, sample_frames, sample_indices
from capdpo.policy.base import EncodedVideo, VideoLayout, VideoPolicy
from capdpo.records import Video


def plan_video(policy: VideoPolicy, video: Video, frames: FramesConfig, prompts: Sequence[str] = (),
               new_tokens: int = 0) -> tuple[list[Image.Image], VideoLayout]:
    """Frames of ``video`` and the layout they take, within ``policy.max_tokens`` for the longest of
    ``prompts`` plus ``new_tokens``. Over budget: OverBudgetError naming the video, or with
    ``frames.on_over_budget == "reduce"`` the first cheaper setting that fits (lower resolution for
    Qwen, then fewer frames, re-sampled uniformly over the whole clip)."""
    images = sample_frames(video.video, frames.num_frames)
    height, width = images[0].height, images[0].width
    cap = frames.image_size**2 if frames.image_size else None
    item = f"video {video.id} ({video.video})"
    if policy.uses_frame_times:  # when the sampled frames were taken: Qwen models encode it
        total, fps = count_frames(video.video), frame_rate(video.video) or frames.fps
    first_error = None
    for k, max_pixels in policy.reductions(frames.num_frames, height, width, cap):
        timing = {}
        if policy.uses_frame_times:
            timing = {"frame_times": [i / fps for i in sample_indices(total, k)], "seconds_per_frame": total / fps / k}
        layout = policy.layout(k, height, width, max_pixels=max_pixels, **timing)
        try:
            policy.check_budget(layout, prompts, new_tokens, item)
        except OverBudgetError as e:
            if frames.on_over_budget == "error":
                raise
            first_error = first_error or e
            continue
        return (images if k == len(images) else sample_frames(video.video, k)), layout
    raise OverBudgetError(f"{first_error} (still over budget at the fewest frames and lowest resolution)")


def encode_video(policy: VideoPolicy, video: Video, frames: FramesConfig, prompts: Sequence[str] = (),
                 new_tokens: int = 0) -> EncodedVideo:
    """One video encoded within the token budget (raises FrameError / OverBudgetError naming it)."""
    images, layout = plan_video(policy, video, frames, prompts, new_tokens)
    with torch.inference_mode():
        return policy.encode(policy.preprocess(images, layout))
