"""Every supported video LMM family on a tiny randomly initialised model built from its real
transformers config class, with SmolLM2's tokenizer plus the family's special tokens.

Per family: the adapter is picked from ``config.model_type``; sampling is deterministic with a seed;
N samples run the vision tower once; a response's log-probs are the same alone or in a padded
batch; one DPO step trains the LLM only; over-budget videos raise or shrink.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capdpo.config import TrainConfig
from capdpo.errors import OverBudgetError
from capdpo.losses import sigmoid_dpo
from capdpo.models.load import ADAPTERS, load_policy
from capdpo.policy.base import VideoPolicy
from capdpo.training import set_trainable

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]
# the shape of Qwen2-VL's own template: list content renders the vision block, text follows it
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
# benchmarks/gpu_check.sh runs these on CUDA in bf16; on CPU in fp32 the tolerances are exact ones
DEVICE, DTYPE = os.environ.get("CAPDPO_TEST_DEVICE", "cpu"), os.environ.get("CAPDPO_TEST_DTYPE", "float32")
TOL = {"atol": 1e-5, "rtol": 0} if DTYPE == "float32" else {"atol": 5e-2, "rtol": 2e-2}
FAMILIES = ["llava_next_video", "video_llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
ADAPTER = {"llava_next_video": "LlavaNextVideoPolicy", "video_llava": "VideoLlavaPolicy", "llava_onevision": "OneVisionPolicy",
           "qwen2_vl": "QwenVLPolicy", "qwen2_5_vl": "Qwen25VLPolicy", "qwen3_vl": "Qwen3VLPolicy"}


def tiny_clip(**kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=56, patch_size=14, projection_dim=32, **kw)


def build(family: str, out: Path, smollm2: Path) -> Path:
    """Save a tiny random ``family`` checkpoint with its tokenizer and video processor config to ``out``."""
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, Qwen2Config, SiglipVisionConfig

    tok = AutoTokenizer.from_pretrained(smollm2)
    qwen = family.startswith("qwen")
    tok.add_special_tokens({"additional_special_tokens": QWEN_TOKENS if qwen else ["<video>", "<image>"]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in (QWEN_TOKENS if qwen else ["<video>", "<image>"])}
    special = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    llava_ids = {"video_token_index": ids.get("<video>"), "image_token_index": ids.get("<image>")}
    processor = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_rescale": True, "do_normalize": True, "resample": 3}
    torch.manual_seed(0)
    if family == "llava_next_video":
        config = transformers.LlavaNextVideoConfig(
            vision_config=tiny_clip(), text_config=LlamaConfig(**TINY_TEXT, **special), **llava_ids, spatial_pool_stride=2,
            vision_feature_select_strategy="default", vision_feature_layer=-2, image_grid_pinpoints=[[56, 56]])
        processor |= {"video_processor_type": "LlavaNextVideoVideoProcessor", "size": {"shortest_edge": 56},
                      "crop_size": {"height": 56, "width": 56}, "do_center_crop": True, "do_resize": True}
    elif family == "video_llava":
        config = transformers.VideoLlavaConfig(vision_config=tiny_clip(), text_config=LlamaConfig(**TINY_TEXT, **special), **llava_ids)
        processor |= {"video_processor_type": "VideoLlavaVideoProcessor", "size": {"shortest_edge": 56},
                      "crop_size": {"height": 56, "width": 56}, "do_center_crop": True, "do_resize": True}
    elif family == "llava_onevision":
        config = transformers.LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             image_size=56, patch_size=14),
            text_config=Qwen2Config(**TINY_TEXT, **special), **llava_ids, image_grid_pinpoints=[[56, 56]])
        processor |= {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 56, "width": 56},
                      "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    else:
        patch = 16 if family == "qwen3_vl" else 14
        text = dict(**TINY_TEXT, **special, max_position_embeddings=4096,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                     "mrope_section": [4, 2, 2] if family == "qwen3_vl" else [2, 3, 3]})
        vision = {"qwen2_vl": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
                  "qwen2_5_vl": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                                     "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2},
                  "qwen3_vl": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                                   "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]}}[family]
        cls = {"qwen2_vl": transformers.Qwen2VLConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig,
               "qwen3_vl": transformers.Qwen3VLConfig}[family]
        config = cls(text_config=text, vision_config=dict(vision, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2),
                     image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        tok.chat_template = QWEN_TEMPLATE
        factor = patch * 2
        processor |= {"video_processor_type": {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                                               "qwen3_vl": "Qwen3VLVideoProcessor"}[family],
                      "size": {"shortest_edge": factor * factor, "longest_edge": 4 * factor * factor * (4 if family == "qwen3_vl" else 1)},
                      "patch_size": patch, "temporal_patch_size": 2, "merge_size": 2, "do_resize": True}
    model = getattr(transformers, ADAPTERS[family].model_class)(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "video_preprocessor_config.json").write_text(json.dumps(processor))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory, smollm2) -> tuple[str, Path]:
    return request.param, build(request.param, tmp_path_factory.mktemp(request.param), smollm2)


@pytest.fixture(scope="module")
def policy(family_dir, cache_dir) -> VideoPolicy:
    return load_policy(str(family_dir[1]), cache_dir, device=DEVICE, dtype=DTYPE, processor="capdpo")


def frames(seed: int, n: int = 4, size: tuple[int, int] = (60, 90)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def encode(policy: VideoPolicy, seed: int, n: int = 4):
    with torch.inference_mode():
        return policy.encode(policy.preprocess(frames(seed, n)))


def test_adapter_is_picked_from_model_type(policy, family_dir):
    assert type(policy).__name__ == ADAPTER[family_dir[0]]
    video = encode(policy, 0)
    assert video.embeds.shape[0] == video.layout.n_visual == policy.visual_tokens(4, 60, 90)
    ids = policy.prompt_ids("What happens?", video.layout)
    assert ids.count(policy.video_token_id) == video.layout.n_visual
    assert "What happens?" in policy.tokenizer.decode(ids)


def test_generate_is_deterministic_and_encodes_the_video_once(policy):
    calls = []
    hook = policy.vision_module().register_forward_hook(lambda *args: calls.append(1))
    try:
        video = encode(policy, 1)
        a = policy.generate(video, "Describe it.", n=4, temperature=1.0, top_p=0.95, max_new_tokens=5, seed=5)
        b = policy.generate(video, "Describe it.", n=4, temperature=1.0, top_p=0.95, max_new_tokens=5, seed=5)
        [greedy] = policy.generate(video, "Describe it.", max_new_tokens=5)
    finally:
        hook.remove()
    assert a == b and len(a) == 4 and isinstance(greedy, str)
    assert len(calls) == 1, "sampling N answers must reuse the encoded video"


def test_generate_batch_answers_do_not_depend_on_the_batch(policy):
    """Left-padded rows of different videos and questions: each request gets what it gets alone,
    greedy and sampled (every row seeded on its own)."""
    requests = [(encode(policy, 2), "Which colour is the shape?"), (encode(policy, 3, n=2), "How many shapes are there in the end?")]
    for kwargs in ({}, {"n": 3, "temperature": 1.0, "top_p": 0.9, "seeds": [11, 12]}):
        together = policy.generate_batch(requests, max_new_tokens=6, **kwargs)
        seeds = kwargs.pop("seeds", [None, None])
        alone = [policy.generate_batch([r], max_new_tokens=6, **kwargs, **({"seeds": [s]} if s else {}))[0]
                 for r, s in zip(requests, seeds)]
        assert together == alone and [len(a) for a in together] == [kwargs.get("n", 1)] * 2
    sampled = policy.generate_batch(requests[:1], n=8, temperature=1.0, seeds=[1], max_new_tokens=6)[0]
    assert len(set(sampled)) > 1, "rows of one request draw from different generators"
    # n > 1 continues n rows from one prompt cache: at a near-zero temperature every row is the greedy answer
    greedy = policy.generate_batch(requests, max_new_tokens=6)
    cold = policy.generate_batch(requests, n=3, temperature=1e-5, seeds=[1, 2], max_new_tokens=6)
    assert cold == [[g] * 3 for [g] in greedy]


def test_logps_do_not_depend_on_batching(policy):
    videos = [encode(policy, 2), encode(policy, 3, n=2)]  # different lengths: padding differs per row
    prompts = [policy.prompt_ids("Which colour?", videos[0].layout),
               policy.prompt_ids("How many shapes are there in the end?", videos[1].layout)]
    responses = [policy.response_ids("Red."), policy.response_ids("There are three shapes, a circle and two squares.")]
    with torch.no_grad():
        together, counts = policy.sequence_logps(videos, prompts, responses)
        alone = torch.cat([policy.sequence_logps(videos[i : i + 1], prompts[i : i + 1], responses[i : i + 1])[0] for i in range(2)])
        per_token = policy.token_logps(videos, prompts, responses)
    assert counts.tolist() == [len(r) for r in responses]
    torch.testing.assert_close(together, alone, **TOL)
    sums = torch.stack([t.sum() for t in per_token])
    torch.testing.assert_close(sums, together, atol=TOL["atol"], rtol=max(TOL["rtol"], 1e-6))  # summation order differs


def raw_inputs(policy: VideoPolicy, question: str, response: list[int] | None = None, seed: int = 6) -> dict:
    """The model's own inputs: prompt (+ response) ids and raw pixels, which it encodes itself."""
    inputs = policy.preprocess(frames(seed))
    ids = torch.tensor([policy.prompt_ids(question, inputs.layout) + (response or [])], device=policy.device)
    with torch.inference_mode():
        video = policy.encode(inputs)
    qwen = inputs.layout.grid_thw is not None
    pixels = (inputs.pixel_values if qwen else inputs.pixel_values.unsqueeze(0)).to(policy.device, policy.model.dtype)
    return {"input_ids": ids, "pixel_values_videos": pixels, **policy._forward_kwargs(ids, [video])}, video


def test_logps_equal_the_model_own_loss(policy):
    """Encoded once and handed over as mm_encoder_outputs = the model's own forward from pixels
    (same scatter, same multimodal positions, same deepstack injection)."""
    response = policy.response_ids("A blue circle moves left.")
    raw, video = raw_inputs(policy, "What is shown?", response)
    prompt = raw["input_ids"][0, : -len(response)].tolist()
    labels = torch.tensor([[-100] * len(prompt) + response], device=policy.device)
    with torch.no_grad():
        ours, n = policy.sequence_logps([video], [prompt], [response])
        loss = policy.model(**raw, labels=labels).loss
    torch.testing.assert_close(-ours / n, loss.unsqueeze(0).float(), atol=TOL["atol"], rtol=max(TOL["rtol"], 1e-5))


def test_generate_matches_the_model_own_pixel_path(policy):
    raw, video = raw_inputs(policy, "Describe it.")
    [ours] = policy.generate(video, "Describe it.", max_new_tokens=6)
    with torch.inference_mode():
        out = policy.model.generate(**raw, max_new_tokens=6, do_sample=False, pad_token_id=policy.tokenizer.pad_token_id)
    assert ours == policy.tokenizer.decode(out[0, raw["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_the_projector_on_tower_features_is_the_encoder(policy):
    inputs = policy.preprocess(frames(3))
    if not policy.splits_projector:  # OneVision pools after its projector; Qwen's merger sits inside the tower
        with pytest.raises(NotImplementedError):
            policy.tower_features(inputs)
        return
    with torch.no_grad():
        whole, split = policy.encode(inputs), policy.project(policy.tower_features(inputs))
    assert split.layout == whole.layout and torch.equal(split.embeds, whole.embeds)


def test_one_dpo_step_trains_the_llm_only(family_dir, cache_dir):
    policy = load_policy(str(family_dir[1]), cache_dir, device=DEVICE, dtype=DTYPE, processor="capdpo")
    reference = policy.with_model(copy.deepcopy(policy.model).requires_grad_(False), "reference")
    set_trainable(policy, TrainConfig(lora=False))
    video = encode(policy, 4).detach()
    prompt = policy.prompt_ids("What is shown?", video.layout)
    chosen, rejected = policy.response_ids("A blue circle."), policy.response_ids("Nothing at all, it is empty.")
    rows = {"videos": [video, video], "prompts": [prompt, prompt], "responses": [chosen, rejected]}
    opt = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.5)
    pc, pr = policy.sequence_logps(**rows)[0]
    with torch.no_grad():
        rc, rr = reference.sequence_logps(**rows)[0]
    loss = sigmoid_dpo(pc, pr, rc, rr, beta=0.1)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at the start
    parts = {name: policy.parts.part_of(name) for name, _ in policy.model.named_parameters()}
    assert None not in parts.values(), "every parameter belongs to the vision tower, the projector or the LLM"
    trained = {parts[n] for n, p in policy.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"llm"}
    with torch.no_grad():
        after_c, after_r = policy.sequence_logps(**rows)[0]
    assert (after_c - after_r) > (pc - pr).detach(), "the step should prefer the chosen answer"


def test_over_budget_video_raises_or_shrinks(policy, tmp_path):
    from capdpo.config import FramesConfig
    from capdpo.policy.video import plan_video
    from capdpo.records import Video

    folder = tmp_path / "clip"
    folder.mkdir()
    for i, f in enumerate(frames(5, n=8, size=(120, 180))):
        f.save(folder / f"{i:03d}.png")
    video = Video(id="v1", video=str(folder), caption="")
    full = plan_video(policy, video, FramesConfig(num_frames=8), ["What?"], 8)[1]
    small = policy.with_model(policy.model, "small")
    small.max_tokens = len(policy.prompt_ids("What?", full)) + 8 - 1  # one token short of the full video
    with pytest.raises(OverBudgetError, match="video v1 .*exceed"):
        plan_video(small, video, FramesConfig(num_frames=8), ["What?"], 8)
    images, layout = plan_video(small, video, FramesConfig(num_frames=8, on_over_budget="reduce"), ["What?"], 8)
    assert layout.num_frames == len(images) <= 8 and layout.n_visual < full.n_visual
    assert len(small.prompt_ids("What?", layout)) + 8 <= small.max_tokens
    with torch.inference_mode():
        assert small.encode(small.preprocess(images, layout)).embeds.shape[0] == layout.n_visual


def test_own_preprocessing_matches_transformers(family_dir, cache_dir):
    """capdpo's re-implementation against the checkpoint's own video processor (needs torchvision)."""
    pytest.importorskip("torchvision")
    ours = load_policy(str(family_dir[1]), cache_dir, device="cpu", processor="capdpo", weights=False)
    theirs = load_policy(str(family_dir[1]), cache_dir, device="cpu", processor="hf", weights=False)
    ramp = np.linspace(0, 255, 120 * 180 * 3).reshape(120, 180, 3)
    smooth = [Image.fromarray(np.roll(ramp, 7 * i, axis=1).astype(np.uint8)) for i in range(4)]  # interpolation-friendly
    a, b = ours.preprocess(smooth), theirs.preprocess(smooth)
    assert a.layout == b.layout and a.pixel_values.shape == b.pixel_values.shape
    assert (a.pixel_values - b.pixel_values).abs().mean() < 0.05  # PIL vs torchvision bicubic


def test_sft_packs_a_video_s_examples_in_one_row_with_the_numbers_of_one_row_each(policy):
    """SFT's answer log-probs (``answer_logps``): the examples of one video share a packed row, and
    each answer's log-prob and token count equal those of its own unpacked row, in the order given."""
    from capdpo.policy.logps import answer_logps
    from capdpo.policy.packing import video_grouped_order

    with torch.no_grad():
        videos = {"a": policy.encode(policy.preprocess(frames(7))), "b": policy.encode(policy.preprocess(frames(8, n=2)))}
        batch = [("a", "What is shown?", "A red square."), ("b", "Describe it.", "Two circles."),
                 ("a", "How many shapes are there?", "One.")]
        prompts = [policy.prompt_ids(q, videos[k].layout) for k, q, _ in batch]
        responses = [policy.response_ids(r, 16) for _, _, r in batch]
        packed, counts = answer_logps(policy, [videos[k] for k, _, _ in batch], prompts, responses)
        rows, n = policy.sequence_logps([videos[k] for k, _, _ in batch], prompts, responses)
    torch.testing.assert_close(packed, rows, atol=1e-4, rtol=0)
    assert counts.tolist() == n.tolist()
    order = video_grouped_order(["a", "b", "a", "c", "b"], 0)
    keys = [["a", "b", "a", "c", "b"][i] for i in order]
    assert sorted(order) == list(range(5)) and len([k for j, k in enumerate(keys) if j == 0 or keys[j - 1] != k]) == 3


def test_a_group_s_answers_behind_one_prompt_give_each_answer_s_token_logps(policy):
    """GRPO's fast path: G answers to one question in one packed row, the video and prompt run once;
    every answer's per-token log-probs equal those of its own unpacked row."""
    from capdpo.policy.packing import Branch, branch_matrix

    if not policy.shares_prompt_prefix:
        pytest.skip("attention without a custom 4D mask: answers run one row each")
    video = encode(policy, 7)
    prompt = policy.prompt_ids("What is shown?", video.layout)
    answers = [policy.response_ids(text, 16) for text in ("A red square.", "Two circles.", "A blue square moving left.")]
    with torch.no_grad():
        matrix, mask = branch_matrix(*policy.branch_token_logps([video], [(prompt, [Branch(a) for a in answers])]), len(answers))
        for k, answer in enumerate(answers):
            alone, _ = policy._response_logps([video], [prompt], [answer])
            torch.testing.assert_close(matrix[k, : len(answer)], alone, atol=1e-4, rtol=0)
    assert mask.sum(1).tolist() == [len(a) for a in answers]
