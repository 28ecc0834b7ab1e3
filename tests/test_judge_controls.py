"""Judge controls with scripted LLMs: self-consistency, ensembles, budget ceilings, estimates."""

from __future__ import annotations

import math

import pytest
from test_judge import ScriptedLLM, item

from capdpo.config import JudgeConfig, LLMConfig
from capdpo.errors import BudgetExceeded
from capdpo.judge.budget import count_tokens
from capdpo.judge.judge import CaptionJudge, check_same_judge, judge_items
from capdpo.judge.stage import estimate
from capdpo.llm import Reply
from capdpo.records import Judgment, RecordFile

MAIN = LLMConfig(backend="openai", model="scripted-judge")


class RecordingLLM(ScriptedLLM):
    """A ScriptedLLM that also keeps the sampling settings of each call."""

    def __init__(self, script, model_id="scripted-judge"):
        super().__init__(script, model_id)
        self.calls = []

    def chat(self, prompts, **params):
        self.calls.append(params)
        return super().chat(prompts)


def replies(*texts: str, tokens: tuple[int, int] = (0, 0)) -> list[Reply]:
    return [Reply(t, 0.1, *tokens) for t in texts]


def make_judge(script, members=(), **cfg) -> CaptionJudge:
    ensemble = [LLMConfig(backend="openai", model=m.model_id) for m in members]
    return CaptionJudge(JudgeConfig(llm=MAIN, ensemble=ensemble, **cfg), cache_dir=".", llm=RecordingLLM(script),
                        members=list(members))


# -- self-consistency ------------------------------------------------------------------------

def test_samples_are_sampled_with_distinct_seeds_and_averaged():
    judge = make_judge({"alpha": replies("Score: 5", "Score: 4", "Score: 4")}, samples=3, sample_temperature=0.9, seed=7)
    [j] = judge.judge([item("q#0", "alpha")])
    assert j.score == pytest.approx(4.3333) and j.score_samples == [5.0, 4.0, 4.0]
    assert j.score_spread == pytest.approx(0.4714, abs=1e-4)  # population std of 5, 4, 4
    assert j.failure is None and j.attempts == 3
    assert [c["seed"] for c in judge.llm.calls] == [7, 8, 9]
    assert {c["temperature"] for c in judge.llm.calls} == {0.9}
    assert j.params["samples"] == 3 and j.params["temperature"] == 0.9
    assert "[sample 1] Score: 5" in j.raw_reply and "[sample 3] Score: 4" in j.raw_reply


def test_median_aggregate():
    judge = make_judge({"alpha": replies("Score: 1", "Score: 5", "Score: 4")}, samples=3, aggregate="median")
    [j] = judge.judge([item("q#0", "alpha")])
    assert j.score == 4 and j.score_samples == [1.0, 5.0, 4.0]


def test_invalid_samples_are_dropped_not_invented():
    judge = make_judge({"alpha": replies("Score: 2", "Score: 9", "no idea") + [Reply("", 0.1, error="timeout")]},
                       samples=4, retries=0)
    [j] = judge.judge([item("q#0", "alpha")])
    assert j.score == 2 and j.score_samples == [2.0] and j.score_spread == 0.0 and j.failure is None
    assert "(backend failed: timeout)" in j.raw_reply


def test_unparsed_samples_are_reasked_and_no_valid_sample_is_a_failure():
    judge = make_judge({"alpha": replies("Score: 7", "hmm", "Score: 0", "still no")}, samples=2, retries=1)
    [j] = judge.judge([item("q#0", "alpha")])
    assert j.score is None and j.score_samples == [] and j.score_spread is None
    assert "no valid score 1-5 in any of 2 replies (4 attempts)" in j.failure
    assert judge.llm.calls[-1]["temperature"] == 0.0  # the re-ask only restates the score


def test_single_sample_keeps_the_plain_record():
    judge = make_judge({"alpha": replies("Score: 3")})
    [j] = judge.judge([item("q#0", "alpha")])
    assert (j.score, j.score_samples, j.score_spread, j.judge_scores, j.raw_reply) == (3, [], None, {}, "Score: 3")
    assert judge.llm.calls == [{"temperature": 0.0, "max_new_tokens": 256, "seed": None}]
    assert j.params == {"mode": "generate", "temperature": 0.0, "max_new_tokens": 256, "max_answer_words": 256}


# -- ensemble --------------------------------------------------------------------------------

def test_ensemble_mean_of_valid_judges_and_per_judge_scores():
    b = ScriptedLLM({"alpha": replies("Score: 2"), "beta": replies("nothing", "nothing")}, model_id="judge-b")
    c = ScriptedLLM({"alpha": [Reply("", 0.1, error="HTTP 500")], "beta": replies("Score: 1")}, model_id="judge-c")
    judge = make_judge({"alpha": replies("Score: 5"), "beta": replies("Score: 4")}, members=[b, c])
    ja, jb = judge.judge([item("q#0", "alpha"), item("q#1", "beta")])
    assert ja.judge_scores == {"scripted:scripted-judge": 5, "scripted:judge-b": 2, "scripted:judge-c": None}
    assert ja.score == 3.5 and ja.score_samples == [5.0, 2.0] and ja.failure is None
    assert jb.judge_scores == {"scripted:scripted-judge": 4, "scripted:judge-b": None, "scripted:judge-c": 1}
    assert jb.score == 2.5 and jb.attempts == 4  # judge-b was re-asked once
    assert ja.judge_model == "ensemble(scripted:scripted-judge,scripted:judge-b,scripted:judge-c)"
    assert "[scripted:judge-c] (backend failed: HTTP 500)" in ja.raw_reply


def test_ensemble_fails_only_when_every_judge_fails():
    b = ScriptedLLM({"alpha": [Reply("", 0.1, error="timeout")]}, model_id="judge-b")
    judge = make_judge({"alpha": [Reply("", 0.1, error="HTTP 503")]}, members=[b])
    [j] = judge.judge([item("q#0", "alpha")])
    assert j.score is None and j.failure == "judge backend failed on all 2 requests: HTTP 503"


def test_ensemble_is_pinned_on_resume(tmp_path):
    out = RecordFile(tmp_path / "j.jsonl", Judgment)
    b = ScriptedLLM({"alpha": replies("Score: 3")}, model_id="judge-b")
    judge_items(make_judge({"alpha": replies("Score: 4")}, members=[b]), [item("q#0", "alpha")], out)
    check_same_judge(make_judge({}, members=[ScriptedLLM({}, model_id="judge-b")]), out)  # same ensemble: fine
    for other in ([], [ScriptedLLM({}, model_id="judge-z")]):
        with pytest.raises(ValueError, match="another judge"):
            check_same_judge(make_judge({}, members=other), out)


def test_ensemble_refuses_a_repeated_judge():
    with pytest.raises(ValueError, match="repeats"):
        make_judge({}, members=[ScriptedLLM({}, model_id="x"), ScriptedLLM({}, model_id="x")])


# -- budget ----------------------------------------------------------------------------------

def test_max_requests_stops_cleanly_saves_everything_and_resumes(tmp_path):
    out = RecordFile(tmp_path / "j.jsonl", Judgment)
    items = [item(f"q#{i}", "alpha") for i in range(5)]
    judge = make_judge({"alpha": replies(*["Score: 4"] * 5)}, max_requests=3)
    with pytest.raises(BudgetExceeded, match=r"max_requests=3.*2 answer\(s\) not sent") as e:
        judge_items(judge, items, out, batch_size=2)
    assert str(out.path) in str(e.value)
    assert [j.id for j in out.all()] == ["q#0", "q#1", "q#2"]  # the affordable part of batch 2 is saved
    assert len(judge.llm.prompts) == 3 and judge.budget.used.requests == 3
    more = make_judge({"alpha": replies(*["Score: 5"] * 2)}, max_requests=3)  # a new run, a new budget
    judged = judge_items(more, items, out, batch_size=2)
    assert [j.id for j in judged] == [f"q#{i}" for i in range(5)] and len(more.llm.prompts) == 2


def test_ceiling_counts_samples_and_ensemble_members(tmp_path):
    out = RecordFile(tmp_path / "j.jsonl", Judgment)
    b = ScriptedLLM({"alpha": replies(*["Score: 2"] * 4)}, model_id="judge-b")
    judge = make_judge({"alpha": replies(*["Score: 4"] * 4)}, members=[b], samples=2, max_requests=5)
    with pytest.raises(BudgetExceeded):
        judge_items(judge, [item("q#0", "alpha"), item("q#1", "alpha")], out)
    assert [j.id for j in out.all()] == ["q#0"] and judge.budget.used.requests == 4


def test_a_reask_that_does_not_fit_is_a_recorded_failure_and_stops(tmp_path):
    out = RecordFile(tmp_path / "j.jsonl", Judgment)
    judge = make_judge({"alpha": replies("Score: 4"), "beta": replies("unsure")}, max_requests=2)
    with pytest.raises(BudgetExceeded, match=r"1 answer\(s\) whose re-ask did not fit"):
        judge_items(judge, [item("q#0", "alpha"), item("q#1", "beta")], out)
    saved = out.by_id()
    assert saved["q#0"].score == 4
    assert saved["q#1"].score is None and "re-ask not sent, budget reached: judge.max_requests=2" in saved["q#1"].failure


def test_token_and_cost_ceilings_use_estimates_then_reported_usage(tmp_path):
    prompt_tokens = math.ceil(len(make_judge({}).render(item("q#0", "alpha"))) / 4)
    per_item = prompt_tokens + 10  # completion estimated at max_new_tokens
    llm = LLMConfig(backend="openai", model="scripted-judge", max_new_tokens=10)
    script = {"alpha": replies(*["Score: 3"] * 3, tokens=(prompt_tokens, 10))}
    judge = CaptionJudge(JudgeConfig(llm=llm, max_tokens=2 * per_item), ".", llm=ScriptedLLM(script))
    assert judge.affordable([item(f"q#{i}", "alpha") for i in range(3)]) == 2
    assert "judge.max_tokens" in judge.budget.exhausted
    prices = {"scripted-judge": (1_000_000.0, 0.0)}  # $1 per prompt token: cost = prompt tokens
    judge = CaptionJudge(JudgeConfig(llm=llm, price_per_million=prices, max_cost_usd=prompt_tokens * 1.5), ".",
                         llm=ScriptedLLM(script))
    out = RecordFile(tmp_path / "j.jsonl", Judgment)
    with pytest.raises(BudgetExceeded, match="judge.max_cost_usd"):
        judge_items(judge, [item(f"q#{i}", "alpha") for i in range(3)], out, batch_size=1)
    assert len(out.all()) == 1 and judge.budget.used.cost_usd == pytest.approx(prompt_tokens)


def test_cost_ceiling_needs_a_price_for_every_judge():
    with pytest.raises(ValueError, match=r"price_per_million for \['judge-b'\]"):
        make_judge({}, members=[ScriptedLLM({}, model_id="judge-b")], max_cost_usd=1.0,
                   price_per_million={"scripted-judge": (1.0, 2.0)})


def test_judge_alone_refuses_items_past_the_budget_before_sending():
    judge = make_judge({"alpha": replies("Score: 4")}, max_requests=1)
    with pytest.raises(BudgetExceeded, match="max_requests=1"):
        judge.judge([item("q#0", "alpha"), item("q#1", "alpha")])
    assert judge.llm.prompts == []


# -- estimate --------------------------------------------------------------------------------

def test_estimate_counts_requests_tokens_and_cost():
    b = ScriptedLLM({}, model_id="judge-b")
    prices = {"scripted-judge": (2.0, 10.0), "judge-b": (1.0, 1.0)}
    judge = make_judge({}, members=[b], samples=2, price_per_million=prices, max_requests=10)
    items = [item("q#0", "short"), item("q#1", "a much longer answer " * 20)]
    chars = [math.ceil(len(judge.render(it)) / 4) for it in items]
    est = estimate(judge, items)
    assert est["items"] == 2 and est["requests"] == 2 * 2 * 2 and est["images"] == 0
    assert est["judges"]["scripted:scripted-judge"]["prompt_tokens"] == 2 * sum(chars)
    assert est["prompt_tokens"] == 4 * sum(chars) and est["completion_tokens"] == 8 * 256
    main_cost = (2 * sum(chars) * 2.0 + 4 * 256 * 10.0) / 1e6
    b_cost = (2 * sum(chars) + 4 * 256) / 1e6
    assert est["cost_usd"] == pytest.approx(main_cost + b_cost)
    assert est["over_budget"] is None  # 8 requests fit in max_requests=10
    assert judge.llm.prompts == [] and b.prompts == []  # a dry run sends nothing


def test_estimate_without_price_has_no_cost_and_flags_the_budget():
    judge = make_judge({}, max_requests=1)
    est = estimate(judge, [item("q#0", "x"), item("q#1", "y")])
    assert est["cost_usd"] is None and est["over_budget"] == "judge.max_requests=1: this run would need 2 requests"


class FakeTokenizer:
    """Chat template + word-split tokenizer: enough to check the hf estimate path."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<user> " + messages[0]["content"] + " <assistant>"

    def __call__(self, text, add_special_tokens):
        return {"input_ids": text.split()}


def test_hf_prompt_tokens_come_from_the_tokenizer():
    class HFLike:
        backend, model_id, tokenizer = "hf", "tiny", FakeTokenizer()

    class Cached:  # a CachedLLM-like wrapper keeps the backend in .llm
        backend, model_id, llm = "hf", "tiny", HFLike()

    assert count_tokens(HFLike(), "one two three") == 5 and count_tokens(Cached(), "one two") == 4
    assert count_tokens(ScriptedLLM({}), "x" * 9) == 3
