"""The video policy adapter on a tiny random LLaVA-NeXT-Video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from capdpo.models.load import load_policy
from capdpo.policy.base import VideoPolicy


@pytest.fixture(scope="module")
def policy(tiny_policy_dir, cache_dir) -> VideoPolicy:
    return load_policy(str(tiny_policy_dir), cache_dir, device="cpu")


def frames(seed: int, n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)) for _ in range(n)]


def encode(policy: VideoPolicy, seed: int):
    with torch.inference_mode():
        return policy.encode(policy.preprocess(frames(seed)))


def test_pixel_values_are_cropped_and_normalised(policy):
    x = policy.preprocess(frames(0)).pixel_values
    assert x.shape == (4, 3, 56, 56)
    assert -3 < x.mean().item() < 3


def test_prompt_expands_the_video_placeholder(policy):
    layout = policy.layout(4, 80, 96)
    ids = policy.prompt_ids("What happens?", layout)
    assert layout.n_visual == 16 and ids.count(policy.video_token_id) == 16
    assert "What happens?" in policy.tokenizer.decode(ids)


def test_generate_is_deterministic_with_a_seed(policy):
    video = encode(policy, 1)
    a = policy.generate(video, "Describe it.", n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=5)
    b = policy.generate(video, "Describe it.", n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=5)
    assert a == b and len(a) == 3


def test_logps_do_not_depend_on_batching(policy):
    videos = [encode(policy, s) for s in (2, 3)]
    prompts = [policy.prompt_ids("Which colour?", videos[0].layout),
               policy.prompt_ids("How many shapes are there in the end?", videos[1].layout)]
    responses = [policy.response_ids("Red."), policy.response_ids("There are three shapes, a circle and two squares.")]
    with torch.no_grad():
        together, counts = policy.sequence_logps(videos, prompts, responses)
        alone = [policy.sequence_logps(videos[i : i + 1], prompts[i : i + 1], responses[i : i + 1])[0] for i in range(2)]
    assert counts.tolist() == [len(r) for r in responses]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_logps_equal_the_model_own_loss(policy):
    """Summed response log-prob agrees with transformers' own labels-based loss."""
    inputs = policy.preprocess(frames(4))
    video = policy.encode(inputs)
    prompt = policy.prompt_ids("What is shown?", video.layout)
    response = policy.response_ids("A blue circle.")
    ids = torch.tensor([prompt + response])
    labels = torch.tensor([[-100] * len(prompt) + response])
    with torch.no_grad():
        ours, n = policy.sequence_logps([video], [prompt], [response])
        loss = policy.model(input_ids=ids, pixel_values_videos=inputs.pixel_values.unsqueeze(0), labels=labels).loss
    torch.testing.assert_close(-ours / n, loss.unsqueeze(0), atol=1e-5, rtol=1e-5)
