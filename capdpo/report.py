"""Stage 10: one self-contained static HTML page summarising a run folder and all its rounds.

    write_report(RunPaths(Path("runs/demo")), cfg)  ->  runs/demo/report.html

No server and no external URL: charts are matplotlib PNGs and frame thumbnails JPEGs, both
base64-embedded, and the pair browser's filter box and sortable columns are a few lines of inline
JavaScript, so the page opens offline and can be mailed as one file. The report can be made at any
stage: a section whose input is missing or empty says "not run yet". The page is the jinja2
template ``templates/report.html.j2``, rendered with autoescape: this module gathers plain values
(every piece of text taken from records is escaped by the template) and draws the charts.

Sections: records per stage, judge score distributions, chosen vs rejected scores and margins,
DPO curves, evaluation per dataset and round, judge agreement (``agreement.json``, written by
:func:`save_agreement`), a browsable table of preference pairs and example evaluation answers.
With iterative DPO (``rounds: k``) every per-round section shows each round.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from capdpo.config import BUILTIN_JUDGE, RunConfig
from capdpo.errors import FrameError, UnsafePath
from capdpo.evaluation.agreement import read_agreement
from capdpo.evaluation.compare import dataset_title
from capdpo.evaluation.mc.items import BENCHMARKS
from capdpo.evaluation.suites import SUITES
from capdpo.ids import BadId
from capdpo.media.frames import sample_frames
from capdpo.records import Judgment, RecordFile, atomic_write_text
from capdpo.rundir import HELD_OUT, RunPaths

MAX_PAIRS, MAX_EVAL_EXAMPLES, THUMBS, THUMB_WIDTH = 200, 8, 4, 112
SCORES = (1, 2, 3, 4, 5)
def fmt(value: float | None, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


@dataclass(frozen=True)
class Number:
    """A numeric cell the pair browser sorts by value."""

    sort: str
    text: str

    @classmethod
    def of(cls, value: float) -> Number:
        return cls(f"{value:g}", fmt(value))


@dataclass(frozen=True)
class Question:
    question: str
    reference: str


@dataclass(frozen=True)
class Answer:
    """An answer, its score (or why the judge failed) and the judge's verbatim reply (None: not judged)."""

    text: str
    score: str
    said: str = ""  # " · yes" / " · no": video_chatgpt's verdict
    failure: str | None = None
    reply: str | None = None


def read_records(rf: RecordFile) -> list:
    """All valid records of a file, none when absent; a bad row is skipped (logged), never fatal,
    because a report of a half-written run is still worth having."""
    return rf.all(strict=False) if rf.exists() else []


def read_metrics(path: Path) -> list[dict]:
    """Rows of train/metrics.jsonl; a torn or bad line (training still running) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


@dataclass
class RoundData:
    """What one DPO round wrote (round 1: the run folder itself)."""

    number: int
    paths: RunPaths
    candidates: list
    judgments: list
    pairs: list
    metrics: list[dict]

    @classmethod
    def load(cls, paths: RunPaths) -> RoundData:
        return cls(paths.round_number, paths, read_records(paths.candidates), read_records(paths.judgments),
                   read_records(paths.pairs), read_metrics(paths.train / "metrics.jsonl"))

    @property
    def label(self) -> str:
        return f"round {self.number}"


# -- charts -----------------------------------------------------------------------------------
def figure(ncols: int = 1, width: float = 4.0, height: float = 2.7):
    """A bare matplotlib Figure and its axes: it renders with Agg, touching no pyplot state."""
    from matplotlib.figure import Figure  # lazy: only a report needs matplotlib

    fig = Figure(figsize=(width * ncols, height), dpi=90)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def png(fig) -> str:
    """The figure as base64 PNG text. PNG rather than SVG: matplotlib's SVG carries xmlns/metadata
    URLs, the page must have none."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def bars(ax, labels: list[str], series: dict[str, list[float | None]], title: str, colors: list[str] | None = None) -> None:
    """Grouped vertical bars, one group per label, each bar annotated with its value."""
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        drawn = ax.bar(xs, [float("nan") if v is None else v for v in values], width, label=name,
                       color=colors if len(series) == 1 and colors else None)
        ax.bar_label(drawn, labels=["n/a" if v is None else f"{v:.3g}" for v in values], fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.2)  # headroom for the value labels and the legend
    if len(series) > 1:
        ax.legend(fontsize=7)


def score_bins(scores: list[float | None]) -> list[int]:
    """Counts of scores 1..5, then of failed judgments (None) as a bar of their own."""
    c = Counter("failed" if s is None else round(s) for s in scores)
    return [c[s] for s in SCORES] + [c["failed"]]


def margin_bins(margins: list[float], width: float = 0.5) -> tuple[list[str], list[int]]:
    """Pairs per margin bin ``[lo, lo + width)``, from the smallest margin's bin to the largest's: a
    judge read in expected mode scores on a continuous scale, and one bar per distinct margin made
    hundreds of overlapping labels."""
    first, last = (int(math.floor(m / width)) for m in (min(margins), max(margins)))
    counts = Counter(int(math.floor(m / width)) for m in margins)
    return [f"{k * width:g}-{(k + 1) * width:g}" for k in range(first, last + 1)], [counts[k] for k in range(first, last + 1)]


# -- sections ---------------------------------------------------------------------------------
def header(paths: RunPaths, cfg: RunConfig, judgments: list, summaries: list) -> list[tuple]:
    """Run facts; the judge is taken from the records (what really ran), the config only as fallback."""
    judged = [s for s in summaries if s.protocol != "multiple_choice"]  # rule-scored evaluations have no judge
    judges = dict.fromkeys((r.judge_backend, r.judge_model, r.template, r.template_hash) for r in judgments + judged)
    if not judges:
        judges = {(cfg.judge.llm.backend, cfg.judge.llm.model, cfg.judge.template, "(not judged yet)"): None}
    rows = [("run dir", str(paths.root)), ("policy model", cfg.policy.model), ("DPO rounds", cfg.rounds),
            ("date", datetime.datetime.now().isoformat(timespec="seconds"))]
    return rows + [("judge", f"{b} / {m} / template {t} (hash {h})") for b, m, t, h in judges]


def counts_section(videos, qa, rounds: list[RoundData]) -> dict:
    """Records per stage: the shared data stages, then each round's candidates, judgments, pairs."""
    shared = [("videos (train)", sum(v.split == "train" for v in videos)), ("videos (test)", sum(v.split == "test" for v in videos)),
              ("QA items (train)", sum(q.split == "train" for q in qa)), ("QA items (test)", sum(q.split == "test" for q in qa))]
    per_round = {"candidates": [len(r.candidates) for r in rounds],
                 "judgments scored": [sum(j.score is not None for j in r.judgments) for r in rounds],
                 "judgments failed": [sum(j.score is None for j in r.judgments) for r in rounds],
                 "preference pairs": [len(r.pairs) for r in rounds]}
    rows = [(name, *[n] * len(rounds)) for name, n in shared] + [(name, *ns) for name, ns in per_round.items()]
    names = [r[0] for r in rows][::-1]
    fig, [ax] = figure(width=5.5, height=2.8)
    height = 0.8 / len(rounds)
    for k, rnd in enumerate(rounds):
        ax.barh([i + k * height for i in range(len(names))], [r[1 + k] for r in rows][::-1], height, label=rnd.label)
    ax.set_yticks([i + (len(rounds) - 1) * height / 2 for i in range(len(names))], names)
    ax.tick_params(labelsize=8)
    ax.set_title("records per stage", fontsize=10)
    if len(rounds) > 1:
        ax.legend(fontsize=7)
    head = ["stage", "records"] if len(rounds) == 1 else ["stage", *(r.label for r in rounds)]
    return {"head": head, "rows": rows, "chart": png(fig)}


def scores_section(rounds: list[RoundData]) -> dict | None:
    judged = [r for r in rounds if r.judgments]
    if not judged:
        return None
    fig, [ax] = figure(width=4.0 + 0.6 * len(judged))
    series = {r.label: score_bins([j.score for j in r.judgments]) for r in judged}
    bars(ax, [*map(str, SCORES), "failed"], series, "judge scores of candidates",
         colors=["C0"] * len(SCORES) + ["grey"])
    return {"chart": png(fig)}


def pairs_section(rounds: list[RoundData]) -> dict | None:
    with_pairs = [r for r in rounds if r.pairs]
    if not with_pairs:
        return None
    stats_rows, charts = [], []
    for r in with_pairs:
        chosen, rejected = [p.chosen_score for p in r.pairs], [p.rejected_score for p in r.pairs]
        stats_rows.append((r.label, len(r.pairs), fmt(statistics.fmean(chosen)), fmt(statistics.fmean(rejected)),
                           fmt(statistics.fmean(c - x for c, x in zip(chosen, rejected)))))
        fig, (a, b) = figure(2)
        bars(a, list(map(str, SCORES)), {"chosen": score_bins(chosen)[:-1], "rejected": score_bins(rejected)[:-1]},
             f"scores of chosen vs rejected ({r.label})" if len(rounds) > 1 else "scores of chosen vs rejected")
        labels, counts = margin_bins([c - x for c, x in zip(chosen, rejected)])
        bars(b, labels, {"pairs": counts}, "margin (chosen - rejected)")
        charts.append(png(fig))
    head = ["pairs", "mean chosen", "mean rejected", "mean margin"]
    if len(rounds) == 1:
        return {"head": head, "rows": [row[1:] for row in stats_rows], "charts": charts}
    return {"head": ["round", *head], "rows": stats_rows, "charts": charts}


TRAIN_PANELS = {"loss": ["loss"], "rewards/accuracies": ["rewards/accuracies"], "rewards/margins": ["rewards/margins"],
                "rewards/chosen & rejected": ["rewards/chosen", "rewards/rejected"]}
GRPO_PANELS = {"loss": ["loss"], "reward (group mean)": ["reward"], "KL to the reference": ["kl"],
               "answer length (tokens)": ["completions/mean_length"]}


def training_section(rounds: list[RoundData]) -> dict | None:
    """DPO's curves and last values, or GRPO's (reward, KL, answer length) when the metrics are GRPO's."""
    trained = [r for r in rounds if r.metrics]
    if not trained:
        return None
    online = any("reward" in m for r in trained for m in r.metrics)
    panels = GRPO_PANELS if online else TRAIN_PANELS
    fig, axes = figure(len(panels), width=3.2)
    for ax, (title, keys) in zip(axes, panels.items()):
        for r in trained:
            for key in keys:
                _plot_metric(ax, r.metrics, key, " ".join(filter(None, [r.label if len(rounds) > 1 else "",
                                                                            key.split("/")[-1] if len(keys) > 1 else ""])))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if (len(keys) > 1 or len(trained) > 1) and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    last_of = ("reward", "kl") if online else ("rewards/accuracies", "rewards/margins")
    rows = []
    for r in trained:
        last = r.metrics[-1]
        rows.append((r.label, len(r.metrics), fmt(last.get("epoch")), fmt(last.get("loss")), *(fmt(last.get(k)) for k in last_of)))
    head = ["steps logged", "last epoch", "last loss", *(("last reward", "last KL") if online else ("last accuracy", "last margin"))]
    title = "GRPO training" if online else "DPO training"
    if len(rounds) == 1:
        return {"title": title, "head": head, "rows": [row[1:] for row in rows], "chart": png(fig)}
    return {"title": title, "head": ["round", *head], "rows": rows, "chart": png(fig)}


def _plot_metric(ax, rows: list[dict], key: str, label: str) -> None:
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
    if pts:
        ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=label or None)


def _dataset_rank(dataset: str) -> tuple[int, str]:
    order = [HELD_OUT, *SUITES, *BENCHMARKS]
    family = "tempcompass" if dataset.startswith("tempcompass_") else dataset
    return (order.index(family) if family in order else len(order), dataset)


def eval_label(s, many_rounds: bool) -> str:
    """before / after, prefixed by the round when the run has several."""
    tag = s.tag or s.id.rsplit("/", 1)[-1]
    return f"round {s.round} {tag}" if many_rounds and not (s.round == 1 and tag == "before") else tag


def _eval_order(summaries) -> list:
    rank = {"before": 0, "after": 2}
    return sorted(summaries, key=lambda s: (_dataset_rank(s.dataset), s.round, rank.get(s.tag or s.id.rsplit("/", 1)[-1], 1)))


def eval_difference(run_dir: Path) -> dict | None:
    """After minus before on each dataset, with the 95% bootstrap interval over its questions (paired
    when both judged the same ones), as `capdpo evaluate compare` gives it: whether DPO changed
    anything beyond noise. None until both evaluations exist."""
    from capdpo.evaluation.compare import compare, dataset_title, load_system, signed_difference

    try:
        before, after = load_system(f"before={run_dir}@before"), load_system(f"after={run_dir}")
    except (FileNotFoundError, ValueError):
        return None
    if not any("after" in r.evaluation for r in after.results.values()):
        return None
    table = compare([before, after])
    acc, score = table.accuracy_diff["after"], table.score_diff["after"]
    rows = []
    for d in table.datasets:
        a, b = before.results.get(d), after.results.get(d)
        if a is None or b is None:
            continue
        rows.append((dataset_title(d), f"{b.evaluation} vs {a.evaluation}", len(a.correct.keys() & b.correct.keys()),
                     fmt(a.accuracy, ".1%"), fmt(b.accuracy, ".1%"), signed_difference(acc[d], 100, 1),
                     signed_difference(score[d], 1, 2), "paired" if acc[d].paired else "unpaired"))
    if oracle := oracle_difference(run_dir, table.resamples):  # beside the judged held-out row it re-grades
        rows.insert(next((i + 1 for i, r in enumerate(rows) if r[0] == dataset_title(HELD_OUT)), len(rows)), oracle)
    head = ["dataset", "evaluations", "questions in both", "accuracy before", "accuracy after",
            "difference, points [95% CI]", "mean score difference [95% CI]", "bootstrap"]
    categories = [(dataset_title(c.dataset), c.field, c.value, c.items, fmt(c.base, ".1%"), fmt(c.other, ".1%"),
                   signed_difference(c.difference, 100, 1), "paired" if c.difference.paired else "unpaired")
                  for c in table.category_diff["after"]]
    category_head = ["dataset", "category", "value", "items", "accuracy before", "accuracy after", "difference, points [95% CI]",
                     "bootstrap"]
    return {"head": head, "rows": rows, "resamples": table.resamples, "category_head": category_head,
            "categories": categories} if rows else None


def oracle_difference(run_dir: Path, resamples: int) -> tuple | None:
    """The held-out row again, graded by the oracle instead of the judge: the before and after
    answers to the questions of synthetic clips (whose truth the scene knows), after minus before
    with its paired bootstrap interval. None for a run without synthetic clips."""
    from capdpo.evaluation.compare import Difference, signed_difference
    from capdpo.media.synthetic import load_scenes
    from capdpo.oracle import load_answers, oracle_scores, run_scenes_path
    from capdpo.stats import bootstrap_mean

    paths = RunPaths(run_dir)
    scenes_file, files = run_scenes_path(run_dir), [paths.predictions(tag).path for tag in ("before", "after")]
    if not scenes_file.exists() or not all(f.exists() for f in files) or not paths.qa.exists():
        return None
    scenes, questions = load_scenes(scenes_file), paths.qa.by_id()
    before, after = ({r["qa_id"]: r["score"] for r in oracle_scores(load_answers(f), questions, scenes).rows} for f in files)
    both = sorted(before.keys() & after.keys())
    if not both:
        return None
    value, low, high = bootstrap_mean([after[q] - before[q] for q in both], resamples, 0)
    return ("held-out, graded by the oracle (synthetic clips)", "after vs before", len(both),
            fmt(sum(before[q] for q in both) / len(both), ".1%"), fmt(sum(after[q] for q in both) / len(both), ".1%"),
            signed_difference(Difference(value, low, high, True), 100, 1), "–", "paired")


def mc_rows(summaries, many: bool) -> list[tuple]:
    """The multiple-choice evaluations: accuracy with its interval, and what made the number."""
    def ci(s) -> str:
        return "–" if s.accuracy_low is None else f"[{s.accuracy_low:.1%}, {s.accuracy_high:.1%}]"

    return [(dataset_title(s.dataset), s.round, eval_label(s, many), s.model, s.questions, s.judged, s.skipped,
             f"{fmt(s.accuracy, '.1%')} {ci(s)}", fmt(s.accuracy_answered, ".1%"), f"{s.extractor} ({s.scoring})",
             f"{s.prompt} {s.prompt_hash[:8]}", ",".join(map(str, s.frames)) or "–", ",".join(map(str, s.pixels)) or "–")
            for s in summaries]


MC_HEAD = ["dataset", "round", "evaluation", "model", "items", "answered", "without video", "accuracy [95% CI]",
           "accuracy of answered", "extractor (scoring)", "prompt", "frames", "pixels/frame"]


def eval_section(summaries, difference: dict | None = None) -> dict | None:
    if not summaries:
        return None
    summaries = _eval_order(summaries)
    many = len({s.round for s in summaries}) > 1
    mc = mc_rows([s for s in summaries if s.protocol == "multiple_choice"], many)
    summaries = [s for s in summaries if s.protocol != "multiple_choice"]
    if not summaries:
        return {"head": [], "rows": [], "chart": None, "difference": difference, "mc_head": MC_HEAD, "mc": mc}
    rows = [(dataset_title(s.dataset), s.round, eval_label(s, many), s.model, s.protocol, s.questions, s.judged, s.failed,
             s.skipped, fmt(s.accuracy, ".1%"), fmt(s.mean_score)) for s in summaries]
    # the same judge for every row, as a rule: named once under the table, not in two wide columns
    judged_by = "; ".join(dict.fromkeys(f"{s.judge_model} (template hash {s.template_hash})" for s in summaries))
    datasets = list(dict.fromkeys(s.dataset for s in summaries))
    labels = list(dict.fromkeys(eval_label(s, many) for s in summaries))
    cell = {(s.dataset, eval_label(s, many)): s for s in summaries}

    def pick(attr: str) -> dict[str, list]:
        """One bar series per evaluation label, one value per dataset (None where not evaluated)."""
        return {lab: [getattr(cell[(d, lab)], attr) if (d, lab) in cell else None for d in datasets] for lab in labels}

    titles = [dataset_title(d) for d in datasets]
    fig, (a, b, c) = figure(3, width=1.5 + 1.2 * len(datasets) * max(1, len(labels) / 2))
    bars(a, titles, pick("accuracy"), "accuracy (judged only)")
    a.set_ylim(0, 1.45)  # headroom: value labels and the legend sit above full bars
    bars(b, titles, pick("mean_score"), "mean judge score")
    b.set_ylim(0, 7)
    bars(c, titles, pick("failed"), "failed judgments")
    c.set_ylim(0, 1.4 * max([1, *(s.failed for s in summaries)]))
    head = ["dataset", "round", "evaluation", "model", "protocol", "questions", "judged", "failed", "skipped", "accuracy",
            "mean score"]
    return {"head": head, "rows": rows, "judged_by": judged_by, "chart": png(fig), "difference": difference,
            "mc_head": MC_HEAD, "mc": mc}


# -- judge agreement --------------------------------------------------------------------------
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def distilled_judge_studies(cfg: RunConfig) -> list[dict]:
    """The held-out agreement a distilled judge (``capdpo judge distill``, builtin:judge-mini) was
    measured with against its teacher, when the run's judge is one."""
    from capdpo.packaged import JUDGE_MINI

    model = cfg.judge.llm.model
    folder = Path(cfg.cache_dir) / JUDGE_MINI if model == BUILTIN_JUDGE else Path(model)
    return [{**s, "name_a": f"{model} ({s.get('name_a')}, held-out, at distillation)"}
            for s in read_agreement(folder / "agreement.json")]


def agreement_section(path: Path, extra: list[dict] = ()) -> dict:
    """Every study of ``agreement.json``, then ``extra`` studies (the distilled judge's); with none,
    the page says where one would come from."""
    studies = []
    for s in [*read_agreement(path), *extra]:
        a, b, r = s.get("name_a", "A"), s.get("name_b", "B"), s["report"]
        rows = [("answers compared", r.get("n_common")), (f"failed under {a} / {b}", f"{r.get('n_failed_a')} / {r.get('n_failed_b')}"),
                (f"mean score {a} / {b}", f"{fmt(r.get('mean_a'))} / {fmt(r.get('mean_b'))}"),
                ("Pearson r", fmt(r.get("pearson"))), ("Spearman rho", fmt(r.get("spearman"))),
                ("Kendall tau-b", fmt(r.get("kendall_tau_b"))), ("exact agreement (rounded)", _pct(r.get("exact_agreement"))),
                ("within-1 agreement", _pct(r.get("within1_agreement"))),
                ("pairwise agreement, strict pairs", _pct(r.get("pairwise_agreement_strict"))),
                ("pairwise agreement, ties included", _pct(r.get("pairwise_agreement_with_ties")))]
        if r.get("b_is_binary"):
            rows.append((f"AUROC of {a} for {b}'s 0/1", fmt(r.get("auroc"))))
        studies.append({"name_a": a, "name_b": b, "rows": rows, "chart": _confusion_chart(a, b, r)})
    return {"file": path.name, "studies": studies}


def _confusion_chart(name_a: str, name_b: str, report: dict) -> str | None:
    labels, matrix = report.get("confusion_labels") or [], report.get("confusion") or []
    if not labels or len(matrix) != len(labels):
        return None
    fig, [ax] = figure(width=3.4, height=3.0)
    ax.imshow(matrix, cmap="Blues")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if n > top / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(name_b, fontsize=8)
    ax.set_ylabel(name_a, fontsize=8)
    ax.set_title("rounded scores", fontsize=10)
    return png(fig)


# -- the pair browser -------------------------------------------------------------------------
def jpeg(img) -> str:
    """A frame thumbnail as base64 JPEG text."""
    img = img.copy()
    img.thumbnail((THUMB_WIDTH, THUMB_WIDTH))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70)
    return base64.b64encode(buf.getvalue()).decode()


def thumbnails(paths: RunPaths, video_id: str, video: str | None) -> list[str]:
    """THUMBS small frames of a video: from its frame folder when `capdpo frames` made one (cheap),
    else decoded from the video itself; none when neither can be read."""
    try:
        folder = paths.frame_folder(video_id)
    except UnsafePath:  # an id edited into the pairs by hand names no folder of the run: the video may still show
        folder = None
    for source in (folder, video):
        if not source:
            continue
        try:
            return [jpeg(f) for f in sample_frames(source, THUMBS)]
        except (FrameError, OSError):
            continue
    return []


def answer_cell(text: str, score: float | None, judgment: Judgment | None) -> Answer:
    """An answer, its score and the judge's verbatim reply (the explanation) folded under it."""
    reply = judgment.raw_reply if judgment is not None else None
    if judgment is not None and judgment.score is None:
        return Answer(text, fmt(score), failure=judgment.failure or "", reply=reply)
    said = f" · {judgment.verdict}" if judgment is not None and judgment.verdict else ""  # video_chatgpt's yes/no
    return Answer(text, fmt(score), said, reply=reply)


def pair_browser(paths: RunPaths, rounds: list[RoundData], videos: dict) -> dict | None:
    """Every preference pair (up to MAX_PAIRS) with frames, question, both answers, scores, the
    judge's replies and the margin; filter box and sortable columns."""
    pairs = [(r, p) for r in rounds for p in r.pairs]
    if not pairs:
        return None
    thumbs: dict[str, list[str]] = {}  # one decode per video, however many of its questions are shown
    judgments = {r.number: {j.target_id: j for j in r.judgments} for r in rounds}
    rows = []
    for r, p in pairs[:MAX_PAIRS]:
        if p.video_id not in thumbs:
            thumbs[p.video_id] = thumbnails(paths, p.video_id, videos[p.video_id].video if p.video_id in videos else p.video)
        judged = judgments[r.number]
        rows.append({"round": Number.of(r.number), "thumbs": thumbs[p.video_id], "video_id": p.video_id,
                     "question": Question(p.prompt, p.answer),
                     "chosen": answer_cell(p.chosen, p.chosen_score, judged.get(p.chosen_id)),
                     "chosen_score": Number.of(p.chosen_score),
                     "rejected": answer_cell(p.rejected, p.rejected_score, judged.get(p.rejected_id)),
                     "rejected_score": Number.of(p.rejected_score), "margin": Number.of(p.chosen_score - p.rejected_score)})
    return {"many_rounds": len(rounds) > 1, "rows": rows, "total": len(pairs)}


# -- evaluation examples ----------------------------------------------------------------------
def eval_examples(rounds: list[RoundData], summaries, qa: dict) -> list[dict] | None:
    """Per dataset, the first questions answered in every evaluation, each evaluation's answer
    side by side (before, after, later rounds)."""
    many = len({s.round for s in summaries}) > 1
    parts = []
    judged = [s for s in _eval_order(summaries) if s.protocol != "multiple_choice"]  # MC predictions have no judgments
    for dataset in dict.fromkeys(s.dataset for s in judged):
        evals = [s for s in judged if s.dataset == dataset]
        runs = [(eval_label(s, many), _eval_records(rounds, s)) for s in evals]
        runs = [(label, preds, judged) for label, (preds, judged) in runs if preds]
        if not runs:
            continue
        questions = _questions(rounds, dataset, qa)
        common = [q for q in runs[0][1] if all(q in preds for _, preds, _ in runs)][:MAX_EVAL_EXAMPLES]
        rows = []
        for q in common:
            item = questions.get(q)
            rows.append({"question": Question(item.question if item else q, item.answer if item else "?"),
                         "answers": [answer_cell(preds[q].answer, judged[q].score if q in judged else None, judged.get(q))
                                     for _, preds, judged in runs]})
        if rows:
            parts.append({"title": dataset_title(dataset), "labels": [label for label, _, _ in runs], "rows": rows})
    return parts or None


def _eval_records(rounds: list[RoundData], s) -> tuple[dict, dict]:
    tag = s.tag or s.id.rsplit("/", 1)[-1]
    paths = next((r.paths for r in rounds if r.number == s.round), None)
    if paths is None:
        return {}, {}
    try:
        predictions, judgments = paths.predictions(tag, s.dataset), paths.eval_judgments(tag, s.dataset)
    except (BadId, UnsafePath):  # a summary edited by hand whose tag or dataset names no file of the run
        return {}, {}
    preds = {p.qa_id: p for p in read_records(predictions)}
    judged = {j.target_id: j for j in read_records(judgments)}
    return preds, judged


def _questions(rounds: list[RoundData], dataset: str, qa: dict) -> dict:
    if dataset == HELD_OUT:
        return qa
    for r in rounds:
        found = read_records(r.paths.suite_questions(dataset))
        if found:
            return {q.id: q for q in found}
    return {}


def write_report(paths: RunPaths, cfg: RunConfig) -> Path:
    """Write the run's report (``paths.report``, in the run folder whichever round ``paths`` is
    in) from whatever stages have run so far, and return its path."""
    from capdpo.rundir import RunPaths

    paths = RunPaths(paths.top)
    videos, qa = read_records(paths.videos), read_records(paths.qa)
    rounds = [RoundData.load(r) for r in paths.rounds()]
    summaries = [s for r in rounds for s in read_records(r.paths.eval_summary)]
    page = _template().render(
        name=paths.root.name,
        header=header(paths, cfg, [j for r in rounds for j in r.judgments], summaries),
        counts=counts_section(videos, qa, rounds),
        scores=scores_section(rounds),
        pairs=pairs_section(rounds),
        training=training_section(rounds),
        evaluation=eval_section(summaries, eval_difference(paths.root)),
        agreement=agreement_section(paths.agreement, distilled_judge_studies(cfg)),
        browser=pair_browser(paths, rounds, {v.id: v for v in videos}),
        examples=eval_examples(rounds, summaries, {q.id: q for q in qa}),
    )
    atomic_write_text(paths.report, page)  # a browser open on the old report never sees half a page
    return paths.report


def _template():
    import jinja2  # lazy: only a report needs jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("capdpo", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2")
