"""Preference pairs: best vs worst per question, thresholds, ties, failed judgments, stats."""

from __future__ import annotations

import json

import pytest

from capdpo.config import JudgeConfig, LLMConfig, PairsConfig
from capdpo.judge.judge import CaptionJudge
from capdpo.judge.stage import run_judge
from capdpo.llm import Reply
from capdpo.pairs import PairStats, build_pairs, run_pairs, select_pair, select_pairs
from capdpo.records import Candidate, Judgment, PreferencePair, QAItem, RecordError, RecordFile, Video

CFG = PairsConfig()  # min_gap 1, min_chosen 3, max_rejected 3


def cand(qa_id: str, k: int, answer: str | None = None) -> Candidate:
    return Candidate(id=f"{qa_id}#{k}", qa_id=qa_id, video_id=qa_id.rsplit("_", 1)[0], answer=answer or f"{qa_id} answer {k}",
                     model="m", seed=k, temperature=1.0, top_p=0.95)


def judgment(c: Candidate, score: float | None) -> Judgment:
    return Judgment(id=c.id, target_id=c.id, qa_id=c.qa_id, score=score,
                    failure=None if score is not None else "no valid score 1-5 in reply after 2 attempt(s)",
                    judge_backend="hf", judge_model="j", template="caption_reward", template_hash="t", prompt_hash="p")


def world(scores: dict[str, list[float | None]]):
    """Videos, QA, candidates and their scores ({candidate id: score}, as the judgments give them)
    for {qa_id: [score of candidate 0, 1, ...]}."""
    videos, qa, cands, judged = {}, {}, [], {}
    for qa_id, row in scores.items():
        vid = qa_id.rsplit("_", 1)[0]
        videos[vid] = Video(id=vid, video=f"/data/{vid}.mp4", caption=f"caption of {vid}")
        qa[qa_id] = QAItem(id=qa_id, video_id=vid, question=f"question {qa_id}?", answer=f"reference {qa_id}.")
        for k, s in enumerate(row):
            c = cand(qa_id, k)
            cands.append(c)
            if s != "missing":
                judged[c.id] = judgment(c, s).score
    return videos, qa, cands, judged


def scored(*scores: float) -> list[tuple[Candidate, float]]:
    return [(cand("v_0", k), s) for k, s in enumerate(scores)]


def test_select_pair_takes_best_and_worst():
    (best, bs), (worst, ws) = select_pair(scored(3, 5, 1, 4), CFG)
    assert (best.id, bs, worst.id, ws) == ("v_0#1", 5, "v_0#2", 1)


def test_select_pair_reasons():
    assert select_pair([], CFG) == "no_scored_candidates"
    assert select_pair(scored(5), CFG) == "no_scored_candidates"
    assert select_pair(scored(3, 3, 3), CFG) == "ties"
    assert select_pair(scored(1, 1), CFG) == "ties"
    assert select_pair(scored(2, 1), CFG) == "below_thresholds"  # best below min_chosen
    assert select_pair(scored(5, 4), CFG) == "below_thresholds"  # worst above max_rejected


def test_select_pairs_one_per_question_is_select_pair():
    assert select_pairs(scored(3, 5, 1, 4), CFG) == [select_pair(scored(3, 5, 1, 4), CFG)]
    assert select_pairs(scored(3, 3), PairsConfig(per_question=4)) == "ties"


def test_select_pairs_widest_gaps_first_with_fresh_answers_before_reuse():
    # oracle-like 0/1 scores: right answers #1 and #3, wrong #0, #2 and #4
    cfg = PairsConfig(min_gap=1, min_chosen=1, max_rejected=0, per_question=4)
    picked = select_pairs(scored(0, 1, 0, 1, 0), cfg)
    ids = [(c.id.split("#")[1], r.id.split("#")[1]) for (c, _), (r, _) in picked]
    assert ids == [("1", "0"), ("3", "2"), ("1", "2"), ("1", "4")]  # best vs worst, then fresh #3 vs #2, then reuse
    graded = select_pairs(scored(5, 4, 1, 2), PairsConfig(min_gap=1, min_chosen=3, max_rejected=3, per_question=10))
    assert [(c[1], r[1]) for c, r in graded] == [(5, 1), (4, 2), (5, 2), (4, 1)]  # 4 is above max_rejected: never rejected
    assert all(c[1] - r[1] >= 1 and c[1] >= 3 and r[1] <= 3 for c, r in graded)


def test_select_pairs_skips_pairs_of_the_same_two_texts():
    same = [(cand("v_0", 0, "right"), 1.0), (cand("v_0", 1, "right"), 1.0), (cand("v_0", 2, "wrong"), 0.0)]
    picked = select_pairs(same, PairsConfig(min_gap=1, min_chosen=1, max_rejected=0, per_question=3))
    assert len(picked) == 1


def test_build_pairs_gives_each_extra_pair_its_own_id():
    videos, qa, cands, judged = world({"v_0": [5, 1, 4, 2]})
    pairs, stats = build_pairs(videos, qa, cands, judged, PairsConfig(per_question=3))
    assert [p.id for p in pairs] == ["v_0", "v_0/1", "v_0/2"] and stats.pairs == 3
    assert len({(p.chosen, p.rejected) for p in pairs}) == 3


@pytest.mark.parametrize("best,worst,cfg,ok", [
    (4, 3, PairsConfig(min_gap=1), True),
    (4, 3, PairsConfig(min_gap=2), False),
    (5, 3, PairsConfig(min_gap=2), True),
    (3, 2, PairsConfig(min_chosen=3), True),
    (3, 2, PairsConfig(min_chosen=4), False),
    (3, 1, PairsConfig(max_rejected=1, min_chosen=3), True),
    (4, 2, PairsConfig(max_rejected=1), False),
    (3.5, 3.0, PairsConfig(min_gap=0.5), True),
    (3.5, 3.0, PairsConfig(min_gap=1.0), False),
])
def test_thresholds_are_inclusive(best, worst, cfg, ok):
    picked = select_pair(scored(worst, best), cfg)
    if ok:
        assert not isinstance(picked, str) and picked[0][1] == best and picked[1][1] == worst
    else:
        assert picked == "below_thresholds"


def test_ties_among_best_and_worst_break_to_the_earliest_sample():
    (best, _), (worst, _) = select_pair(scored(1, 5, 1, 5, 3), CFG)
    assert (best.id, worst.id) == ("v_0#1", "v_0#0")
    # the same input always gives the same pair
    assert all(select_pair(scored(1, 5, 1, 5, 3), CFG)[0][0].id == "v_0#1" for _ in range(5))


def test_build_pairs_rows_and_stats():
    videos, qa, cands, judged = world({
        "a_0": [2, 5, 4],         # pair: #1 (5) over #0 (2)
        "a_1": [3, 3, 3],         # all tied
        "b_0": [4, 5],            # worst 4 > max_rejected
        "b_1": [None, 5, None],   # failed judgments are ignored: only one scored candidate
        "c_0": [None, 4, None, 1],  # failed judgments ignored, the scored ones still pair
        "c_1": ["missing", "missing"],  # never judged
    })
    pairs, stats = build_pairs(videos, qa, cands, judged, CFG)
    assert [p.id for p in pairs] == ["a_0", "c_0"]
    p = pairs[0]
    assert isinstance(p, PreferencePair)
    assert (p.qa_id, p.video_id, p.video) == ("a_0", "a", "/data/a.mp4")
    assert (p.prompt, p.answer) == ("question a_0?", "reference a_0.")
    assert (p.chosen, p.rejected) == ("a_0 answer 1", "a_0 answer 0")
    assert (p.chosen_id, p.rejected_id, p.chosen_score, p.rejected_score) == ("a_0#1", "a_0#0", 5, 2)
    assert (pairs[1].chosen_id, pairs[1].rejected_id) == ("c_0#1", "c_0#3")
    assert stats == PairStats(questions=6, pairs=2, no_scored_candidates=2, ties=1, below_thresholds=1)
    assert stats.pairs + stats.ties + stats.below_thresholds + stats.no_scored_candidates == stats.questions
    assert str(stats) == ("2 pairs from 6 questions (dropped: 1 all tied, 1 outside score thresholds, "
                          "2 without 2 scored candidates)")


def test_failed_judgment_never_becomes_the_rejected_answer():
    videos, qa, cands, judged = world({"a_0": [None, 5, 3]})
    [p], _ = build_pairs(videos, qa, cands, judged, CFG)
    assert p.rejected_id == "a_0#2" and p.rejected_score == 3


def test_build_pairs_is_deterministic():
    videos, qa, cands, judged = world({"a_0": [1, 5, 5, 1], "a_1": [2, 4, 2, 4]})
    first = build_pairs(videos, qa, cands, judged, CFG)
    assert build_pairs(videos, qa, cands, judged, CFG) == first
    assert [(p.chosen_id, p.rejected_id) for p in first[0]] == [("a_0#1", "a_0#0"), ("a_1#1", "a_1#0")]


def test_run_pairs_rewrites_the_file(tmp_path):
    videos, qa, cands, judged = world({"a_0": [1, 5], "b_0": [3, 3]})
    vf, qf = RecordFile(tmp_path / "videos.jsonl", Video), RecordFile(tmp_path / "qa.jsonl", QAItem)
    cf, jf = RecordFile(tmp_path / "candidates.jsonl", Candidate), RecordFile(tmp_path / "judgments.jsonl", Judgment)
    out = RecordFile(tmp_path / "pairs.jsonl", PreferencePair)
    by_id = {c.id: c for c in cands}
    vf.write(videos.values()), qf.write(qa.values()), cf.write(cands), jf.write(judgment(by_id[i], s) for i, s in judged.items())
    stats = run_pairs(vf, qf, cf, jf, out, CFG)
    assert stats.pairs == 1 and [p.id for p in out.read()] == ["a_0"]
    run_pairs(vf, qf, cf, jf, out, CFG)  # a rerun does not duplicate
    assert [p.id for p in out.read()] == ["a_0"]


class ScoresTwoJudgeLLM:
    """A judge LLM that gives every answer a 2."""

    backend, model_id = "scripted", "scripted-judge"

    def chat(self, prompts, **_):
        return [Reply("Explanation: so-so.\nScore: 2", 0.0) for _ in prompts]


@pytest.mark.parametrize("edit", ["score 7", "conflicting duplicate"])
def test_a_judgment_that_cannot_be_right_is_refused_alike_by_pairs_and_by_the_judge(tmp_path, edit):
    """A hand-edited score of 7 used to become a pair with chosen score 7; a second, different
    judgment of one answer was read last-wins by pairs and first-wins by judge."""
    videos, qa, cands, _ = world({"a_0": [None, None, None]})
    vf, qf = RecordFile(tmp_path / "videos.jsonl", Video), RecordFile(tmp_path / "qa.jsonl", QAItem)
    cf, jf = RecordFile(tmp_path / "candidates.jsonl", Candidate), RecordFile(tmp_path / "judgments.jsonl", Judgment)
    vf.write(videos.values()), qf.write(qa.values()), cf.write(cands)
    judge = CaptionJudge(JudgeConfig(llm=LLMConfig(backend="openai", model="scripted-judge")), tmp_path, llm=ScoresTwoJudgeLLM())
    run_judge(vf, qf, cf, jf, judge)
    lines = jf.path.read_text().splitlines()
    if edit == "score 7":
        lines[1] = json.dumps({**json.loads(lines[1]), "score": 7.0})
        expected = f"{jf.path}:2: malformed Judgment row: score: 7.0 is outside the caption_reward scale 1-5"
    else:
        lines.append(json.dumps({**json.loads(lines[0]), "score": 5.0}))
        expected = f"{jf.path}:4: id 'a_0#0' is already on line 1 with different content"
    jf.path.write_text("\n".join(lines) + "\n")

    out = RecordFile(tmp_path / "pairs.jsonl", PreferencePair)
    with pytest.raises(RecordError) as by_pairs:
        run_pairs(vf, qf, cf, jf, out, CFG)
    with pytest.raises(RecordError) as by_judge:
        run_judge(vf, qf, cf, jf, judge)
    assert str(by_pairs.value).startswith(expected) and str(by_judge.value) == str(by_pairs.value)
    assert not out.exists()


class OrderAwareJudgeLLM:
    """Prefers whichever answer contains 'right'; with ``biased`` always says the first one."""

    backend, model_id = "scripted", "pairwise-judge"

    def __init__(self, biased: bool = False):
        self.biased = biased

    def chat(self, prompts, **_):
        from capdpo.llm import Reply

        out = []
        for p in prompts:
            first = p.split("4. Answer 1:")[1].split("5. Answer 2:")[0]
            out.append(Reply("Better: 1" if self.biased or "right" in first else "Better: 2", 0.0))
        return out


@pytest.mark.parametrize("biased, kept", [(False, 1), (True, 0)])
def test_pairwise_check_keeps_pairs_confirmed_in_both_orders(biased, kept):
    from capdpo.config import JudgeConfig, LLMConfig
    from capdpo.judge.judge import CaptionJudge
    from capdpo.pairs import confirm_pairwise

    judge = CaptionJudge(JudgeConfig(llm=LLMConfig(backend="openai", model="pairwise-judge")), ".", llm=OrderAwareJudgeLLM(biased))
    pair = PreferencePair(id="v_0", qa_id="v_0", video_id="v", video="v.mp4", prompt="Q?", answer="A.", chosen="right answer",
                          rejected="wrong answer", chosen_score=5, rejected_score=1, chosen_id="v_0#0", rejected_id="v_0#1")
    stats = PairStats(pairs=1)
    qa = {"v_0": QAItem(id="v_0", video_id="v", question="Q?", answer="A.")}
    out = confirm_pairwise([pair], {"v": Video(id="v", video="v.mp4", caption="c")}, qa, judge, stats)
    assert len(out) == kept == stats.pairs
    assert stats.pairwise_rejected == 1 - kept  # a position-biased judge confirms nothing
