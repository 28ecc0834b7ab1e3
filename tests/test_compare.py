"""Comparison tables: the pure comparison on hand-made outcomes, and reading run folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from capdpo.cli import app
from capdpo.evaluation.compare import (
    MEAN,
    DatasetResult,
    System,
    compare,
    format_markdown,
    load_system,
    parse_spec,
)
from capdpo.records import EvalSummary, Judgment
from capdpo.rundir import RunPaths
from capdpo.stats import bootstrap_diff

OFFICIAL = ["msvd_qa", "msrvtt_qa", "tgif_qa"]


def result(dataset: str, correct: list[int], scores: list[float] | None = None, ids: list[str] | None = None,
           judge: str = "gpt-3.5-turbo-0613 · video_chatgpt 1a2b3c4d", failed: int = 0) -> DatasetResult:
    ids = ids or [f"{dataset}-{i}" for i in range(len(correct))]
    scores = scores or [4.0 if c else 1.0 for c in correct]
    return DatasetResult(dataset, dict(zip(ids, map(float, correct))), dict(zip(ids, scores)), questions=len(ids) + failed,
                         failed=failed, judge=judge)


def system(label: str, **per_dataset: list[int]) -> System:
    return System(label, {d: result(d, c) for d, c in per_dataset.items()})


def test_paired_difference_and_interval():
    base = [1] * 60 + [0] * 40
    better = [1] * 60 + [1] * 10 + [0] * 30  # right on 10 more of the same 100 questions
    table = compare([system("sft", msvd_qa=base), system("dpo", msvd_qa=better)], resamples=2000, seed=1)
    d = table.accuracy_diff["dpo"]["msvd_qa"]
    assert d.value == pytest.approx(0.10) and d.paired is True
    # paired: only the 10 discordant questions vary, so the interval is about +-2 sd of a binomial share
    sd = np.sqrt(0.1 * 0.9 / 100)
    assert d.low == pytest.approx(0.10 - 1.96 * sd, abs=0.02) and d.high == pytest.approx(0.10 + 1.96 * sd, abs=0.02)
    assert d.low > 0
    again = compare([system("sft", msvd_qa=base), system("dpo", msvd_qa=better)], resamples=2000, seed=1)
    assert again.accuracy_diff["dpo"]["msvd_qa"] == d  # seeded
    s = table.score_diff["dpo"]["msvd_qa"]
    assert s.value == pytest.approx(0.3) and s.low <= 0.3 <= s.high  # 10 answers from 1 to 4 points: +0.3 mean score


def test_identical_systems_differ_by_exactly_zero():
    table = compare([system("a", msvd_qa=[1, 0, 1, 1]), system("b", msvd_qa=[1, 0, 1, 1])])
    d = table.accuracy_diff["b"]["msvd_qa"]
    assert (d.value, d.low, d.high, d.paired) == (0.0, 0.0, 0.0, True)


def test_different_questions_use_an_unpaired_bootstrap():
    a = System("a", {"msvd_qa": result("msvd_qa", [1, 0] * 20, ids=[f"x{i}" for i in range(40)])})
    b = System("b", {"msvd_qa": result("msvd_qa", [1, 1, 0] * 10, ids=[f"y{i}" for i in range(30)])})
    d = compare([a, b], resamples=500).accuracy_diff["b"]["msvd_qa"]
    assert d.paired is False and d.value == pytest.approx(2 / 3 - 1 / 2) and d.low < d.value < d.high


def test_bootstrap_diff_shapes():
    rng = np.random.default_rng(0)
    reps, paired = bootstrap_diff({"q1": 1.0, "q2": 0.0}, {"q1": 1.0, "q2": 1.0}, rng, 100)
    assert reps.shape == (100,) and paired and set(np.round(reps, 6)) <= {0.0, 0.5, 1.0}
    assert bootstrap_diff({}, {"q1": 1.0}, rng, 10) is None


def test_mean_accuracy_column_needs_every_dataset():
    full = system("sft", msvd_qa=[1, 1, 0, 0], msrvtt_qa=[1, 0, 0, 0], tgif_qa=[1, 1, 1, 0])
    dpo = system("dpo", msvd_qa=[1, 1, 1, 0], msrvtt_qa=[1, 1, 0, 0], tgif_qa=[1, 1, 1, 1])
    partial = system("partial", msvd_qa=[1, 1, 1, 1])
    table = compare([full, dpo, partial], OFFICIAL, resamples=200)
    assert table.mean_accuracy(full) == pytest.approx((0.5 + 0.25 + 0.75) / 3)
    assert table.mean_accuracy(dpo) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    mean = table.accuracy_diff["dpo"][MEAN]
    assert mean.value == pytest.approx(0.25) and mean.paired and mean.low <= 0.25 <= mean.high
    assert table.mean_accuracy(partial) is None and table.accuracy_diff["partial"][MEAN].value is None
    assert table.accuracy_diff["partial"]["msrvtt_qa"].value is None


def test_markdown_has_the_papers_layout():
    sft = system("LLaVA-Hound-SFT", msvd_qa=[1, 1, 1, 0], msrvtt_qa=[1, 0], tgif_qa=[1, 0, 0, 0])
    dpo = system("LLaVA-Hound-DPO", msvd_qa=[1, 1, 1, 1], msrvtt_qa=[1, 1], tgif_qa=[1, 1, 0, 0])
    text = format_markdown(compare([sft, dpo], resamples=100))
    lines = text.splitlines()
    assert "| model | MSVD-QA | MSRVTT-QA | TGIF-QA | mean acc | judge · template hash |" in lines
    assert ("| LLaVA-Hound-SFT | 75.00 / 3.25 | 50.00 / 2.50 | 25.00 / 1.75 | 50.00 | "
            "gpt-3.5-turbo-0613 · video_chatgpt 1a2b3c4d |") in lines
    diff_row = next(line for line in lines if line.startswith("| LLaVA-Hound-DPO | +25.00 ["))
    assert diff_row.endswith("(p) |") and "/ +0.75 [" in diff_row
    assert "| LLaVA-Hound-SFT | 4/4 (0 failed, 0 skipped)" in text
    assert "WARNING" not in text


def test_different_judges_are_flagged():
    a = System("a", {"msvd_qa": result("msvd_qa", [1, 0], judge="gpt-3.5 · t 1")})
    b = System("b", {"msvd_qa": result("msvd_qa", [1, 1], judge="gpt-4o · t 1")})
    assert "WARNING MSVD-QA: judged by different judges/templates" in format_markdown(compare([a, b], resamples=10))
    with pytest.raises(ValueError, match="labels must differ"):
        compare([a, a])


def test_parse_spec():
    assert parse_spec("runs/demo") == (None, Path("runs/demo"), None)
    label, path, evaluation = parse_spec("DPO=runs/demo@round-2/after")
    assert (label, str(path), evaluation) == ("DPO", "runs/demo", "round-2/after")
    assert parse_spec("runs/a=b/x@before")[0] is None  # a '=' inside a path is no label


# -- run folders ----------------------------------------------------------------------------------

JUDGE = {"judge_backend": "openai", "judge_model": "gpt-x", "template": "video_chatgpt", "template_hash": "0123456789abcdef"}


def write_eval(paths: RunPaths, tag: str, dataset: str, verdicts: list[str | None]) -> None:
    """One evaluation (video_chatgpt): a verdict per question, None for a failed judgment."""
    judgments = [Judgment(id=f"q{i}", target_id=f"q{i}", qa_id=f"q{i}", score=(4 if v == "yes" else 1) if v else None,
                          verdict=v, failure=None if v else "unparseable", prompt_hash="p", **JUDGE)
                 for i, v in enumerate(verdicts)]
    paths.eval_judgments(tag, dataset).write(judgments)
    judged = [v for v in verdicts if v]
    summary = EvalSummary(id=f"{dataset}/{tag}", tag=tag, dataset=dataset, protocol="video_chatgpt", round=paths.round_number,
                          model=tag, questions=len(verdicts), judged=len(judged), failed=len(verdicts) - len(judged),
                          accuracy=judged.count("yes") / len(judged), mean_score=None, pass_score=3.0, **JUDGE)
    old = paths.eval_summary.all() if paths.eval_summary.exists() else []
    paths.eval_summary.write([*old, summary])


@pytest.fixture
def run_dir(tmp_path):
    paths = RunPaths(tmp_path / "demo")
    write_eval(paths, "before", "msvd_qa", ["yes", "no", "no", "no", None])
    write_eval(paths, "after", "msvd_qa", ["yes", "yes", "no", "no", "no"])
    write_eval(paths.round(2), "after", "msvd_qa", ["yes", "yes", "yes", "no", "no"])
    return paths.root


def test_load_system_picks_evaluations(run_dir):
    latest = load_system(str(run_dir))  # no @: the latest evaluation, round 2's after
    assert latest.label == "demo" and latest.results["msvd_qa"].accuracy == pytest.approx(0.6)
    before = load_system(f"SFT={run_dir}@before").results["msvd_qa"]
    assert before.accuracy == pytest.approx(0.25) and before.failed == 1 and len(before.scores) == 4  # the failure left out
    assert load_system(f"{run_dir}@after").results["msvd_qa"].evaluation == "round 2 after"  # a tag: its highest round
    assert load_system(f"{run_dir}@round-1/after").results["msvd_qa"].accuracy == pytest.approx(0.4)
    assert load_system(f"{run_dir}@round-2/after").label == "demo@round-2/after"
    with pytest.raises(ValueError, match="no evaluation 'nope'"):
        load_system(f"{run_dir}@nope")
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        load_system(str(run_dir / "missing"))


def test_compare_cli(run_dir):
    result = CliRunner().invoke(app, ["compare", f"SFT={run_dir}@before", f"DPO-1={run_dir}@after", f"DPO-2={run_dir}@round-2/after",
                                      "--resamples", "200"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| model | MSVD-QA | mean acc | judge · template hash |" in result.output
    assert "| SFT | 25.00 / 1.75 | 25.00 | gpt-x · video_chatgpt 01234567 |" in result.output
    assert "| DPO-2 | +35.00 [" in result.output and "(u) |" in result.output  # 4 vs 5 judged questions: unpaired
    assert "| SFT | 4/5 (1 failed, 0 skipped) before |" in result.output
    same = CliRunner().invoke(app, ["evaluate", "compare", f"SFT={run_dir}@before", f"DPO-1={run_dir}@after",
                                    f"DPO-2={run_dir}@round-2/after", "--resamples", "200"], catch_exceptions=False)
    assert same.output == result.output


# -- multiple-choice benchmarks ------------------------------------------------------------------------

def mc_evaluation(paths: RunPaths, tag: str, right: list[bool], extractor: str = "official") -> None:
    """A Video-MME evaluation of 40 items, two task types, ``right`` item by item, into ``paths``."""
    from capdpo.evaluation.mc.items import MCItem
    from capdpo.evaluation.mc.score import summarize_mc
    from capdpo.records import MCPrediction

    items = [MCItem(f"{i:03d}-1", ("v",), "Q?", ("a", "b", "c", "d"), "A",
                    {"task_type": "Counting Problem" if i < 20 else "OCR Problems", "duration": "short"}) for i in range(40)]
    rows = {item.id: MCPrediction(id=item.id, answer="A" if ok else "B", extracted="A" if ok else "B", correct=ok,
                                  categories=item.categories, model=tag, frames=8, pixels=3136)
            for item, ok in zip(items, right)}
    paths.mc_predictions(tag, "videomme").write(rows.values())
    paths.eval_summary.upsert(summarize_mc(tag, "videomme", items, rows, model=tag, categories=["duration", "task_type"],
                                           extractor=extractor, prompt="videomme: BradyFU/Video-MME", prompt_hash="0123abcd9",
                                           scoring="rules"))


def test_multiple_choice_before_and_after_with_categories(tmp_path):
    paths = RunPaths(tmp_path / "run")
    before = [True] * 20 + [True] * 10 + [False] * 10  # counting 20/20, OCR 10/20
    after = [True] * 8 + [False] * 12 + [True] * 10 + [False] * 10  # counting drops to 8/20, OCR unchanged
    mc_evaluation(paths, "before", before)
    mc_evaluation(paths, "after", after)
    result = CliRunner().invoke(app, ["evaluate", "compare", f"SFT={paths.root}@before", f"DPO={paths.root}@after",
                                      "--resamples", "500"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "| model | Video-MME | mean acc | judge · template hash |" in lines
    assert "| SFT | 75.00 / – | 75.00 | official extractor · prompt 0123abcd |" in lines
    assert next(line for line in lines if line.startswith("| DPO | -30.00 [")).endswith("(p) |")
    assert "| SFT | 40/40 answered (0 without video) before |" in lines
    counting = next(line for line in lines if "| Counting Problem |" in line)
    assert counting.startswith("| Video-MME | task_type | Counting Problem | 20 | DPO | 100.00 | 40.00 | -60.00 [")
    low = float(counting.split("[")[1].split(",")[0])
    assert low < -30 and counting.endswith("(p) |")  # a drop confined to one task type, beyond noise
    ocr = next(line for line in lines if "| OCR Problems |" in line)
    assert "| 50.00 | 50.00 | +0.00 [+0.00, +0.00] (p) |" in ocr
    assert "WARNING" not in result.output

    mc_evaluation(paths, "after-lmms", after, extractor="lmms-eval")
    flagged = CliRunner().invoke(app, ["compare", f"{paths.root}@before", f"lmms={paths.root}@after-lmms", "--resamples", "50"],
                                 catch_exceptions=False)
    assert "WARNING Video-MME: scored by different extractors/prompts" in flagged.output
