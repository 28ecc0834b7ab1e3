"""Judge-agreement study: how far two judges agree when they score the same answers.

The paper's validation experiment (method.md, step 9): the caption-only text judge against a judge
that sees the frames -- or any judge against an oracle's 0/1 correctness -- on the same
(video, question, answer) triples. Scores are ``{answer id: score}`` dicts (:func:`load_scores`);
``None`` marks a failed judgment, which is excluded from every statistic and counted apart.

    a = load_scores("judgments_text.jsonl"); b = load_scores("judgments_frames.jsonl")
    print(format_report(agreement(a, b), name_a="caption judge", name_b="frame judge"))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from pydantic import ValidationError
from scipy import stats

from capdpo.ids import BadId, check_id
from capdpo.records import Judgment, RecordError, atomic_write_text, finite_or_null, first_error, read_jsonl

# Fields only a Judgment record has: a row with any of them is validated as a full Judgment.
_JUDGMENT_FIELDS = frozenset({"judge_backend", "judge_model", "template", "template_hash", "prompt_hash"})


# ---------------------------------------------------------------------------------------- loading


def load_scores(path: str | os.PathLike, scale: tuple[float, float] | None = None, *,
                check_ids: bool = False) -> dict[str, float | None]:
    """Read ``{answer id: score}`` from a JSONL file; ``None`` marks a failed judgment.

    Two row shapes are accepted, and may be mixed:

    * a :class:`~capdpo.records.Judgment` record (recognised by its judge fields), keyed by
      ``target_id``; ``score`` is ``None`` when the judge failed;
    * a simple row ``{"target_id" | "id": str, "score": number | bool | null, ...}`` from another
      tool (extra fields are ignored; ``true``/``false`` read as 1/0 for oracle correctness).

    A malformed row, a non-finite score, a score outside ``scale`` (``(lowest, highest)``, when
    given; a Judgment's own protocol scale always holds), an id seen twice or, with ``check_ids``
    (a file whose ids become records, e.g. a distillation's teacher), an id off the answer-id rule
    of :mod:`capdpo.ids` raises :class:`~capdpo.records.RecordError` naming ``file:line``.
    """
    path = Path(path)
    scores: dict[str, float | None] = {}
    first_line: dict[str, int] = {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if _JUDGMENT_FIELDS & row.keys():
            try:
                j = Judgment.model_validate(row)
            except ValidationError as e:
                raise RecordError(f"{where}: malformed Judgment row: {first_error(e)}") from None
            key, score = j.target_id, j.score
        else:
            key = row.get("target_id", row.get("id"))
            if not isinstance(key, str) or not key:
                raise RecordError(f"{where}: a score row needs a non-empty string 'target_id' or 'id'")
            if "score" not in row:
                raise RecordError(f"{where}: a score row needs a 'score' (a number, true/false, or null for a failure)")
            score = row["score"]
            if score is not None and not isinstance(score, (int, float)):
                raise RecordError(f"{where}: score must be a number, true/false or null, got {score!r}")
        if score is not None:
            score = float(score)
            if not math.isfinite(score):
                raise RecordError(f"{where}: score must be finite, got {score}")
            if scale is not None and not scale[0] <= score <= scale[1]:
                raise RecordError(f"{where}: score {score:g} is outside the scale {scale[0]:g}-{scale[1]:g}")
        if check_ids:
            try:
                check_id(key, "answer id")
            except BadId as e:
                raise RecordError(f"{where}: {e}") from None
        if key in scores:
            raise RecordError(f"{where}: id {key!r} already scored on line {first_line[key]}")
        scores[key], first_line[key] = score, lineno
    return scores


# ---------------------------------------------------------------------------------------- helpers


def round_score(x: float) -> int:
    """Round half up (2.5 -> 3), unlike Python's banker's rounding: the rounded score of a judge."""
    return math.floor(x + 0.5)


def default_group(answer_id: str) -> str:
    """The question of an answer derived from its id: the part before the last ``'#'``
    (Candidate ids are ``<qa_id>#<k>``, and a question id has no ``'#'`` of its own, capdpo.ids;
    splitting at the last one keeps another tool's question ids whole even if they do); an id
    without ``'#'`` is its own group."""
    return answer_id.rsplit("#", 1)[0]


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve of ``scores`` for predicting binary ``labels`` (0/1).

    Mann-Whitney form: the probability that a random positive scores higher than a random
    negative, ties counting 0.5: ``(sum of positives' average ranks - P(P+1)/2) / (P*N)``.
    1 = perfect separator, 0.5 = chance, 0 = perfectly reversed. ``None`` when one class is empty.
    """
    if len(scores) != len(labels):
        raise ValueError(f"auroc: {len(scores)} scores but {len(labels)} labels")
    if any(lab not in (0, 1) for lab in labels):
        raise ValueError("auroc: labels must be 0 or 1")
    n_pos = sum(1 for lab in labels if lab == 1)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(scores)  # average ranks: ties share the mean rank
    rank_sum = sum(r for r, lab in zip(ranks, labels) if lab == 1)
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _corr(fn, x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """(statistic, p-value) of a scipy correlation, ``None`` where undefined (n < 2 or constant input)."""
    if len(x) < 2:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning / small-sample warnings -> nan -> None
        res = fn(x, y)
    stat, p = float(res[0]), float(res[1])
    return (None if math.isnan(stat) else stat), (None if math.isnan(p) else p)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ---------------------------------------------------------------------------------------- report


@dataclass
class SystemScore:
    """Mean score of one system (model) under each judge, over the answers both judges scored."""

    system: str
    n: int
    mean_a: float
    mean_b: float


@dataclass
class AgreementReport:
    """Agreement of judge A and judge B. Every statistic is over the ``n_common`` ids both judged
    successfully; a statistic that is undefined (too few items, constant scores, no pairs) is ``None``.

    Coverage:
        n_common: ids present in both with a score on both sides (the ones compared).
        n_failed_a / n_failed_b: ids present in both whose A / B judgment failed (an id failed on
            both sides counts in both). n_only_a / n_only_b: ids scored (or failed) by one judge only.
        mean_a / mean_b: mean score of each judge over the compared ids.
    Correlation (p-values: scipy's two-sided tests of no association):
        pearson: Pearson r, the linear correlation cov(A, B) / (sd(A) sd(B)) of the raw scores.
        spearman: Spearman rho, Pearson r of the scores' average ranks.
        kendall_tau_b: (concordant - discordant) / sqrt((n0 - t_a)(n0 - t_b)), n0 = n(n-1)/2 pairs,
            t_a / t_b = pairs tied under A / B.
    Rounded scores (half up, :func:`round_score`):
        exact_agreement: share of answers whose rounded scores are equal.
        within1_agreement: share whose rounded scores differ by at most 1.
        confusion_labels / confusion: ``confusion[i][j]`` = answers with rounded A = labels[i] and
            rounded B = labels[j]; labels = the sorted union of the rounded values.
    Pairwise preference (pairs of answers to the same question, compared on raw scores):
        n_questions: questions with at least one compared answer; n_pairs: all such pairs.
        n_pairs_strict: pairs where both judges strictly prefer one answer (neither ties).
        pairwise_agreement_strict: share of the strict pairs where A and B prefer the same answer
            ("without ties").
        pairwise_agreement_with_ties: share of all pairs where the verdicts (better / worse / tie)
            are equal, a tie under both counting as agreement ("with ties").
    System ranking (only when a system map is given):
        systems: mean score of each system under A and B. ranking_a / ranking_b: systems by mean
            score, best first (equal means by name). ranking_identical: the two rankings are equal.
        system_kendall_tau / system_kendall_p: Kendall tau-b of the system means (>= 3 systems).
        n_no_system: compared ids missing from the system map, left out of the ranking.
    Binary oracle:
        b_is_binary: every compared B score is 0 or 1. auroc: then :func:`auroc` of A's scores for
            B's labels.
    """

    n_common: int
    n_failed_a: int
    n_failed_b: int
    n_only_a: int
    n_only_b: int
    mean_a: float | None = None
    mean_b: float | None = None
    pearson: float | None = None
    pearson_p: float | None = None
    spearman: float | None = None
    spearman_p: float | None = None
    kendall_tau_b: float | None = None
    kendall_p: float | None = None
    exact_agreement: float | None = None
    within1_agreement: float | None = None
    confusion_labels: list[int] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    n_questions: int = 0
    n_pairs: int = 0
    n_pairs_strict: int = 0
    pairwise_agreement_strict: float | None = None
    pairwise_agreement_with_ties: float | None = None
    systems: list[SystemScore] | None = None
    ranking_a: list[str] | None = None
    ranking_b: list[str] | None = None
    ranking_identical: bool | None = None
    system_kendall_tau: float | None = None
    system_kendall_p: float | None = None
    n_no_system: int = 0
    b_is_binary: bool = False
    auroc: float | None = None


def agreement(
    a: Mapping[str, float | None],
    b: Mapping[str, float | None],
    *,
    group: Mapping[str, str] | None = None,
    system: Mapping[str, str] | None = None,
) -> AgreementReport:
    """Compare judge A's and judge B's scores on the answers both scored.

    ``group`` maps an answer id to its question id for the pairwise statistics (ids missing from it,
    or all ids when it is ``None``, use :func:`default_group`). ``system`` maps an answer id to the
    system (model) that wrote it, enabling the system-ranking statistics.
    """
    both = a.keys() & b.keys()
    ids = sorted(i for i in both if a[i] is not None and b[i] is not None)
    rep = AgreementReport(
        n_common=len(ids),
        n_failed_a=sum(1 for i in both if a[i] is None),
        n_failed_b=sum(1 for i in both if b[i] is None),
        n_only_a=len(a.keys() - b.keys()),
        n_only_b=len(b.keys() - a.keys()),
    )
    xa = [float(a[i]) for i in ids]  # type: ignore[arg-type]
    xb = [float(b[i]) for i in ids]  # type: ignore[arg-type]
    rep.mean_a, rep.mean_b = _mean(xa), _mean(xb)

    rep.pearson, rep.pearson_p = _corr(stats.pearsonr, xa, xb)
    rep.spearman, rep.spearman_p = _corr(stats.spearmanr, xa, xb)
    rep.kendall_tau_b, rep.kendall_p = _corr(stats.kendalltau, xa, xb)  # variant 'b' is scipy's default

    ra, rb = [round_score(x) for x in xa], [round_score(x) for x in xb]
    rep.exact_agreement = _rate(sum(p == q for p, q in zip(ra, rb)), len(ids))
    rep.within1_agreement = _rate(sum(abs(p - q) <= 1 for p, q in zip(ra, rb)), len(ids))

    labels = sorted(set(ra) | set(rb))
    index = {lab: k for k, lab in enumerate(labels)}
    rep.confusion_labels = labels
    rep.confusion = [[0] * len(labels) for _ in labels]
    for p, q in zip(ra, rb):
        rep.confusion[index[p]][index[q]] += 1

    _pairwise(rep, ids, a, b, group or {})
    if system is not None:
        _systems(rep, ids, a, b, system)

    if ids and all(x in (0.0, 1.0) for x in xb):
        rep.b_is_binary = True
        rep.auroc = auroc(xa, [int(x) for x in xb])
    return rep


def _pairwise(rep: AgreementReport, ids: list[str], a: Mapping, b: Mapping, group: Mapping[str, str]) -> None:
    by_question: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        by_question[group.get(i) or default_group(i)].append(i)
    rep.n_questions = len(by_question)
    agree_strict = agree_all = 0
    for members in by_question.values():
        for i, j in combinations(members, 2):
            sa, sb = _sign(a[i] - a[j]), _sign(b[i] - b[j])
            rep.n_pairs += 1
            agree_all += sa == sb
            if sa and sb:
                rep.n_pairs_strict += 1
                agree_strict += sa == sb
    rep.pairwise_agreement_strict = _rate(agree_strict, rep.n_pairs_strict)
    rep.pairwise_agreement_with_ties = _rate(agree_all, rep.n_pairs)


def _systems(rep: AgreementReport, ids: list[str], a: Mapping, b: Mapping, system: Mapping[str, str]) -> None:
    members: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        if i in system:
            members[system[i]].append(i)
        else:
            rep.n_no_system += 1
    rep.systems = [
        SystemScore(s, len(m), sum(a[i] for i in m) / len(m), sum(b[i] for i in m) / len(m))
        for s, m in sorted(members.items())
    ]
    rep.ranking_a = [s.system for s in sorted(rep.systems, key=lambda s: (-s.mean_a, s.system))]
    rep.ranking_b = [s.system for s in sorted(rep.systems, key=lambda s: (-s.mean_b, s.system))]
    rep.ranking_identical = rep.ranking_a == rep.ranking_b
    if len(rep.systems) >= 3:
        rep.system_kendall_tau, rep.system_kendall_p = _corr(
            stats.kendalltau, [s.mean_a for s in rep.systems], [s.mean_b for s in rep.systems])


# ---------------------------------------------------------------------------------------- format


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def format_report(report: AgreementReport, *, name_a: str = "A", name_b: str = "B") -> str:
    """The report as Markdown (headings and pipe tables), ready to paste into a README."""
    r, A, B = report, name_a, name_b
    lines = [f"## Judge agreement: {A} vs {B}", ""]
    lines += _table(["", "answers"], [
        ["scored by both (compared)", r.n_common],
        [f"failed under {A} (in both files)", r.n_failed_a],
        [f"failed under {B} (in both files)", r.n_failed_b],
        [f"only in {A}", r.n_only_a],
        [f"only in {B}", r.n_only_b],
        [f"mean score {A} / {B}", f"{_f(r.mean_a)} / {_f(r.mean_b)}"],
    ])
    lines += ["", "### Score correlation", ""]
    lines += _table(["statistic", "value", "p-value"], [
        ["Pearson r", _f(r.pearson), _f(r.pearson_p, ".3g")],
        ["Spearman rho", _f(r.spearman), _f(r.spearman_p, ".3g")],
        ["Kendall tau-b", _f(r.kendall_tau_b), _f(r.kendall_p, ".3g")],
    ])
    lines += ["", "### Agreement on rounded scores", ""]
    lines += _table(["statistic", "value"], [
        ["exact agreement", _pct(r.exact_agreement)],
        ["within-1 agreement", _pct(r.within1_agreement)],
    ])
    lines += ["", "### Pairwise preference (answers to the same question)", ""]
    lines += _table(["statistic", "value"], [
        ["questions", r.n_questions],
        ["pairs", r.n_pairs],
        ["pairs with a strict preference under both", r.n_pairs_strict],
        ["agreement without ties", _pct(r.pairwise_agreement_strict)],
        ["agreement with ties (tie = tie agrees)", _pct(r.pairwise_agreement_with_ties)],
    ])
    lines += ["", f"### Confusion matrix of rounded scores (rows {A}, columns {B})", ""]
    if r.confusion_labels:
        lines += _table([f"{A} \\ {B}", *map(str, r.confusion_labels)],
                        [[lab, *row] for lab, row in zip(r.confusion_labels, r.confusion)])
    else:
        lines.append("(no answers scored by both)")
    if r.systems is not None:
        lines += ["", "### System ranking", ""]
        lines += _table(["system", "answers", f"mean {A}", f"mean {B}"],
                        [[s.system, s.n, _f(s.mean_a), _f(s.mean_b)] for s in r.systems])
        lines += ["", f"- ranking under {A}: {' > '.join(r.ranking_a or []) or 'n/a'}",
                  f"- ranking under {B}: {' > '.join(r.ranking_b or []) or 'n/a'}",
                  f"- identical ranking: {'yes' if r.ranking_identical else 'no'}"]
        if len(r.systems) >= 3:
            lines.append(f"- Kendall tau-b of system means: {_f(r.system_kendall_tau)} (p = {_f(r.system_kendall_p, '.3g')})")
        if r.n_no_system:
            lines.append(f"- answers without a system (left out): {r.n_no_system}")
    if r.b_is_binary:
        lines += ["", f"### {B} as a binary oracle", "", f"- AUROC of {A}'s scores for {B}'s 0/1 labels: {_f(r.auroc)}"]
    return "\n".join(lines) + "\n"


# -- studies on disk ----------------------------------------------------------------------------

def save_agreement(path: Path, report: AgreementReport, name_a: str, name_b: str) -> None:
    """Add one judge-agreement study to ``agreement.json`` (a list of ``{name_a, name_b, report}``
    with ``report`` the :class:`~capdpo.evaluation.agreement.AgreementReport`'s fields), replacing an earlier
    study of the same two judges."""
    studies = [s for s in read_agreement(path) if (s.get("name_a"), s.get("name_b")) != (name_a, name_b)]
    studies.append({"name_a": name_a, "name_b": name_b, "report": dataclasses.asdict(report)})
    atomic_write_text(path, json.dumps(finite_or_null(studies), indent=1, allow_nan=False))  # an undefined statistic as null


def read_agreement(path: Path) -> list[dict]:
    """The studies of an ``agreement.json`` (one object or a list); unreadable means none."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return []
    studies = data if isinstance(data, list) else [data]
    return [s for s in studies if isinstance(s, dict) and isinstance(s.get("report"), dict)]
