"""The train/test split by video: what split_test_ids guarantees (and what it does not); which synthetic
questions a clip keeps."""

from __future__ import annotations

import random

import pytest

from capdpo.config import SYNTHETIC_KINDS, DataConfig
from capdpo.data import collect, kept_questions, split_test_ids

IDS = [f"video_{i:03d}" for i in range(200)]


def test_deterministic_and_order_independent():
    test = split_test_ids(IDS, 0.25, seed=0)
    assert split_test_ids(IDS, 0.25, seed=0) == test
    shuffled = IDS[:]
    random.Random(1).shuffle(shuffled)
    assert split_test_ids(shuffled, 0.25, seed=0) == test
    assert test <= set(IDS)


@pytest.mark.parametrize("n,fraction,size", [(200, 0.25, 50), (10, 0.25, 2), (10, 0.35, 4), (7, 0.5, 4), (3, 0.0, 0), (3, 1.0, 3),
                                             (0, 0.25, 0), (1, 0.25, 0)])
def test_size_is_round_fraction_times_n(n, fraction, size):
    assert len(split_test_ids(IDS[:n], fraction, seed=0)) == size == round(fraction * n)


def test_seed_changes_the_split():
    assert split_test_ids(IDS, 0.25, seed=0) != split_test_ids(IDS, 0.25, seed=1)


def test_growing_the_fraction_only_adds_videos():
    # the split is a prefix of one seeded ranking, so splits of the same ids are nested
    previous: set[str] = set()
    for fraction in (0.1, 0.2, 0.3, 0.5):
        test = split_test_ids(IDS, fraction, seed=3)
        assert previous <= test
        previous = test


def test_adding_videos_keeps_the_ranking():
    """A video's rank depends only on (seed, id), so after adding videos the old videos' test
    set is still a prefix of the same ranking: the old and new test sets, restricted to the
    old videos, are always nested. The count is recomputed, so this is NOT a guarantee that every
    old test video stays in test: new videos ranked ahead of it can push it out."""
    rng = random.Random(0)
    for trial in range(50):
        old = rng.sample(IDS, rng.randint(0, 60))
        new = old + [f"new_{trial}_{i}" for i in range(rng.randint(1, 40))]
        before = split_test_ids(old, 0.25, seed=trial)
        after = split_test_ids(new, 0.25, seed=trial) & set(old)
        assert before <= after or after <= before


def test_adding_videos_can_move_an_old_test_video_to_train():
    # documents the limit of the guarantee above (see the docstring)
    old = IDS[:4]
    [held] = split_test_ids(old, 0.25, seed=0)
    for i in range(1000):
        extra = f"extra_{i}"
        if split_test_ids([held, extra], 0.5, seed=0) == {extra}:  # extra ranks ahead of the held-out video
            break
    else:
        pytest.fail("no id ranked ahead of the held-out video")
    assert split_test_ids(old + [extra], 0.25, seed=0) == {extra}  # round(1.25) = 1: the old one is now train


def _kinds(qa) -> list[str]:
    return [q.source.removeprefix("scene:") for q in qa]


def test_synthetic_kinds_are_kept_before_the_draw_with_their_ids(tmp_path):
    every = collect(DataConfig(synthetic_videos=3), tmp_path)
    assert all(_kinds(qa)[-1] == "detail" for _, qa in every)
    some = collect(DataConfig(synthetic_videos=3, synthetic_kinds=["detail", "motion"]), tmp_path)
    for (_, all_qa), (_, qa) in zip(every, some):
        # same items, ids included: an id's index is the question's place among all the scene's questions
        assert qa == [q for q in all_qa if _kinds([q])[0] in ("motion", "detail")]
    one = collect(DataConfig(synthetic_videos=3, synthetic_kinds=["detail"], synthetic_questions=1), tmp_path)
    assert [_kinds(qa) for _, qa in one] == [["detail"]] * 3
    # Without the detail kind the per-clip draw is the one made before the kind existed.
    older = [k for k in SYNTHETIC_KINDS if k != "detail"]
    drawn = collect(DataConfig(synthetic_videos=3, synthetic_kinds=older, synthetic_questions=2), tmp_path)
    for (video, all_qa), (_, qa) in zip(every, drawn):
        kept = kept_questions(len(all_qa) - 1, 2, f"0:{video.id}")
        assert [q.id for q in qa] == [f"{video.id}_{i}" for i in sorted(kept)]
