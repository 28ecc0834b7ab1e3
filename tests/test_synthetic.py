"""Synthetic clips: determinism, geometry, exact captions/QA (checked against the scene), rendering."""

from __future__ import annotations

import json
import re

import av
import numpy as np
import pytest

from capdpo.media import synthetic
from capdpo.media.frames import sample_frames, sample_indices
from capdpo.media.synthetic import (
    BACKGROUNDS,
    PALETTE,
    QUESTION_KINDS,
    REGIONS,
    Scene,
    caption_scene,
    check_unambiguous,
    draw_frame,
    every_question,
    load_scenes,
    make_synthetic_dataset,
    random_scene,
    render_scene,
    scene_qa,
    scene_questions,
)
from capdpo.records import Video

SEEDS = range(60)
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
DIRECTION_WORDS = {"left": "left", "right": "right", "up": "upward", "down": "downward", "none": "still"}
DETAIL_ANSWERS = {"left": "It moves steadily to the left.", "right": "It moves steadily to the right.",
                  "up": "It moves steadily upward.", "down": "It moves steadily downward.",
                  "none": "It stays still the whole time."}


def test_random_scene_is_deterministic_per_seed():
    assert random_scene(7) == random_scene(7)
    assert caption_scene(random_scene(7)) == caption_scene(random_scene(7))
    assert scene_qa(random_scene(7)) == scene_qa(random_scene(7))
    assert len({json.dumps(random_scene(s).to_dict()) for s in SEEDS}) == len(SEEDS)


def test_scene_round_trips_through_json():
    for seed in range(10):
        scene = random_scene(seed, change_prob=1.0)
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_shapes_stay_in_their_quadrant_and_move_one_way():
    for seed in SEEDS:
        scene = random_scene(seed, width=160, height=120, max_shapes=4)
        assert len({s.region for s in scene.shapes}) == len(scene.shapes)
        colours = [s.colour for s in scene.shapes] + [s.change.colour for s in scene.shapes if s.change]
        assert len(set(colours)) == len(colours)  # "the red circle" names exactly one shape
        assert scene.shapes[0].appear == 0
        assert [s.appear for s in scene.shapes] == sorted({s.appear for s in scene.shapes})
        for s in scene.shapes:
            col, row = REGIONS[s.region]
            for f in range(s.appear, scene.n_frames):
                x, y = s.position(f)
                assert col * 80 <= x - s.radius and x + s.radius <= (col + 1) * 80, (seed, s)
                assert row * 60 <= y - s.radius and y + s.radius <= (row + 1) * 60, (seed, s)
            (x0, y0), (x1, y1) = s.position(s.appear), s.position(scene.n_frames - 1)
            moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0, "none": 0.0}[s.direction]
            assert moved >= (10 if s.direction != "none" else 0) and (x1 - x0 == 0 or y1 - y0 == 0)


def test_caption_mentions_every_shape_and_the_count():
    for seed in SEEDS:
        scene = random_scene(seed)
        cap = caption_scene(scene)
        assert scene.background in cap
        for s in scene.shapes:
            assert f"{s.size} {s.colour} {s.kind}" in cap and s.region in cap
            if s.change:
                assert f"from {s.colour} to {s.change.colour}" in cap
        n = len(scene.shapes)
        assert f"{NUMBERS[n]} shape{'s' if n > 1 else ''} {'are' if n > 1 else 'is'} visible" in cap
        assert ("No shape changes colour." in cap) == (not any(s.change for s in scene.shapes))
        assert cap.endswith(".") and all(p[0].isupper() for p in cap.split(". ")), cap  # full sentences


def _by_name(scene: Scene, text: str):
    """Shapes whose ``colour kind`` name occurs in ``text``, in order of occurrence."""
    hits = [(text.find(s.name), s) for s in scene.shapes if s.name in text]
    return [s for _, s in sorted(hits, key=lambda h: h[0])]


def test_qa_answers_agree_with_the_scene():
    kinds_seen = set()
    for seed in SEEDS:
        scene = random_scene(seed, max_shapes=4)
        qa = scene_qa(scene)
        kinds = [k for _, _, k in qa]
        assert len(qa) >= 4 and len(set(kinds)) == len(kinds)
        assert {"colour", "shape", "count", "motion", "change"} <= set(kinds) and kinds[-1] == "detail"
        assert ("order" in kinds) == (len(scene.shapes) > 1)
        kinds_seen |= set(kinds)
        for q, a, kind in qa:
            assert q.endswith("?") and a[0].isupper() and a.endswith("."), (q, a)
            if kind == "colour":
                (s,) = [s for s in scene.shapes if f"{s.kind} in the {s.region}" in q]
                assert s.colour in a and not [c for c in PALETTE if c in a and c != s.colour]
            elif kind == "shape":
                (s,) = [s for s in scene.shapes if f"{s.colour} " in q]
                assert a.endswith(f"a {s.kind}.")
            elif kind == "count":
                noun = re.match(r"How many (\w+?)s? ", q).group(1)
                n = len(scene.shapes) if noun == "shape" else sum(s.kind == noun for s in scene.shapes)
                assert NUMBERS[n] in a.lower()
            elif kind == "motion":
                (s,) = _by_name(scene, q)
                assert DIRECTION_WORDS[s.direction] in a
                assert a.startswith("No") == (s.direction == "none")
            elif kind == "order":
                named = _by_name(scene, q)
                if "first" in q and named:
                    expected = min(named, key=lambda s: s.appear)
                elif "last" in q:
                    expected = scene.shapes[-1]
                else:
                    expected = scene.shapes[0]
                assert _by_name(scene, a) == [expected]
            elif kind == "change":
                changed = [s for s in scene.shapes if s.change]
                if changed:
                    s = changed[0]
                    assert f"from {s.colour} to {s.change.colour}" in a
                else:
                    assert a.startswith(("No,", "Yes,")) and "keep" in q + a
            elif kind == "detail":
                (s,) = _by_name(scene, q)
                assert a == DETAIL_ANSWERS[s.direction]
    assert kinds_seen == set(QUESTION_KINDS)


def test_qa_text_is_pinned():
    """Runs, SFT data and oracle lookups key on this exact text: a change here is a new data set."""
    assert scene_qa(random_scene(7)) == [
        ("What colour is the square in the lower left of the frame?", "It is orange.", "colour"),
        ("What kind of shape is the orange object?", "It is a square.", "shape"),
        ("How many shapes are visible at the end of the video?", "There are two shapes at the end.", "count"),
        ("Does the orange square move during the video?", "Yes, it moves steadily to the right.", "motion"),
        ("Which shape appears last?", "The orange square appears last.", "order"),
        ("What happens to the yellow square during the video?",
         "The square changes colour from yellow to red late in the video.", "change"),
        ("What does the yellow square do during the video?", "It stays still the whole time.", "detail"),
    ]
    assert scene_qa(random_scene(3, change_prob=1.0))[0] == (
        "Which colour does the small triangle in the lower right have when it first appears?",
        "It is blue when it first appears.", "colour")


def test_question_facts_agree_with_the_scene():
    for seed in SEEDS:
        scene = random_scene(seed, max_shapes=4)
        questions = scene_questions(scene)
        assert [q.as_tuple() for q in questions] == scene_qa(scene)
        for q in questions:
            json.dumps(q.facts)  # facts travel as JSON
            f = q.facts
            assert (q.full_answer is None) == (q.kind != "detail")
            if q.kind == "colour":
                (s,) = [s for s in scene.shapes if f"{s.kind} in the {s.region}" in q.question]
                assert f == {"colour": s.colour, "later_colour": s.change.colour if s.change else None}
            elif q.kind == "shape":
                (s,) = [s for s in scene.shapes if f" {s.colour} " in q.question]
                assert f == {"shape": s.kind}
            elif q.kind == "count":
                noun = f["noun"]
                assert f["count"] == sum(noun in ("shape", s.kind) for s in scene.shapes)
                assert q.question.startswith(f"How many {noun}s ")
            elif q.kind == "motion":
                (s,) = _by_name(scene, q.question)
                assert f["direction"] == s.direction
                assert f["asks"] == ("direction" if q.question.startswith("In which direction") else "yes_no")
            elif q.kind == "order":
                options = [s for s in scene.shapes if {"kind": s.kind, "colour": s.colour} in f["options"]]
                assert len(options) == len(f["options"]) and f["answer"] in f["options"]
                when = min if f["position"] == "first" else max
                expected = when(options, key=lambda s: s.appear)
                assert f["answer"] == {"kind": expected.kind, "colour": expected.colour}
            elif q.kind == "change":
                changed = [s for s in scene.shapes if s.change]
                assert f["changed"] == bool(changed)
                if changed:
                    assert (f["from"], f["to"], f["shape"]) == (changed[0].colour, changed[0].change.colour, changed[0].kind)
                else:
                    assert f["yes_means_change"] == q.question.startswith("Does any")
            elif q.kind == "detail":
                (s,) = _by_name(scene, q.question)
                assert f == {"shape": s.kind, "colour": s.colour, "size": s.size, "direction": s.direction,
                             "change_to": s.change.colour if s.change else None}
                assert q.full_answer.startswith(f"The {s.size} {s.name} {q.answer[3:-1]}, and ")
                assert q.full_answer.endswith(f"changes colour to {s.change.colour}." if s.change
                                              else "keeps its colour the whole time.")


def test_every_question_asks_each_count_shape_and_colour_a_scene_allows_and_the_oracle_accepts_each_answer():
    from capdpo.oracle import judge_answer

    for seed in SEEDS:
        scene = random_scene(seed, max_shapes=4)
        asked = every_question(scene, ("count", "shape", "colour"))
        texts = [q.question for q in asked]
        assert len(texts) == len(set(texts)), "each question once"
        own = [q for q in scene_questions(scene) if q.kind in ("count", "shape", "colour")]
        assert asked[:len(own)] == own, "the scene's own questions first, in its own phrasing"
        kinds = {s.kind for s in scene.shapes}
        assert {"How many shapes appear in the video?", "How many shapes are visible at the end of the video?"} <= set(texts)
        assert {f"How many {k}s are there in the video?" for k in kinds} <= set(texts)
        assert sum(q.kind == "shape" for q in asked) >= len(scene.shapes), "the shape of each shape"
        assert sum(q.kind == "colour" for q in asked) >= len(scene.shapes), "the colour of each shape"
        for q in asked:
            assert judge_answer(q.facts, q.kind, q.answer).correct, (seed, q.question, q.answer)
    assert {q.kind for q in every_question(random_scene(0), ("count",))} == {"count"}


def test_ambiguous_scenes_are_refused():
    scene = random_scene(1, min_shapes=2, max_shapes=2, change_prob=0.0)
    check_unambiguous(scene)
    a, b = scene.shapes
    twin = Scene.from_dict({**scene.to_dict(), "shapes": [a.__dict__, {**b.__dict__, "colour": a.colour}]})
    with pytest.raises(ValueError, match="share a colour"):
        scene_questions(twin)
    same_place = Scene.from_dict({**scene.to_dict(), "shapes": [a.__dict__, {**b.__dict__, "region": a.region}]})
    with pytest.raises(ValueError, match="share a quadrant"):
        scene_qa(same_place)


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_rendered_video_shows_the_scene(tmp_path, monkeypatch, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"encoder {codec} not in this FFmpeg build")
    monkeypatch.setattr(synthetic, "video_codec", lambda: codec)  # also cover the fallback encoder
    scene = random_scene(3, width=96, height=96, n_frames=16, min_shapes=3, change_prob=1.0)
    path = render_scene(scene, tmp_path / "clip.mp4")
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == {"libx264": "h264"}.get(codec, codec)
    frames = sample_frames(path, 8)
    for f, img in zip(sample_indices(scene.n_frames, 8), frames):
        arr = np.asarray(img, dtype=np.int16)
        assert np.abs(arr[1, 1] - BACKGROUNDS[scene.background]).max() < 20  # corner: background
        for s in scene.shapes:
            x, y = s.position(f)
            centre = arr[round(y), round(x)]
            expected = PALETTE[s.colour_at(f)] if f >= s.appear else BACKGROUNDS[scene.background]
            assert np.abs(centre - expected).max() < 40, (f, s.name, centre, expected)
    assert np.array_equal(np.asarray(draw_frame(scene, 5)), np.asarray(draw_frame(scene, 5)))


def test_make_synthetic_dataset_is_idempotent(tmp_path):
    clips = make_synthetic_dataset(tmp_path / "a", n_videos=3, seed=1, width=64, height=64, n_frames=16)
    assert [c.video.id for c in clips] == ["synth_0000", "synth_0001", "synth_0002"]
    for c in clips:
        assert isinstance(c.video, Video) and c.video.source == "synthetic"
        assert c.video.video == str(tmp_path / "a" / "videos" / f"{c.video.id}.mp4")
        assert c.video.caption == caption_scene(c.scene) and c.qa == scene_qa(c.scene)
        assert len(sample_frames(c.video.video, 8)) == 8
    assert load_scenes(tmp_path / "a" / "scenes.jsonl") == {c.video.id: c.scene for c in clips}

    videos = sorted((tmp_path / "a" / "videos").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in videos]
    again = make_synthetic_dataset(tmp_path / "a", n_videos=3, seed=1, width=64, height=64, n_frames=16)
    assert [p.stat().st_mtime_ns for p in videos] == mtimes  # nothing re-rendered
    assert [(c.video, c.qa) for c in again] == [(c.video, c.qa) for c in clips]
    assert not [p for p in videos if p.name.startswith(".")]  # no temp files left

    # Same seed elsewhere: same scenes, captions and QA. Another seed: a different dataset.
    other = make_synthetic_dataset(tmp_path / "b", n_videos=3, seed=1, width=64, height=64, n_frames=16)
    assert [(c.scene, c.video.caption, c.qa) for c in other] == [(c.scene, c.video.caption, c.qa) for c in clips]
    # A different seed in the same folder re-renders, since the recorded scenes no longer match.
    make_synthetic_dataset(tmp_path / "a", n_videos=3, seed=2, width=64, height=64, n_frames=16)
    assert [p.stat().st_mtime_ns for p in videos] != mtimes


def test_bad_scene_arguments():
    with pytest.raises(ValueError, match="even"):
        random_scene(0, width=63)
    with pytest.raises(ValueError, match="max_shapes"):
        random_scene(0, max_shapes=5)
