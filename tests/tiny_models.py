"""The tests' tiny random video LMM, a plain module so that benchmarks can build it too (a benchmark
cannot import conftest): ``tests/conftest.py``'s ``tiny_policy_dir`` and ``benchmarks/ray_throughput.py``."""

from __future__ import annotations

from pathlib import Path


def save_tiny_policy(out: Path, tokenizer_dir: Path) -> Path:
    """A randomly initialised LLaVA-NeXT-Video (tiny DINOv2 + tiny Llama) with the tokenizer in
    ``tokenizer_dir`` (SmolLM2's), saved in ``out``: the same classes and code path as the built-in
    model, in a few MB."""
    import torch
    from transformers import (
        AutoTokenizer,
        Dinov2Config,
        LlamaConfig,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
    )

    from capdpo.policy.base import VIDEO_TOKEN, VisionSpec

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN, "<image>"]})
    torch.manual_seed(0)
    config = LlavaNextVideoConfig(
        vision_config=Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   patch_size=14, image_size=56),
        text_config=LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        video_token_index=tok.convert_tokens_to_ids(VIDEO_TOKEN), image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1, spatial_pool_stride=2,
        image_grid_pinpoints=[[56, 56]],
    )
    LlavaNextVideoForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    VisionSpec(image_size=56, num_frames=4).save(out)
    return out
