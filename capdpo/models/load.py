"""Load a video policy: ``builtin:mini``, a local checkpoint or a hub id -> its family's adapter.

    policy = load_policy("Qwen/Qwen2-VL-7B-Instruct", cache_dir, dtype="bfloat16")
    policy = policy_from_config(cfg.policy, cfg.cache_dir)

The adapter (``capdpo.policy``) is picked by the checkpoint's ``config.model_type``.
"""

from __future__ import annotations

from pathlib import Path

from capdpo.config import BUILTIN_POLICY, BUILTIN_START, PolicyConfig
from capdpo.devices import pick_dtype, resolve_device
from capdpo.policy.base import VideoPolicy
from capdpo.policy.llava import LlavaNextVideoPolicy, OneVisionPolicy, VideoLlavaPolicy
from capdpo.policy.qwen import Qwen3VLPolicy, Qwen25VLPolicy, QwenVLPolicy

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


def checkpoint_dir(model: str, cache_dir: str | Path) -> Path:
    """Local folder of a policy: the built-in mini model or its start (built on first use), a path, or a hub id."""
    if model in (BUILTIN_POLICY, BUILTIN_START):
        from capdpo.models.mini import mini_model_dir, mini_start_dir  # built on first use: only when asked for

        return (mini_model_dir if model == BUILTIN_POLICY else mini_start_dir)(Path(cache_dir))
    if Path(model).exists():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))


def load_policy(model: str, cache_dir: str | Path, device: str = "auto", dtype: str = "auto", *,
                attn_implementation: str | None = None, device_map: str | None = None, max_tokens: int | None = None,
                processor: str = "auto", weights: bool = True) -> VideoPolicy:
    """The adapter of ``config.model_type`` around a local checkpoint, hub id or builtin:mini.
    ``weights=False`` loads tokenizer, config and preprocessing only (the vLLM backend runs
    the weights itself)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    path = checkpoint_dir(model, cache_dir)
    config = AutoConfig.from_pretrained(path)
    adapter = adapter_class(config.model_type)
    net = None
    if weights:
        dev = resolve_device(device)
        kwargs = {"dtype": pick_dtype(dtype, dev)}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if device_map:
            kwargs["device_map"] = device_map
        net = getattr(transformers, adapter.model_class).from_pretrained(path, **kwargs)
        net = (net if device_map else net.to(dev)).eval()
    return adapter(net, AutoTokenizer.from_pretrained(path), adapter.read_spec(path, config), model, config=config,
                   path=path, max_tokens=max_tokens, processor=processor)


def policy_from_config(cfg: PolicyConfig, cache_dir: str | Path, **kwargs) -> VideoPolicy:
    """``load_policy`` with the settings of a ``policy`` config section."""
    return load_policy(cfg.model, cache_dir, cfg.device, cfg.dtype, attn_implementation=cfg.attn_implementation,
                       device_map=cfg.device_map, max_tokens=cfg.max_tokens, processor=cfg.processor, **kwargs)
