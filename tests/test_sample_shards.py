"""Candidate sampling at scale: shards that merge to the unsharded result, vLLM requests, the
frame budget inside the stage."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from capdpo.cli import app
from capdpo.config import FramesConfig, SampleConfig
from capdpo.models.load import load_policy
from capdpo.records import Candidate, QAItem, RecordFile, Video
from capdpo.rundir import RunPaths
from capdpo.sample import merge_shards, question_seed, run_sample
from capdpo.shards import parse_shard, shard_file, shard_of


def write_run(root: Path, policy_dir: Path, cache_dir: Path, videos: int = 3, questions: int = 3) -> Path:
    """A run folder with frame-folder videos, their questions and a config: ready for `capdpo sample`."""
    paths = RunPaths(root)
    rng = np.random.default_rng(0)
    rows, qa = [], []
    for v in range(videos):
        folder = root / "media" / f"v{v}"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        rows.append(Video(id=f"v{v}", video=str(folder), caption="Shapes."))
        qa += [QAItem(id=f"v{v}_{i}", video_id=f"v{v}", question=f"Question {i} about clip {v}?", answer="Yes.") for i in range(questions)]
    paths.videos.write(rows)
    paths.qa.write(qa)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(root), "cache_dir": str(cache_dir), "policy": {"model": str(policy_dir)},
                                      "sample": {"n": 2, "max_new_tokens": 4}, "frames": {"num_frames": 4}}))
    return config


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_two_shards_merge_to_the_unsharded_run(tmp_path, tiny_policy_dir, cache_dir):
    whole = write_run(tmp_path / "whole", tiny_policy_dir, cache_dir)
    split = write_run(tmp_path / "split", tiny_policy_dir, cache_dir)
    invoke("sample", "--config", str(whole))
    invoke("sample", "--config", str(split), "--shard", "0/2")
    invoke("sample", "--config", str(split), "--shard", "1/2")
    candidates = RunPaths(tmp_path / "split").candidates
    shards = [shard_file(candidates, (i, 2)).all() for i in range(2)]
    assert all(shards) and not {c.qa_id for c in shards[0]} & {c.qa_id for c in shards[1]}
    assert "'candidates': 18" in invoke("sample", "merge", "--shards", "2", "--config", str(split))

    expected = {c.id: c for c in RunPaths(tmp_path / "whole").candidates.all()}
    merged = {c.id: c for c in candidates.all()}
    assert len(expected) == 3 * 3 * 2 and merged.keys() == expected.keys()
    assert {i: c.answer for i, c in merged.items()} == {i: c.answer for i, c in expected.items()}  # per-question seeds
    assert all(c.num_frames == 4 and c.frame_size == (56, 56) and c.backend == "hf" for c in merged.values())
    # merging again (e.g. after a shard re-ran) changes nothing
    invoke("sample", "merge", "--shards", "2", "--config", str(split))
    assert [c.id for c in candidates.all()] == [c.id for c in RunPaths(tmp_path / "split").candidates.all()]


def candidate(qa_id: str, k: int, answer: str = "a") -> Candidate:
    return Candidate(id=f"{qa_id}#{k}", qa_id=qa_id, video_id="v", answer=answer, model="m", seed=0, temperature=1.0, top_p=1.0)


def test_merge_verifies_its_shards(tmp_path):
    out = RecordFile(tmp_path / "candidates.jsonl", Candidate)
    ids = [f"q{i}" for i in range(12)]
    for i in range(2):
        shard_file(out, (i, 2)).write([candidate(q, 0) for q in ids if shard_of(q, 2) == i])
    shard_file(out, (0, 2)).append(candidate(next(q for q in ids if shard_of(q, 2) == 0), 0))  # exact duplicate
    assert merge_shards(out, 2) == {"shards": 2, "candidates": 12, "duplicates_dropped": 1}
    assert sorted(c.qa_id for c in out.all()) == sorted(ids)

    with pytest.raises(FileNotFoundError, match="shard-2-of-3"):
        merge_shards(out, 3)
    stray = next(q for q in ids if shard_of(q, 2) == 1)
    shard_file(out, (0, 2)).append(candidate(stray, 1))
    with pytest.raises(ValueError, match="belongs to shard 1"):
        merge_shards(out, 2)
    shard_file(out, (0, 2)).write([candidate(q, 0, "other") for q in ids if shard_of(q, 2) == 0])
    with pytest.raises(ValueError, match="appears twice with different content"):
        merge_shards(out, 2)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="i/n"):
            parse_shard(bad)


class FakeVllm(types.ModuleType):
    """Just enough of vLLM's offline API to record what capdpo sends it."""

    def __init__(self):
        super().__init__("vllm")
        self.engines, self.calls = [], []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                fake.engines.append(kwargs)

            def generate(self, requests, sampling_params):
                fake.calls.append((requests, sampling_params))
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" answer {k} ") for k in range(p.kwargs["n"])])
                        for p in sampling_params]

        self.LLM, self.SamplingParams = LLM, SamplingParams


def test_vllm_backend_builds_multimodal_requests(tmp_path, tiny_policy_dir, cache_dir, monkeypatch):
    fake = FakeVllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    write_run(tmp_path, tiny_policy_dir, cache_dir, videos=2, questions=3)
    paths = RunPaths(tmp_path)
    policy = load_policy(str(tiny_policy_dir), cache_dir, weights=False)
    cfg = SampleConfig(backend="vllm", n=3, batch_size=4, max_new_tokens=7, temperature=0.9, top_p=0.8, seed=5)
    run_sample(paths.videos, paths.qa, paths.candidates, policy, cfg, FramesConfig(num_frames=4))

    [engine] = fake.engines
    assert engine["model"] == str(tiny_policy_dir) and engine["limit_mm_per_prompt"] == {"video": 1}
    assert [len(requests) for requests, _ in fake.calls] == [6]  # 2 videos x 3 questions, flushed at batch_size
    requests, params = fake.calls[0]
    for request, p, q in zip(requests, params, paths.qa.all()):
        assert request["prompt"].count("<video>") == 1 and q.question in request["prompt"]
        video = request["multi_modal_data"]["video"]
        assert isinstance(video, np.ndarray) and video.shape == (4, 56, 56, 3) and video.dtype == np.uint8
        assert p.kwargs == {"n": 3, "temperature": 0.9, "top_p": 0.8, "seed": question_seed(5, q.id), "max_tokens": 7}
    candidates = paths.candidates.all()
    assert len(candidates) == 18 and {c.backend for c in candidates} == {"vllm"} and candidates[0].answer == "answer 0"


def test_over_budget_videos_are_named_or_reduced(tmp_path, tiny_policy_dir, cache_dir):
    write_run(tmp_path, tiny_policy_dir, cache_dir, videos=1, questions=2)
    paths = RunPaths(tmp_path)
    policy = load_policy(str(tiny_policy_dir), cache_dir, device="cpu")
    layout = policy.layout(4, 48, 64)
    policy.max_tokens = max(len(policy.prompt_ids(q.question, layout)) for q in paths.qa.read()) + 4 - 1  # 1 token short
    cfg = SampleConfig(n=2, max_new_tokens=4)

    errors = run_sample(paths.videos, paths.qa, paths.candidates, policy, cfg, FramesConfig(num_frames=4))
    assert not paths.candidates.exists() and "video v0" in errors.errors[0][1] and "exceed" in errors.errors[0][1]

    run_sample(paths.videos, paths.qa, paths.candidates, policy, cfg, FramesConfig(num_frames=4, on_over_budget="reduce"))
    candidates = paths.candidates.all()
    assert len(candidates) == 4 and {c.num_frames for c in candidates} == {3}  # one frame fewer fits


def test_frame_times_come_from_the_clip(tmp_path, shared_data):
    """Qwen models get the real time of each sampled frame: from the stream's rate, or the frame
    folder's marker (capdpo frames), else frames.fps."""
    from capdpo.frames import extract_frame_folder
    from capdpo.media.frames import count_frames, frame_rate

    clip = sorted((shared_data / "videos").glob("*.mp4"))[0]
    rate = frame_rate(clip)
    assert rate and 1 < rate < 121
    folder = tmp_path / "frames"
    extract_frame_folder(clip, folder, fps=2.0, width=64)
    assert frame_rate(folder) == 2.0 and frame_rate(tmp_path) is None
    assert count_frames(folder) == pytest.approx(count_frames(clip) / rate * 2, abs=2)  # same clip length
