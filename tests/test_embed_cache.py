"""The on-disk video embedding cache: hits skip the vision tower and equal a fresh encode, keys follow
what decides the embeddings, and a damaged entry is encoded again."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capdpo.config import FramesConfig
from capdpo.media.synthetic import random_scene, render_scene
from capdpo.models.load import load_policy
from capdpo.policy.base import EncodedVideo, VideoLayout, VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache, content_hash, entry_key
from capdpo.policy.video import VideoEncoder, plan_video
from capdpo.records import ClipWindow, Video

FRAMES = FramesConfig(num_frames=4)


@pytest.fixture(scope="module")
def policy(tiny_policy_dir, cache_dir) -> VideoPolicy:
    return load_policy(str(tiny_policy_dir), cache_dir, device="cpu")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Video:
    path = render_scene(random_scene(1, width=64, height=48, n_frames=16), tmp_path_factory.mktemp("clips") / "clip.mp4")
    return Video(id="clip", video=str(path), caption="Shapes.")


def frame_folder(folder: Path, seed: int) -> Video:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return Video(id=folder.name, video=str(folder), caption="Noise.")


@pytest.fixture
def vision_calls(policy) -> list[int]:
    """Calls of the policy's vision tower while the test runs."""
    calls = []
    hook = policy.vision_module().register_forward_hook(lambda *_: calls.append(1))
    yield calls
    hook.remove()


def assert_same(a: EncodedVideo, b: EncodedVideo) -> None:
    assert a.layout == b.layout
    assert torch.equal(a.embeds, b.embeds) and a.embeds.dtype == b.embeds.dtype and a.embeds.device == b.embeds.device
    assert len(a.deepstack) == len(b.deepstack) and all(torch.equal(x, y) for x, y in zip(a.deepstack, b.deepstack))


def test_hit_skips_the_vision_tower_and_equals_a_fresh_encode(policy, clip, tmp_path, vision_calls):
    fresh = VideoEncoder(policy, FRAMES).encode(clip, ["What moves?"], 8)
    calls = vision_calls
    calls.clear()
    first = EmbeddingCache(tmp_path / "emb")
    miss = VideoEncoder(policy, FRAMES, first).encode(clip, ["What moves?"], 8)
    assert_same(miss, fresh)
    assert not miss.embeds.is_inference() and not miss.embeds.requires_grad  # a training forward may use it
    assert (first.hits, first.misses) == (0, 2) and calls  # the embeddings, then the tower features (kept too)
    calls.clear()
    again = EmbeddingCache(tmp_path / "emb")  # a later run: the entry comes from disk
    for _ in range(2):
        hit = VideoEncoder(policy, FRAMES, again).encode(clip, ["What moves?"], 8)
        assert_same(hit, fresh)
        assert not hit.embeds.is_inference() and not hit.embeds.requires_grad
    assert (again.hits, again.misses) == (2, 0) and not calls
    assert len(list((tmp_path / "emb").rglob("*.safetensors"))) == 2 and not list((tmp_path / "emb").rglob("*.tmp"))


def layout_of(policy: VideoPolicy, video: Video, frames: FramesConfig = FRAMES) -> VideoLayout:
    return plan_video(policy, video, frames)[1]


def test_key_follows_video_bytes_frame_count_and_vision_weights(policy, clip, tiny_policy_dir, cache_dir, tmp_path):
    key = entry_key(policy, clip.video, layout_of(policy, clip))
    assert entry_key(policy, clip.video, layout_of(policy, clip)) == key

    other = Path(render_scene(random_scene(2, width=64, height=48, n_frames=16), tmp_path / "other.mp4"))
    assert entry_key(policy, other, layout_of(policy, clip)) != key
    folder = frame_folder(tmp_path / "frames", seed=0)
    folder_key = entry_key(policy, folder.video, layout_of(policy, folder))
    Image.new("RGB", (64, 48), "red").save(Path(folder.video) / "003.png")
    assert entry_key(policy, folder.video, layout_of(policy, folder)) != folder_key

    fewer = layout_of(policy, clip, FramesConfig(num_frames=2))
    assert fewer.num_frames == 2 and entry_key(policy, clip.video, fewer) != key
    part = ClipWindow(start=0.5, end=1.0)  # a part of the clip (MVBench's bounds) is another entry
    assert entry_key(policy, clip.video, layout_of(policy, clip), window=part) != key

    def perturbed(part: str) -> VideoPolicy:
        fresh = load_policy(str(tiny_policy_dir), cache_dir, device="cpu")
        weight = next(p for n, p in fresh.model.named_parameters() if fresh.parts.part_of(n) == part)
        with torch.no_grad():
            weight.add_(0.01)
        return fresh

    assert entry_key(perturbed("vision"), clip.video, layout_of(policy, clip)) != key
    assert entry_key(perturbed("llm"), clip.video, layout_of(policy, clip)) == key  # a DPO-trained LLM reuses entries
    assert entry_key(perturbed("projector"), clip.video, layout_of(policy, clip)) != key
    tower_key = entry_key(policy, clip.video, layout_of(policy, clip), "tower")
    assert tower_key != key and entry_key(perturbed("projector"), clip.video, layout_of(policy, clip), "tower") == tower_key
    assert entry_key(perturbed("vision"), clip.video, layout_of(policy, clip), "tower") != tower_key


def test_a_checkpoint_whose_projector_trained_projects_cached_tower_features(policy, clip, tiny_policy_dir, cache_dir, tmp_path):
    cache = EmbeddingCache(tmp_path / "emb")
    VideoEncoder(policy, FRAMES, cache).encode(clip, ["What moves?"], 8)  # the base: embeddings and tower features
    trained = load_policy(str(tiny_policy_dir), cache_dir, device="cpu")
    with torch.no_grad():
        for name, p in trained.model.named_parameters():
            if trained.parts.part_of(name) == "projector":
                p.mul_(1.5)
    runs = []
    trained.vision_module().register_forward_hook(lambda *_: runs.append(1))
    encoded = VideoEncoder(trained, FRAMES, cache).encode(clip, ["What moves?"], 8)
    assert not runs and (cache.hits, cache.misses) == (1, 3)  # its embeddings missed, the tower features hit
    assert_same(encoded, VideoEncoder(trained, FRAMES).encode(clip, ["What moves?"], 8))  # as a fresh encode
    assert not torch.equal(encoded.embeds, VideoEncoder(policy, FRAMES).encode(clip, ["What moves?"], 8).embeds)


def test_damaged_entry_is_logged_and_encoded_again(policy, tmp_path, caplog):
    video = frame_folder(tmp_path / "v", seed=1)
    cache = EmbeddingCache(tmp_path / "emb")
    fresh = VideoEncoder(policy, FRAMES, cache).encode(video)
    entries = list((tmp_path / "emb").rglob("*.safetensors"))  # the embeddings and the tower features
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # e.g. a disk that filled up
    with caplog.at_level(logging.WARNING, logger="capdpo"):
        assert_same(VideoEncoder(policy, FRAMES, cache).encode(video), fresh)
    assert len(entries) == 2 and all(str(e) in caplog.text for e in entries) and (cache.hits, cache.misses) == (0, 4)
    assert_same(VideoEncoder(policy, FRAMES, cache).encode(video), fresh)  # rewritten whole
    assert cache.hits == 1


def test_entry_round_trips_deepstack_and_timed_layouts(tmp_path):
    """What a Qwen3-VL entry holds: bf16 embeddings, deepstack tensors, frame times and a patch grid."""
    layout = VideoLayout(4, 64, 96, 12, frame_times=(0.0, 0.5, 1.0, 1.5), seconds_per_frame=0.5, grid_thw=(2, 4, 6), max_pixels=6144)
    encoded = EncodedVideo(layout, torch.randn(12, 8, dtype=torch.bfloat16), tuple(torch.randn(12, 8, dtype=torch.bfloat16) for _ in range(3)))
    path = tmp_path / "entry.safetensors"
    EmbeddingCache._write(path, encoded, Video(id="v", video="v.mp4", caption=""))
    assert_same(EmbeddingCache._read(path, layout), encoded)
    with pytest.raises(ValueError, match="layout"):
        EmbeddingCache._read(path, VideoLayout(4, 64, 96, 12))


def test_a_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"frames" * 1000)
    first = content_hash(video)
    with monkeypatch.context() as m:
        m.setattr(Path, "open", lambda *_, **__: pytest.fail("the file was read again"))
        assert content_hash(video) == first
    video.write_bytes(b"other frames" * 1000)
    assert content_hash(video) != first
