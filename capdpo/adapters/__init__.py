"""Model adapters: one ``VideoPolicy`` subclass per video LMM family, picked by ``config.model_type``."""

from __future__ import annotations

from capdpo.adapters.llava import LlavaNextVideoPolicy, OneVisionPolicy, VideoLlavaPolicy
from capdpo.adapters.qwen import Qwen3VLPolicy, Qwen25VLPolicy, QwenVLPolicy
from capdpo.policy import VideoPolicy

ADAPTERS: dict[str, type[VideoPolicy]] = {
    "llava_next_video": LlavaNextVideoPolicy,  # also the built-in mini model
    "video_llava": VideoLlavaPolicy,
    "llava_onevision": OneVisionPolicy,
    "qwen2_vl": QwenVLPolicy,
    "qwen2_5_vl": Qwen25VLPolicy,
    "qwen3_vl": Qwen3VLPolicy,
}


def adapter_class(model_type: str) -> type[VideoPolicy]:
    if model_type not in ADAPTERS:
        raise ValueError(f"model_type {model_type!r} is not a supported video LMM family; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[model_type]
