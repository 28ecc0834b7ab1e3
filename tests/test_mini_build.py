"""The built-in mini model's build (capdpo.models.mini), shrunk: the real packaged weights and every
step of the recipe, on a handful of clips and a step or two a phase."""

from __future__ import annotations

import shutil

import pytest
import torch

import capdpo.models.mini as mini
from capdpo.models.load import load_policy
from capdpo.packaged import MARKER, dinov2_small, smollm2_dir


@pytest.fixture
def small_build(monkeypatch, cache_dir, tmp_path):
    """A cache folder holding only the packaged weights, and the build cut to 4 + 3 clips, 3
    anchoring steps and one SFT step a phase."""
    cache = tmp_path / "cache"
    for source in (smollm2_dir(cache_dir), dinov2_small(cache_dir)):
        shutil.copytree(source, cache / source.name)
    monkeypatch.setattr(mini, "TRAIN_CLIPS", 4)
    monkeypatch.setattr(mini, "MORE_CLIPS", 3)
    monkeypatch.setattr(mini, "ANCHOR_STEPS", 3)
    recipe = mini.mini_sft_config

    def one_step_a_phase():
        cfg = recipe()
        return cfg.model_copy(update={"phases": [p.model_copy(update={"max_steps": 1, "batch_size": 4}) for p in cfg.phases],
                                      "save_every": 0})

    monkeypatch.setattr(mini, "mini_sft_config", one_step_a_phase)
    return cache


@pytest.mark.slow
def test_the_build_writes_the_start_and_the_model_as_plain_checkpoints_that_see_through_max_pooling(small_build):
    start, model = mini.mini_start_dir(small_build), mini.mini_model_dir(small_build)
    assert (start / MARKER).is_file() and (model / MARKER).is_file()
    assert not (small_build / f"{mini.MINI_NAME}.work").exists(), "the work folder goes once both are in place"
    a, b = (load_policy(str(d), small_build, device="cpu") for d in (start, model))
    assert a.model.config.spatial_pool_mode == "max" and a.spec == mini.SPEC
    assert a.tokens_per_frame() == 4, "one token per quadrant of the 8x8 patch grid"
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys(), "LoRA merged: the same plain parameters"
    changed = {a.parts.part_of(k) for k in pa if not torch.equal(pa[k], pb[k])}
    assert changed == {"projector", "llm"}, "the second phase trains the projector and the LLM (LoRA), never the tower"


@pytest.mark.slow
def test_a_build_killed_after_its_first_phase_goes_on_from_that_phase_s_saved_weights(small_build):
    work = mini.build_mini(small_build)
    first = {n: t.clone() for n, t in load_policy(str(work / "more" / "policy"), small_build, device="cpu").model.state_dict().items()}
    start_files = {p: p.stat().st_mtime_ns for p in (work / "start").rglob("*") if p.is_file()}
    shutil.rmtree(work / "more")  # as if killed before the second phase saved anything
    assert mini.build_mini(small_build) == work
    assert {p: p.stat().st_mtime_ns for p in (work / "start").rglob("*") if p.is_file()} == start_files, "the first phase is not redone"
    again = load_policy(str(work / "more" / "policy"), small_build, device="cpu").model.state_dict()
    assert all(torch.allclose(first[n], again[n], atol=1e-6) for n in first), "the resumed phase starts from the first phase's weights"


def test_the_second_phase_trains_on_fresh_clips_asked_every_count_and_shape_question():
    from capdpo.media.synthetic import random_scene
    from capdpo.models.sft import RunRecords

    class Clip:  # what of_synthetic reads of a SyntheticClip
        def __init__(self, i):
            from capdpo.media.synthetic import scene_qa
            from capdpo.records import Video

            self.scene = random_scene(mini.TRAIN_SEED * 100_000 + i)
            self.video, self.qa = Video(id=f"synth_{i:04d}", video=f"/v/{i}.mp4", caption="c", source="synthetic"), scene_qa(self.scene)

    clips = [Clip(i) for i in range(mini.TRAIN_CLIPS, mini.TRAIN_CLIPS + 20)]
    own, every = RunRecords.of_synthetic(clips, mini.TRAIN_KINDS), RunRecords.of_synthetic(clips, mini.TRAIN_KINDS, exhaustive=True)
    assert len(own.questions) == 2 * len(clips), "the first phase's kind of clip: one count and one shape question"
    assert len(every.questions) > 2 * len(own.questions), "every count phrasing and the shape of every shape"
    assert {q.source for q in every.questions} == {"scene:count", "scene:shape"}
    assert {q.question for q in own.questions} <= {q.question for q in every.questions}


def test_token_facts_name_each_quadrant_s_shape_on_the_sampled_frames():
    from capdpo.media.frames import sample_indices
    from capdpo.media.synthetic import KINDS, REGIONS, random_scene

    scene = random_scene(7 * 100_000 + 3)
    kind, colour = mini.token_facts(scene, 8)
    frames = sample_indices(scene.n_frames, 8)
    for s in scene.shapes:
        col, row = REGIONS[s.region]
        shown = [f >= s.appear for f in frames]
        assert [int(k) == 1 + KINDS.index(s.kind) for k in kind[:, row * 2 + col]] == shown
    assert ((kind == 0) == (colour == -1)).all(), "a colour exactly where a shape is"
