"""CaptionJudge with a scripted LLM: re-asks, failures with reasons, resume, judge pinning."""

from __future__ import annotations

import pytest

from capdpo.config import JudgeConfig, LLMConfig
from capdpo.judge.judge import CaptionJudge, JudgeItem, judge_items
from capdpo.llm import Reply
from capdpo.records import Judgment, QAItem, RecordFile, Video


class ScriptedLLM:
    """Answers each prompt from a queue of replies keyed by a word found in the prompt."""

    backend = "scripted"

    def __init__(self, script: dict[str, list[Reply]], model_id: str = "scripted-judge"):
        self.script, self.model_id, self.prompts = script, model_id, []

    def chat(self, prompts, **_):
        self.prompts += prompts
        out = []
        for p in prompts:
            key = next(k for k in self.script if k in p)
            out.append(self.script[key].pop(0))
        return out


def item(target_id: str, answer: str) -> JudgeItem:
    return JudgeItem(target_id, target_id.split("#")[0], "A red circle moves left.", "What moves?", "A red circle.", answer)


def make_judge(script, **cfg) -> CaptionJudge:
    return CaptionJudge(JudgeConfig(llm=LLMConfig(backend="openai", model="scripted-judge"), **cfg), cache_dir=".",
                        llm=ScriptedLLM(script))


def test_scores_reasks_and_failures():
    judge = make_judge({
        "alpha": [Reply("Explanation: right.\nScore: 5", 0.1, 100, 10)],
        "beta": [Reply("I like it", 0.1), Reply("Score: 2", 0.1)],  # re-asked once, then parses
        "gamma": [Reply("Score: 9", 0.1), Reply("Score: 6.2", 0.1)],  # never valid: a failure
        "delta": [Reply("", 0.1, error="HTTP 500 after 5 tries")],  # backend gave up: no re-ask
    })
    a, b, c, d = judge.judge([item("q#0", "alpha"), item("q#1", "beta"), item("q#2", "gamma"), item("q#3", "delta")])
    assert (a.score, a.failure, a.attempts, a.prompt_tokens) == (5, None, 1, 100)
    assert (b.score, b.attempts, b.raw_reply) == (2, 2, "Score: 2")
    assert c.score is None and "no valid score" in c.failure and c.raw_reply == "Score: 6.2"
    assert d.score is None and "HTTP 500" in d.failure and d.attempts == 1
    assert all(j.template == "caption_reward" and len(j.template_hash) == 16 for j in (a, b, c, d))


def test_prompt_holds_caption_question_reference_and_cut_answer():
    judge = make_judge({"w": [Reply("Score: 3", 0.0)]}, max_answer_words=3)
    judge.judge([item("q#0", "w1 w2 w3 w4 w5")])
    prompt = judge.llm.prompts[0]
    assert "A red circle moves left." in prompt and "What moves?" in prompt and "A red circle." in prompt
    assert "w1 w2 w3" in prompt and "w4" not in prompt


def test_judge_items_resumes_and_retries_failed(tmp_path):
    out = RecordFile(tmp_path / "j.jsonl", Judgment)
    judge = make_judge({"ok": [Reply("Score: 4", 0.0)] * 3, "bad": [Reply("", 0.0, error="timeout")]})
    items = [item("q#0", "ok"), item("q#1", "ok"), item("q#2", "bad")]
    judge_items(judge, items[:2], out, batch_size=1)
    judge_items(judge, items, out, batch_size=1)  # only q#2 is new
    assert [j.id for j in out.all()] == ["q#0", "q#1", "q#2"] and out.by_id()["q#2"].failure
    judge.llm.script["bad"] = [Reply("Score: 1", 0.0)]
    judged = judge_items(judge, items, out, batch_size=1, retry_failed=True)
    assert sorted(j.id for j in judged) == ["q#0", "q#1", "q#2"] and out.by_id()["q#2"].score == 1


def test_resuming_with_another_judge_is_refused(tmp_path):
    out = RecordFile(tmp_path / "j.jsonl", Judgment)
    judge_items(make_judge({"x": [Reply("Score: 4", 0.0)]}), [item("q#0", "x")], out)
    other = make_judge({"x": [Reply("Score: 4", 0.0)]}, max_answer_words=10)
    with pytest.raises(ValueError, match="another judge"):
        judge_items(other, [item("q#1", "x")], out)


def test_for_protocol_shares_llms_and_budget():
    judge = make_judge({"x": [Reply("Score: 4", 0.0), Reply("{'pred': 'yes', 'score': 5}", 0.0)]})
    assert judge.for_protocol("caption_reward") is judge
    other = judge.for_protocol("video_chatgpt")
    assert other is judge.for_protocol("video_chatgpt")  # made once
    assert other.llm is judge.llm and other.budget is judge.budget and other.template.name == "video_chatgpt"
    judge.judge([item("q#0", "x")])
    [verdict] = other.judge([item("q#1", "x")])
    assert (verdict.score, verdict.verdict) == (5, "yes") and judge.budget.used.requests == 2


def test_batch_size_keeps_a_remote_backend_busy():
    remote = LLMConfig(backend="openai", model="scripted-judge", batch_size=4, concurrency=32)
    local = LLMConfig(backend="hf", model="scripted-judge", batch_size=4, concurrency=32)
    assert [CaptionJudge(JudgeConfig(llm=cfg), ".", llm=ScriptedLLM({})).batch_size for cfg in (remote, local)] == [32, 4]


def test_judge_item_for_answer():
    video = Video(id="v", video="v.mp4", caption="A red circle moves left.")
    qa = QAItem(id="v_0", video_id="v", question="What moves?", answer="A red circle.")
    assert JudgeItem.for_answer(video, qa, "a circle", "v_0#3") == JudgeItem(
        "v_0#3", "v_0", "A red circle moves left.", "What moves?", "A red circle.", "a circle", "v.mp4", "v")
