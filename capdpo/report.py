"""Stage 10: one self-contained static HTML page summarising a run folder.

    write_report(RunPaths(Path("runs/demo")), cfg)  ->  runs/demo/report.html

No server and no external URL: charts are matplotlib PNGs and frame thumbnails JPEGs, both
base64-embedded, so the page opens offline and can be mailed as one file. The report can be made
at any stage: a section whose input is missing or empty says "not run yet". Every piece of text
taken from records is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from capdpo.config import RunConfig
from capdpo.frames import FrameError, sample_frames
from capdpo.records import Judgment, RecordFile

if TYPE_CHECKING:
    from capdpo.pipeline import RunPaths

MAX_PAIRS, MAX_EVAL_EXAMPLES, THUMBS, THUMB_WIDTH = 20, 8, 4, 112
SCORES = (1, 2, 3, 4, 5)
NOT_RUN = '<p class="empty">not run yet</p>'
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:left} th{background:#f4f4f4} .empty{color:#999;font-style:italic}
.chart{max-width:100%;display:block;margin:.5em 0} .thumb{width:56px;margin:1px}
.answer{max-width:300px;white-space:pre-wrap} pre{white-space:pre-wrap;font-size:.85em;max-width:300px;margin:0}
.score{font-weight:bold} .failed{color:#b00} .note{color:#555;font-size:.9em}
"""


class Html(str):
    """A string already rendered as HTML, so :func:`table` does not escape it again."""


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value: float | None, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def table(header: list[str] | None, rows: list[tuple]) -> Html:
    """An HTML table; plain cells are escaped, :class:`Html` cells kept as they are."""
    cell = lambda c: c if isinstance(c, Html) else esc(c)  # noqa: E731
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Html(f"<table>{head}{body}</table>")


def section(title: str, body: str | None) -> str:
    return f"<h2>{esc(title)}</h2>\n{body or NOT_RUN}\n"


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


# -- charts -----------------------------------------------------------------------------------
def figure(ncols: int = 1, width: float = 4.0, height: float = 2.7):
    """A bare matplotlib Figure and its axes: it renders with Agg, touching no pyplot state."""
    from matplotlib.figure import Figure  # lazy: only a report needs matplotlib

    fig = Figure(figsize=(width * ncols, height), dpi=90)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def png(fig) -> Html:
    # PNG rather than SVG: matplotlib's SVG carries xmlns/metadata URLs, the page must have none.
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Html(f'<img class="chart" alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">')


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


# -- sections ---------------------------------------------------------------------------------
def header(paths: RunPaths, cfg: RunConfig, judgments: list, summaries: list) -> str:
    """Run facts; the judge is taken from the records (what really ran), the config only as fallback."""
    judges = dict.fromkeys((r.judge_backend, r.judge_model, r.template, r.template_hash) for r in judgments + summaries)
    if not judges:
        judges = {(cfg.judge.llm.backend, cfg.judge.llm.model, cfg.judge.template, "(not judged yet)"): None}
    rows = [("run dir", str(paths.root)), ("policy model", cfg.policy.model),
            ("date", datetime.datetime.now().isoformat(timespec="seconds"))]
    rows += [("judge", f"{b} / {m} / template {t} (hash {h})") for b, m, t, h in judges]
    return f"<h1>capdpo run report</h1>\n{table(None, rows)}\n"


def counts_section(videos, qa, candidates, judgments, pairs) -> str:
    failed = sum(j.score is None for j in judgments)
    rows = [("videos (train)", sum(v.split == "train" for v in videos)), ("videos (test)", sum(v.split == "test" for v in videos)),
            ("QA items (train)", sum(q.split == "train" for q in qa)), ("QA items (test)", sum(q.split == "test" for q in qa)),
            ("candidates", len(candidates)), ("judgments scored", len(judgments) - failed),
            ("judgments failed", failed), ("preference pairs", len(pairs))]
    fig, [ax] = figure(width=5.5, height=2.8)
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color="C0")
    ax.tick_params(labelsize=8)
    ax.set_title("records per stage", fontsize=10)
    return table(["stage", "records"], rows) + png(fig)


def scores_section(judgments: list[Judgment]) -> str | None:
    if not judgments:
        return None
    fig, [ax] = figure()
    bars(ax, [*map(str, SCORES), "failed"], {"judgments": score_bins([j.score for j in judgments])},
         "judge scores of candidates", colors=["C0"] * len(SCORES) + ["grey"])
    return png(fig)


def pairs_section(pairs) -> str | None:
    if not pairs:
        return None
    chosen, rejected = [p.chosen_score for p in pairs], [p.rejected_score for p in pairs]
    margins = Counter(c - r for c, r in zip(chosen, rejected))
    fig, (a, b) = figure(2)
    bars(a, list(map(str, SCORES)), {"chosen": score_bins(chosen)[:-1], "rejected": score_bins(rejected)[:-1]},
         "scores of chosen vs rejected")
    bars(b, [f"{m:g}" for m in sorted(margins)], {"pairs": [margins[m] for m in sorted(margins)]}, "margin (chosen - rejected)")
    stats = table(["pairs", "mean chosen", "mean rejected", "mean margin"],
                  [(len(pairs), fmt(statistics.fmean(chosen)), fmt(statistics.fmean(rejected)),
                    fmt(statistics.fmean(c - r for c, r in zip(chosen, rejected))))])
    return stats + png(fig)


def training_section(rows: list[dict]) -> str | None:
    if not rows:
        return None
    steps = [r.get("step", i) for i, r in enumerate(rows)]
    panels = {"loss": ["loss"], "rewards/accuracies": ["rewards/accuracies"], "rewards/margins": ["rewards/margins"],
              "rewards/chosen & rejected": ["rewards/chosen", "rewards/rejected"]}
    fig, axes = figure(len(panels), width=3.2)
    for ax, (title, keys) in zip(axes, panels.items()):
        for key in keys:
            pts = [(s, r[key]) for s, r in zip(steps, rows) if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=key.split("/")[-1])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    last = rows[-1]
    summary = table(["steps logged", "last epoch", "last loss", "last accuracy", "last margin"],
                    [(len(rows), fmt(last.get("epoch")), fmt(last.get("loss")), fmt(last.get("rewards/accuracies")),
                      fmt(last.get("rewards/margins")))])
    return summary + png(fig)


def eval_section(summaries) -> str | None:
    if not summaries:
        return None
    rows = [(s.id, s.model, s.questions, s.judged, s.failed, fmt(s.accuracy, ".1%") if s.accuracy is not None else "–",
             fmt(s.mean_score), s.pass_score, s.judge_model, s.template_hash) for s in summaries]
    tags = [s.id for s in summaries]
    fig, (a, b, c) = figure(3, width=3.3)
    bars(a, tags, {"accuracy": [s.accuracy for s in summaries]}, "accuracy (judged only)")
    a.set_ylim(0, 1.1)
    bars(b, tags, {"mean score": [s.mean_score for s in summaries]}, "mean judge score")
    b.set_ylim(0, 5.5)
    bars(c, tags, {"judged": [s.judged for s in summaries], "failed": [s.failed for s in summaries]}, "judged vs failed")
    note = ('<p class="note">Accuracy and mean score are over judged answers only; failed judgments are '
            "counted apart, never as wrong answers.</p>")
    header_ = ["policy", "model", "questions", "judged", "failed", "accuracy", "mean score", "pass score", "judge model",
               "template hash"]
    return note + table(header_, rows) + png(fig)


def jpeg(img) -> str:
    img = img.copy()
    img.thumbnail((THUMB_WIDTH, THUMB_WIDTH))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70)
    return f'<img class="thumb" alt="frame" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def thumbnails(paths: RunPaths, video_id: str, video: str | None) -> Html:
    """THUMBS small frames of a video: from its frame folder when `capdpo frames` made one (cheap),
    else decoded from the video itself."""
    for source in (paths.frames / video_id, video):
        if not source:
            continue
        try:
            return Html("".join(jpeg(f) for f in sample_frames(source, THUMBS)))
        except (FrameError, OSError):
            continue
    return Html('<span class="empty">no frames</span>')


def answer_cell(text: str, score: float | None, judgment: Judgment | None) -> Html:
    """An answer, its score and the judge's verbatim reply (the explanation) folded under it."""
    if judgment is not None and judgment.score is None:
        verdict = f'<span class="failed">judge failed: {esc(judgment.failure)}</span>'
    else:
        verdict = f'<span class="score">score {fmt(score)}</span>'
    reply = (f"<details><summary>judge reply</summary><pre>{esc(judgment.raw_reply)}</pre></details>"
             if judgment is not None else "")
    return Html(f'{verdict}<div class="answer">{esc(text)}</div>{reply}')


def question_cell(question: str, reference: str) -> Html:
    return Html(f'<div class="answer"><b>Q:</b> {esc(question)}<br><b>Reference:</b> {esc(reference)}</div>')


def pair_examples(paths: RunPaths, pairs, judgments: dict[str, Judgment], videos: dict) -> str | None:
    if not pairs:
        return None
    thumbs: dict[str, Html] = {}  # one decode per video, however many of its questions are shown
    rows = []
    for p in pairs[:MAX_PAIRS]:
        if p.video_id not in thumbs:
            video = videos[p.video_id].video if p.video_id in videos else p.video
            thumbs[p.video_id] = thumbnails(paths, p.video_id, video)
        rows.append((Html(f"{thumbs[p.video_id]}<br>{esc(p.video_id)}"), question_cell(p.prompt, p.answer),
                     answer_cell(p.chosen, p.chosen_score, judgments.get(p.chosen_id)),
                     answer_cell(p.rejected, p.rejected_score, judgments.get(p.rejected_id))))
    more = f'<p class="note">First {MAX_PAIRS} of {len(pairs)} pairs.</p>' if len(pairs) > MAX_PAIRS else ""
    return table(["video", "question", "chosen", "rejected"], rows) + more


def prediction_cell(pred, judgment: Judgment | None) -> Html:
    return answer_cell(pred.answer, judgment.score if judgment else None, judgment)


def eval_examples(paths: RunPaths, qa: dict) -> str | None:
    before, after = ({p.qa_id: p for p in read_records(paths.predictions(t))} for t in ("before", "after"))
    common = [q for q in before if q in after][:MAX_EVAL_EXAMPLES]
    if not common:
        return None
    jb, ja = ({j.target_id: j for j in read_records(paths.eval_judgments(t))} for t in ("before", "after"))
    rows = []
    for q in common:
        item = qa.get(q)
        rows.append((question_cell(item.question if item else q, item.answer if item else "?"),
                     prediction_cell(before[q], jb.get(q)), prediction_cell(after[q], ja.get(q))))
    return table(["question", "before DPO", "after DPO"], rows)


def write_report(paths: RunPaths, cfg: RunConfig) -> Path:
    """Write ``paths.report`` from whatever stages have run so far and return its path."""
    videos, qa = read_records(paths.videos), read_records(paths.qa)
    candidates, judgments, pairs = read_records(paths.candidates), read_records(paths.judgments), read_records(paths.pairs)
    summaries = read_records(paths.eval_summary)
    body = [
        header(paths, cfg, judgments, summaries),
        section("Records per stage", counts_section(videos, qa, candidates, judgments, pairs)),
        section("Judge scores", scores_section(judgments)),
        section("Preference pairs: chosen vs rejected", pairs_section(pairs)),
        section("DPO training", training_section(read_metrics(paths.train / "metrics.jsonl"))),
        section("Evaluation before vs after DPO", eval_section(summaries)),
        section("Example preference pairs", pair_examples(paths, pairs, {j.target_id: j for j in judgments}, {v.id: v for v in videos})),
        section("Example evaluation answers", eval_examples(paths, {q.id: q for q in qa})),
    ]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>capdpo report: {esc(paths.root.name)}</title>'
            f"<style>{CSS}</style></head><body>\n{''.join(body)}</body></html>\n")
    paths.report.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.report.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(paths.report)  # atomic: a browser open on the old report never sees half a page
    return paths.report
