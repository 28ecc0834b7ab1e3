"""Comparison tables: several evaluated policies side by side, in the layout of the paper's tables,
with the difference to the first one and a bootstrap 95% confidence interval of that difference.

    capdpo compare SFT=runs/demo@before DPO=runs/demo@after
    capdpo evaluate compare runs/a runs/b --datasets msvd_qa,msrvtt_qa,tgif_qa

A system is ``[LABEL=]RUN_DIR[@EVAL]``: ``EVAL`` picks the evaluation (``before``, ``after`` -
the highest round's -, ``round-2/after``, any ``--tag``); without it each dataset's latest evaluation is used (highest
round, "after" over other tags over "before"). :func:`compare` is pure: it takes per-question
outcomes (:class:`DatasetResult`) and returns numbers; :func:`load_system` reads them from a run
folder and :func:`format_markdown` prints them.

The interval resamples questions with replacement (``resamples`` times, seeded): *paired* - the
same resampled questions for both systems - when both judged exactly the same questions, else
each system's questions independently (*unpaired*). Failed judgments are left out of every
number (they are counted in the coverage table), as in the evaluation itself.

Multiple-choice benchmarks (capdpo.evaluation.mc) are compared the same way on their items'
right/wrong (no mean score; items without a readable video left out), with the extractor and
prompt in place of the judge, and per category (Video-MME task type and duration, MVBench task,
TempCompass dimension, NExT-QA type...): :attr:`Comparison.category_diff`, so a drop confined to
one task shows.
"""

from __future__ import annotations

import statistics
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capdpo.evaluation.mc.items import BENCHMARKS, benchmark_of
from capdpo.evaluation.mc.items import dataset_title as mc_title
from capdpo.evaluation.suites import SUITES, suite_title
from capdpo.records import EvalSummary, Judgment, MCPrediction
from capdpo.rundir import HELD_OUT
from capdpo.stats import bootstrap_diff, percentile_interval

TAG_ORDER = {"before": 0, "after": 2}  # any other tag sits between them
MEAN = "mean"  # the mean-accuracy column's key among the datasets of a Comparison's differences


@dataclass(frozen=True)
class DatasetResult:
    """One system's judged answers on one dataset.

    ``correct``: per question id, 1.0 / 0.0 for the answers that count towards accuracy (score
    >= pass score, or the judge's yes/no); ``scores``: per question id, every judged score.
    """

    dataset: str
    correct: dict[str, float]
    scores: dict[str, float]
    questions: int = 0
    failed: int = 0
    skipped: int = 0
    judge: str = ""  # "model · template hash": what produced the numbers (multiple choice: extractor and prompt)
    evaluation: str = ""  # which evaluation of the run this is (e.g. "round 2 after")
    multiple_choice: bool = False  # rule-scored: ``correct`` holds every item with a readable video, ``scores`` nothing
    answered: int = 0  # multiple choice: items an answer was read from
    categories: dict[str, dict[str, str]] = field(default_factory=dict)  # multiple choice: item id -> {field: value}

    @property
    def accuracy(self) -> float | None:
        return statistics.fmean(self.correct.values()) if self.correct else None

    @property
    def mean_score(self) -> float | None:
        return statistics.fmean(self.scores.values()) if self.scores else None


@dataclass(frozen=True)
class System:
    label: str
    results: dict[str, DatasetResult]


@dataclass(frozen=True)
class Difference:
    """``value`` (system - baseline) and its bootstrap interval; ``None`` where undefined."""

    value: float | None
    low: float | None = None
    high: float | None = None
    paired: bool | None = None  # None: no interval


@dataclass(frozen=True)
class CategoryDifference:
    """One value of one category field of a multiple-choice dataset (e.g. task_type = Counting
    Problem): both systems' accuracy on its items and the difference with its interval."""

    dataset: str
    field: str
    value: str
    items: int  # items of this value the baseline scored
    base: float | None
    other: float | None
    difference: Difference


@dataclass
class Comparison:
    datasets: list[str]
    systems: list[System]
    # by system label (all but the first), then dataset (or MEAN): accuracy and score differences
    accuracy_diff: dict[str, dict[str, Difference]] = field(default_factory=dict)
    score_diff: dict[str, dict[str, Difference]] = field(default_factory=dict)
    # by system label (all but the first): per multiple-choice category, its accuracy difference
    category_diff: dict[str, list[CategoryDifference]] = field(default_factory=dict)
    resamples: int = 1000
    level: float = 0.95

    def mean_accuracy(self, system: System) -> float | None:
        """Mean accuracy over the table's datasets (the paper's "mean acc"); None when the system
        lacks one of them, so means over different datasets are never compared."""
        accs = [system.results[d].accuracy if d in system.results else None for d in self.datasets]
        return None if not accs or None in accs else statistics.fmean(accs)


# -- the statistics ---------------------------------------------------------------------------

def _interval(value: float | None, reps: np.ndarray | None, paired: bool | None, level: float) -> Difference:
    if value is None or reps is None:
        return Difference(value)
    return Difference(value, *percentile_interval(reps, level), paired)


def _rng(seed: int, *names: str) -> np.random.Generator:
    """One generator per (system, dataset, metric): adding a column leaves the others' intervals as they were."""
    return np.random.default_rng([seed, zlib.crc32("|".join(names).encode())])


def compare(systems: Sequence[System], datasets: Sequence[str] | None = None, *, resamples: int = 1000, seed: int = 0,
            level: float = 0.95) -> Comparison:
    """Accuracy and mean score of each system per dataset, and of every system after the first
    the difference to the first with a bootstrap ``level`` interval (the mean-accuracy column's
    interval resamples every dataset at once)."""
    if not systems:
        raise ValueError("compare needs at least one system")
    labels = [s.label for s in systems]
    if len(set(labels)) != len(labels):
        raise ValueError(f"system labels must differ, got {labels}; name them LABEL=RUN_DIR")
    table = Comparison(list(datasets) if datasets else dataset_order(systems), list(systems), resamples=resamples, level=level)
    base = systems[0]
    for other in systems[1:]:
        acc, score, per_dataset = {}, {}, []
        for d in table.datasets:
            a, b = base.results.get(d), other.results.get(d)
            if a is None or b is None:
                acc[d] = score[d] = Difference(None)
                continue
            acc[d], reps = _difference(a.accuracy, b.accuracy, a.correct, b.correct, _rng(seed, other.label, d, "acc"),
                                       resamples, level)
            score[d], _ = _difference(a.mean_score, b.mean_score, a.scores, b.scores, _rng(seed, other.label, d, "score"),
                                      resamples, level)
            per_dataset.append(reps)
        acc[MEAN] = _mean_difference(table, base, other, per_dataset, level)
        table.accuracy_diff[other.label], table.score_diff[other.label] = acc, score
        table.category_diff[other.label] = _category_differences(table.datasets, base, other, seed, resamples, level)
    return table


def _category_differences(datasets: Sequence[str], base: System, other: System, seed: int, resamples: int,
                          level: float) -> list[CategoryDifference]:
    """Per multiple-choice dataset both systems have, per category field and value, the accuracy
    difference on that value's items (paired when both scored the same ones)."""
    out = []
    for d in datasets:
        a, b = base.results.get(d), other.results.get(d)
        if a is None or b is None or not (a.multiple_choice and b.multiple_choice):
            continue
        groups: dict[tuple[str, str], list[str]] = {}
        for item, fields in {**b.categories, **a.categories}.items():
            for name, value in fields.items():
                groups.setdefault((name, value), []).append(item)
        for (name, value), ids in sorted(groups.items()):
            a_part = {i: a.correct[i] for i in ids if i in a.correct}
            b_part = {i: b.correct[i] for i in ids if i in b.correct}
            a_acc = statistics.fmean(a_part.values()) if a_part else None
            b_acc = statistics.fmean(b_part.values()) if b_part else None
            diff, _ = _difference(a_acc, b_acc, a_part, b_part, _rng(seed, other.label, d, name, value), resamples, level)
            out.append(CategoryDifference(d, name, value, len(a_part), a_acc, b_acc, diff))
    return out


def _difference(a_value, b_value, a: dict, b: dict, rng, resamples: int, level: float) -> tuple[Difference, np.ndarray | None]:
    value = None if a_value is None or b_value is None else b_value - a_value
    boot = bootstrap_diff(a, b, rng, resamples)
    reps, paired = boot if boot else (None, None)
    return _interval(value, reps, paired, level), reps


def _mean_difference(table: Comparison, base: System, other: System, per_dataset: list, level: float) -> Difference:
    a, b = table.mean_accuracy(base), table.mean_accuracy(other)
    if a is None or b is None:
        return Difference(None)
    if any(r is None for r in per_dataset):
        return Difference(b - a)
    paired = all(base.results[d].correct.keys() == other.results[d].correct.keys() for d in table.datasets)
    return _interval(b - a, np.mean(per_dataset, axis=0), paired, level)


def dataset_order(systems: Sequence[System]) -> list[str]:
    """Every dataset any system has: held-out first, then the suites in their registry order
    (the paper's MSVD, MSRVTT, TGIF), then any other name alphabetically."""
    names = {d for s in systems for d in s.results}
    rank = {name: i for i, name in enumerate([HELD_OUT, *SUITES, *BENCHMARKS])}
    return sorted(names, key=lambda d: (rank.get(d.split("_")[0] if d.startswith("tempcompass_") else d, len(rank)), d))


def dataset_title(dataset: str) -> str:
    """Column header of a dataset: a suite's or multiple-choice benchmark's title, else the name itself."""
    return mc_title(dataset) or suite_title(dataset)


# -- reading run folders ----------------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str | None, Path, str | None]:
    """``[LABEL=]RUN_DIR[@EVAL]`` -> (label, run dir, evaluation)."""
    label, sep, rest = spec.partition("=")
    if not sep or "/" in label:  # a '=' inside a path is no label
        label, rest = None, spec
    path, _, evaluation = rest.partition("@")
    return label or None, Path(path), evaluation or None


def _tag(s: EvalSummary) -> str:
    return s.tag or s.id.rsplit("/", 1)[-1]  # summaries from before the tag field: the id ends with it


def _evaluation_name(s: EvalSummary) -> str:
    return _tag(s) if s.round == 1 else f"round-{s.round}/{_tag(s)}"


def _pick(summaries: list[EvalSummary], evaluation: str | None) -> EvalSummary | None:
    """The summary ``evaluation`` names (the highest round's, when only a tag is given), or the latest."""
    if evaluation:
        named = [s for s in summaries if evaluation in (_tag(s), f"round-{s.round}/{_tag(s)}")]
        return max(named, key=lambda s: s.round, default=None)
    return max(summaries, key=lambda s: (s.round, TAG_ORDER.get(_tag(s), 1)), default=None)


def load_system(spec: str) -> System:
    """A system from a run folder: per dataset, the chosen evaluation's per-question outcomes."""
    from capdpo.rundir import RunPaths

    label, run_dir, evaluation = parse_spec(spec)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    paths = RunPaths(run_dir)
    summaries = [s for r in paths.rounds() if r.eval_summary.exists() for s in r.eval_summary.read()]
    results = {}
    for dataset in dict.fromkeys(s.dataset for s in summaries):
        s = _pick([x for x in summaries if x.dataset == dataset], evaluation)
        if s is not None and s.protocol == "multiple_choice":
            predictions = paths.round(s.round).mc_predictions(_tag(s), dataset)
            if not predictions.exists():
                raise FileNotFoundError(f"{predictions.path}: predictions of {s.id} (round {s.round}) missing; "
                                        "the comparison needs the per-item predictions")
            results[dataset] = mc_result(s, predictions.all())
        elif s is not None:
            judgments = paths.round(s.round).eval_judgments(_tag(s), dataset)
            if not judgments.exists():
                raise FileNotFoundError(f"{judgments.path}: judgments of {s.id} (round {s.round}) missing; "
                                        "the comparison needs the per-question judgments")
            results[dataset] = dataset_result(s, judgments.all())
    if not results:
        what = f"evaluation {evaluation!r}" if evaluation else "evaluation"
        raise ValueError(f"{run_dir}: no {what} found (run `capdpo evaluate` first)")
    return System(label or (run_dir.name + (f"@{evaluation}" if evaluation else "")), results)


def mc_result(s: EvalSummary, predictions: list[MCPrediction]) -> DatasetResult:
    """Per-item right/wrong of a multiple-choice evaluation (items without a readable video left out)."""
    rows = [p for p in predictions if p.error is None]
    evaluation = _evaluation_name(s).replace("round-", "round ").replace("/", " ")
    scoring = "" if s.scoring in ("", "rules") else f" · {s.scoring}"
    benchmark = benchmark_of(s.dataset)
    fields = benchmark.categories if benchmark else ()  # the fields its summary reports (Video-MME: not its 30 sub-categories)
    categories = {p.id: {k: v for k, v in p.categories.items() if k in fields} for p in rows}
    return DatasetResult(s.dataset, {p.id: float(p.correct) for p in rows}, {}, s.questions, 0, s.skipped,
                         f"{s.extractor} extractor · prompt {s.prompt_hash[:8]}{scoring}", evaluation, multiple_choice=True,
                         answered=sum(p.answered for p in rows), categories=categories)


def dataset_result(s: EvalSummary, judgments: list[Judgment]) -> DatasetResult:
    """Per-question outcomes of one evaluation, by its protocol's accuracy rule."""
    correct, scores = {}, {}
    for j in judgments:
        if j.score is None:
            continue
        scores[j.target_id] = j.score
        if s.protocol == "video_chatgpt":
            if j.verdict in ("yes", "no"):
                correct[j.target_id] = float(j.verdict == "yes")
        else:
            correct[j.target_id] = float(j.score >= s.pass_score)
    evaluation = _evaluation_name(s).replace("round-", "round ").replace("/", " ")
    return DatasetResult(s.dataset, correct, scores, s.questions, s.failed, s.skipped,
                         f"{s.judge_model} · {s.template} {s.template_hash[:8]}", evaluation)


# -- printing ----------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def signed_difference(d: Difference, scale: float, digits: int) -> str:
    """``d`` times ``scale`` with its interval, e.g. "+4.00 [-1.20, +9.50]"."""
    if d.value is None:
        return "–"

    def show(x: float) -> str:
        return f"{round(scale * x, digits) + 0.0:+.{digits}f}"  # + 0.0 turns -0.0 into 0.0: never "-0.00"

    text = show(d.value)
    if d.low is not None:
        text += f" [{show(d.low)}, {show(d.high)}]"
    return text


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), "|" + "|".join("---" for _ in header) + "|", *map(_row, rows)]


def _judges(system: System, datasets: list[str]) -> str:
    return "; ".join(dict.fromkeys(system.results[d].judge for d in datasets if d in system.results)) or "–"


def format_markdown(table: Comparison) -> str:
    """The comparison as Markdown: the paper's table (accuracy % / mean score, mean accuracy,
    judge), the differences to the first system with intervals, and what each number covers."""
    titles = [dataset_title(d) for d in table.datasets]
    rows = []
    for s in table.systems:
        cells = [f"{_pct(r.accuracy)} / {_num(r.mean_score)}" if (r := s.results.get(d)) else "–" for d in table.datasets]
        rows.append([s.label, *cells, _pct(table.mean_accuracy(s)), _judges(s, table.datasets)])
    lines = ["Accuracy (%) / mean judge score; failed judgments are excluded (see coverage).", ""]
    lines += _table(["model", *titles, "mean acc", "judge · template hash"], rows)
    if len(table.systems) > 1:
        base = table.systems[0].label
        level = f"{table.level:.0%}"
        legend = (f"Difference vs {base}: accuracy points [{level} bootstrap CI] / mean score [{level} CI]; "
                  f"{table.resamples} resamples of the questions, paired (p) when both judged the same questions, "
                  "else unpaired (u).")
        lines += ["", legend, ""]
        diff_rows = []
        for s in table.systems[1:]:
            acc, score = table.accuracy_diff[s.label], table.score_diff[s.label]
            cells = [f"{signed_difference(acc[d], 100, 2)} / {signed_difference(score[d], 1, 2)}{_pairing(acc[d])}" for d in table.datasets]
            diff_rows.append([s.label, *cells, signed_difference(acc[MEAN], 100, 2) + _pairing(acc[MEAN])])
        lines += _table(["model", *titles, "mean acc"], diff_rows)
    lines += ["", "Coverage: judged / questions (failed judgments, questions skipped for missing media), evaluation used; "
              "multiple choice: answered / items (items without a readable video).", ""]
    lines += _table(["model", *titles], [[s.label, *(_coverage(s.results.get(d)) for d in table.datasets)]
                                         for s in table.systems])
    lines += _category_table(table)
    lines += _judge_warnings(table)
    return "\n".join(lines) + "\n"


def _category_table(table: Comparison) -> list[str]:
    """Multiple-choice accuracy per category, each system against the first, with the interval."""
    rows = [[dataset_title(c.dataset), c.field, c.value, str(c.items), label, _pct(c.base), _pct(c.other),
             signed_difference(c.difference, 100, 2) + _pairing(c.difference)]
            for label, cats in table.category_diff.items() for c in cats]
    if not rows:
        return []
    base = table.systems[0].label
    legend = (f"Multiple-choice accuracy (%) per category, vs {base}: difference in points [{table.level:.0%} bootstrap CI] "
              "over that category's items, paired (p) when both scored the same items.")
    return ["", legend, ""] + _table(["dataset", "category", "value", "items", "model", f"{base} (%)", "model (%)",
                                      "difference"], rows)


def _pairing(d: Difference) -> str:
    return "" if d.paired is None else (" (p)" if d.paired else " (u)")


def _coverage(r: DatasetResult | None) -> str:
    if r is None:
        return "–"
    if r.multiple_choice:
        return f"{r.answered}/{r.questions} answered ({r.skipped} without video) {r.evaluation}"
    return f"{len(r.scores)}/{r.questions} ({r.failed} failed, {r.skipped} skipped) {r.evaluation}"


def _judge_warnings(table: Comparison) -> list[str]:
    """Scores from different judges or templates are not comparable (method.md: up to ~10 points)."""
    out = []
    for d in table.datasets:
        judges = {s.results[d].judge for s in table.systems if d in s.results}
        if len(judges) > 1:
            if any(s.results[d].multiple_choice for s in table.systems if d in s.results):
                what, mixed = "scored by different extractors/prompts", "extractor"
            else:
                what, mixed = "judged by different judges/templates", "judge"
            out.append(f"- WARNING {dataset_title(d)}: {what} ({'; '.join(sorted(judges))}): "
                       f"differences mix {mixed} and model effects.")
    return ["", *out] if out else []
