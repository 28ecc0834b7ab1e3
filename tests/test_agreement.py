"""Judge-agreement study: correlations, rounded agreement, pairwise preference, confusion matrix,
system ranking, AUROC, loading of score files and the Markdown report -- on hand-computed examples."""

from __future__ import annotations

import json
import re
from itertools import product

import pytest
from scipy import stats

from capdpo.evaluation.agreement import agreement, auroc, default_group, format_report, load_scores, round_score
from capdpo.records import Judgment, RecordError, RecordFile

A5 = {"q#0": 1.0, "q#1": 2.0, "q#2": 3.0, "r#0": 4.0, "r#1": 5.0}


def _judgment(target: str, score: float | None, failure: str | None = None) -> Judgment:
    return Judgment(id=target, target_id=target, qa_id=default_group(target), score=score, failure=failure,
                    judge_backend="fake", judge_model="m", template="t", template_hash="th", prompt_hash="ph")


def test_perfect_agreement_is_one_everywhere():
    r = agreement(A5, dict(A5))
    assert r.n_common == 5 and (r.n_failed_a, r.n_failed_b, r.n_only_a, r.n_only_b) == (0, 0, 0, 0)
    for v in (r.pearson, r.spearman, r.kendall_tau_b, r.exact_agreement, r.within1_agreement,
              r.pairwise_agreement_strict, r.pairwise_agreement_with_ties):
        assert v == pytest.approx(1.0)
    assert r.n_questions == 2 and r.n_pairs == 3 + 1 and r.n_pairs_strict == 4  # q: 3 pairs, r: 1 pair
    assert r.confusion_labels == [1, 2, 3, 4, 5]
    assert r.confusion == [[int(i == j) for j in range(5)] for i in range(5)]
    assert r.mean_a == r.mean_b == pytest.approx(3.0)
    assert not r.b_is_binary and r.auroc is None and r.systems is None


def test_reversed_scores_give_negative_correlation_and_no_pairwise_agreement():
    r = agreement(A5, {k: 6 - v for k, v in A5.items()})
    assert r.pearson == pytest.approx(-1) and r.spearman == pytest.approx(-1) and r.kendall_tau_b == pytest.approx(-1)
    assert r.pairwise_agreement_strict == 0 and r.pairwise_agreement_with_ties == 0
    assert r.exact_agreement == pytest.approx(1 / 5)  # only the middle score 3 == 3
    assert r.within1_agreement == pytest.approx(1 / 5)  # 1v5, 2v4 (differ by 2), 3v3, 4v2, 5v1
    assert r.pearson_p is not None and r.pearson_p < 0.05


def test_known_kendall_spearman_pearson_values_match_scipy():
    xa, xb = [1, 2, 3, 4, 5], [3, 1, 2, 5, 4]
    a = {f"i{k}": float(v) for k, v in enumerate(xa)}
    b = {f"i{k}": float(v) for k, v in enumerate(xb)}
    r = agreement(a, b)
    # 7 concordant, 3 discordant pairs -> tau = 0.4; sum d^2 = 8 -> rho = 1 - 6*8/(5*24) = 0.6 (= Pearson on ranks)
    assert r.kendall_tau_b == pytest.approx(0.4) and r.spearman == pytest.approx(0.6) and r.pearson == pytest.approx(0.6)
    assert r.kendall_p == pytest.approx(stats.kendalltau(xa, xb).pvalue)
    assert r.spearman_p == pytest.approx(stats.spearmanr(xa, xb).pvalue)
    assert r.pearson_p == pytest.approx(stats.pearsonr(xa, xb).pvalue)


def test_kendall_tau_b_with_ties():
    # 6 pairs: 4 concordant, 0 discordant, 1 tied in A only, 1 tied in B only -> 4 / sqrt(5 * 5) = 0.8
    a = {"w": 1.0, "x": 1.0, "y": 2.0, "z": 3.0}
    b = {"w": 1.0, "x": 2.0, "y": 2.0, "z": 3.0}
    assert agreement(a, b).kendall_tau_b == pytest.approx(0.8)


def test_pairwise_agreement_with_and_without_ties():
    a = {"q#0": 1.0, "q#1": 1.0, "q#2": 5.0, "q#3": 2.0, "r#0": 5.0}
    b = {"q#0": 2.0, "q#1": 2.0, "q#2": 4.0, "q#3": 4.0, "r#0": 1.0}
    r = agreement(a, b)
    # q pairs: (0,1) tie/tie; (0,2) (0,3) (1,2) (1,3) same strict preference; (2,3) A prefers 2, B ties.
    # r#0 is alone on its question: no pair, although A and B disagree wildly on it.
    assert r.n_questions == 2 and r.n_pairs == 6 and r.n_pairs_strict == 4
    assert r.pairwise_agreement_strict == pytest.approx(1.0)
    assert r.pairwise_agreement_with_ties == pytest.approx(5 / 6)


def test_pairwise_opposite_strict_preferences_disagree():
    r = agreement({"q#0": 1.0, "q#1": 2.0}, {"q#0": 5.0, "q#1": 4.0})
    assert (r.n_pairs, r.n_pairs_strict, r.pairwise_agreement_strict, r.pairwise_agreement_with_ties) == (1, 1, 0.0, 0.0)


def test_explicit_group_map_and_no_pairs():
    a = {"x1": 1.0, "x2": 3.0, "y1": 2.0}
    b = {"x1": 2.0, "x2": 4.0, "y1": 5.0}
    assert agreement(a, b).n_pairs == 0  # no '#': every id is its own question
    r0 = agreement(a, b)
    assert r0.pairwise_agreement_strict is None and r0.pairwise_agreement_with_ties is None
    r = agreement(a, b, group={"x1": "x", "x2": "x", "y1": "y"})
    assert r.n_questions == 2 and r.n_pairs == 1 and r.pairwise_agreement_strict == 1.0


def test_failed_judgments_are_excluded_and_counted():
    a = {"1": 1.0, "2": None, "3": 3.0, "4": 4.0, "5": None, "7": 2.0}
    b = {"1": 1.0, "2": 2.0, "3": None, "5": None, "6": 3.0, "7": 2.0}
    r = agreement(a, b)
    assert r.n_common == 2  # ids 1 and 7
    assert r.n_failed_a == 2 and r.n_failed_b == 2  # A failed on 2 and 5, B on 3 and 5
    assert r.n_only_a == 1 and r.n_only_b == 1  # 4 and 6
    assert r.exact_agreement == 1.0 and r.mean_a == pytest.approx(1.5)


def test_confusion_matrix_counts_and_half_up_rounding():
    assert (round_score(2.5), round_score(3.5), round_score(2.49)) == (3, 4, 2)
    a = {"a": 1.0, "b": 2.0, "c": 2.2, "d": 3.4, "e": 4.5, "f": 2.0}
    b = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 3.0, "e": 5.0, "f": 3.0}
    r = agreement(a, b)  # rounded A: 1 2 2 3 5 2; B: 1 3 2 3 5 3
    assert r.confusion_labels == [1, 2, 3, 5]
    assert r.confusion == [
        [1, 0, 0, 0],
        [0, 1, 2, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
    ]
    assert sum(map(sum, r.confusion)) == r.n_common == 6
    assert r.exact_agreement == pytest.approx(4 / 6) and r.within1_agreement == 1.0


def _systems_scores(means: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    scores, system = {}, {}
    for s, m in means.items():
        for q, delta in (("q1", -0.5), ("q2", 0.5)):
            scores[f"{q}#{s}"] = m + delta
            system[f"{q}#{s}"] = s
    return scores, system


def test_system_ranking_identical_and_swapped():
    a, system = _systems_scores({"sft": 3.0, "dpo": 4.0, "base": 2.0})
    same, _ = _systems_scores({"sft": 3.5, "dpo": 3.8, "base": 1.0})  # other scale, same order
    r = agreement(a, same, system=system)
    assert r.ranking_a == r.ranking_b == ["dpo", "sft", "base"] and r.ranking_identical
    assert r.system_kendall_tau == pytest.approx(1.0)
    assert {s.system: (s.n, s.mean_a) for s in r.systems} == {"base": (2, 2.0), "dpo": (2, 4.0), "sft": (2, 3.0)}

    swapped, _ = _systems_scores({"sft": 4.0, "dpo": 3.0, "base": 2.0})
    r = agreement(a, swapped, system=system)
    assert r.ranking_b == ["sft", "dpo", "base"] and not r.ranking_identical
    assert r.system_kendall_tau == pytest.approx(1 / 3)  # 2 concordant, 1 discordant pair of systems

    two = {k: v for k, v in system.items() if not k.endswith("base")}
    r = agreement(a, same, system=two)  # 2 systems: no tau; the 2 unmapped answers are counted
    assert r.system_kendall_tau is None and r.n_no_system == 2 and r.ranking_identical


def _auroc_brute(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    return sum((p > n) + 0.5 * (p == n) for p, n in product(pos, neg)) / (len(pos) * len(neg))


def test_auroc():
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 1, 2, 2], [0, 1, 0, 1]) == pytest.approx(0.5)  # ties count 0.5
    s, y = [3, 1, 4, 1, 5, 2, 2, 5, 3, 4], [1, 0, 1, 0, 0, 1, 0, 1, 1, 0]
    assert auroc(s, y) == pytest.approx(_auroc_brute(s, y))
    assert auroc([1, 2], [1, 1]) is None
    with pytest.raises(ValueError):
        auroc([1, 2], [0, 2])
    with pytest.raises(ValueError):
        auroc([1, 2], [0])


def test_auroc_in_report_when_b_is_binary_oracle():
    a = {"a": 5.0, "b": 4.0, "c": 2.0, "d": 1.0, "e": 3.0}
    oracle = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 0.0}
    r = agreement(a, oracle)
    assert r.b_is_binary and r.auroc == 1.0
    assert "AUROC" in format_report(r, name_b="oracle")


def test_undefined_statistics_are_none():
    r = agreement({}, {"x": 1.0})
    assert r.n_common == 0 and r.n_only_b == 1 and r.pearson is None and r.exact_agreement is None
    r = agreement({"x": 3.0, "y": 3.0}, {"x": 1.0, "y": 2.0})  # constant A: no correlation
    assert r.pearson is None and r.spearman is None and r.kendall_tau_b is None
    text = format_report(agreement({}, {}))
    assert "n/a" in text and "no answers scored by both" in text


def test_load_judgment_jsonl_and_simple_rows(tmp_path):
    f = RecordFile(tmp_path / "judgments.jsonl", Judgment)
    f.append([_judgment("q#0", 4.0), _judgment("q#1", None, failure="no score"), _judgment("q#2", 2.0)])
    assert load_scores(f.path) == {"q#0": 4.0, "q#1": None, "q#2": 2.0}

    simple = tmp_path / "oracle.jsonl"
    rows = [{"id": "q#0", "score": 1}, {"target_id": "q#1", "score": True, "pred": "yes"},
            {"id": "q#2", "score": False}, {"id": "q#3", "score": None}, {"id": "q#4", "score": 2.5}]
    simple.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_scores(simple) == {"q#0": 1.0, "q#1": 1.0, "q#2": 0.0, "q#3": None, "q#4": 2.5}


@pytest.mark.parametrize("bad, why", [
    ('{"id": "x"}', "needs a 'score'"),
    ('{"score": 3}', "'target_id' or 'id'"),
    ('{"id": "x", "score": "3"}', "must be a number"),
    ('{"id": "x", "score": NaN}', "finite"),
    ('not json', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"id": "q#0", "score": 2}', "already scored on line 1"),
    ('{"id": "x", "target_id": "x", "qa_id": "q", "judge_backend": "f", "judge_model": "m"}', "malformed Judgment row"),
])
def test_malformed_row_error_names_file_and_line(tmp_path, bad, why):
    p = tmp_path / "scores.jsonl"
    p.write_text('{"id": "q#0", "score": 3}\n\n' + bad + "\n")
    with pytest.raises(RecordError, match=re.escape(f"{p}:3:") + ".*" + re.escape(why)):
        load_scores(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_scores(tmp_path / "nope.jsonl")


def test_format_report_mentions_every_statistic():
    a, system = _systems_scores({"sft": 3.0, "dpo": 4.0, "base": 2.0})
    b, _ = _systems_scores({"sft": 4.0, "dpo": 3.0, "base": 2.0})
    text = format_report(agreement(a, b, system=system), name_a="caption judge", name_b="frame judge")
    for needle in ("caption judge vs frame judge", "Pearson r", "Spearman rho", "Kendall tau-b", "p-value",
                   "exact agreement", "within-1 agreement", "agreement without ties", "agreement with ties",
                   "pairs", "Confusion matrix", "System ranking", "identical ranking: no",
                   "Kendall tau-b of system means", "only in caption judge", "failed under frame judge"):
        assert needle in text, needle
    assert "AUROC" not in text
    # every table row has as many cells as its header
    for block in text.split("\n\n"):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        assert len({ln.count("|") for ln in rows}) <= 1, block


def test_cli_judge_agree_prints_report(tmp_path):
    from typer.testing import CliRunner

    from capdpo.cli import app

    pa, pb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    RecordFile(pa, Judgment).append([_judgment("q#0", 5.0), _judgment("q#1", 1.0)])
    pb.write_text('{"id": "q#0", "score": 1}\n{"id": "q#1", "score": 0}\n')
    result = CliRunner().invoke(app, ["judge", "agree", str(pa), str(pb), "--name-a", "text", "--name-b", "oracle"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "## Judge agreement: text vs oracle" in out and "AUROC of text's scores for oracle's 0/1 labels: 1.000" in out
