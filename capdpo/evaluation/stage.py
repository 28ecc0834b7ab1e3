"""Stage 9: greedy answers on held-out questions, graded by the LLM judge - or on a multiple-choice
benchmark, scored by its rules.

Two judge protocols (method.md, step 9), chosen by the judge's ``protocol``:

- ``caption_reward``: accuracy = share of judged answers scoring >= ``pass_score`` (paper: 3),
  plus the mean 1-5 score;
- ``video_chatgpt``: accuracy = yes / (yes + no), plus the mean 0-5 score.

Failed judgments are counted and shown apart, never folded in as wrong answers. Predictions and
judgments are resumable by id, so evaluating again costs nothing for what is already on disk.
Several processes may evaluate into one run folder at once: each claims a video's questions
(and the judge its batches) before doing them, and the summary is made from what is on disk, so
the worker that finishes last writes the complete one.

Multiple-choice benchmarks (:func:`run_multiple_choice`, capdpo.evaluation.mc): the benchmark's
official prompt, greedy answers, and its official (or lmms-eval 0.7.3's) answer extractor; no
judge, but TempCompass's rule misses when asked. Answers are resumable by id the same way; an
item whose video is missing or unreadable is recorded with its error (and tried again next time).
``answers_from`` scores a predictions file again without any model.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from capdpo.config import EvaluateConfig, FramesConfig, JudgeConfig, PolicyConfig, RayConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.evaluation.mc.items import MCBench, MCItem
from capdpo.evaluation.mc.prompts import PROMPT_SOURCES, mc_prompt, prompt_hash
from capdpo.evaluation.mc.score import (
    JudgeNeeded,
    format_mc_summary,
    read_answers,
    score_predictions,
    score_rules,
    scoring_name,
    summarize_mc,
)
from capdpo.judge.judge import CaptionJudge, JudgeIdentity, JudgeItem, judge_items
from capdpo.judge.on_ray import judge_items_on_ray
from capdpo.models.load import policy_from_config
from capdpo.policy.base import EncodedVideo, VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.policy.video import VideoEncoder
from capdpo.ray_engine import ActorErrors, Job, Output, Row, question_rows, row_videos, run_job
from capdpo.records import EvalSummary, Judgment, MCPrediction, Prediction, QAItem, RecordError, RecordFile, Video
from capdpo.rundir import HELD_OUT


def predict(videos: dict[str, Video], questions: list[QAItem], encoder: VideoEncoder, out: RecordFile[Prediction],
            cfg: EvaluateConfig, errors: ItemErrors) -> None:
    """Greedy answers of ``encoder.policy`` to the ``questions`` ``out`` lacks, each video encoded
    once; a video's questions are claimed first, so concurrent workers never answer one twice."""
    todo = questions_to_answer(questions, out)
    if not todo:
        return  # nothing to answer: the policy need not even be loaded
    answerer = Answerer(encoder, cfg)
    with out.claims() as claims, tqdm(total=sum(map(len, todo.values())), desc=f"evaluate: answer ({encoder.policy.name})",
                                      unit="question") as bar:

        def write(answered: list[Prediction]) -> None:
            out.append(answered)
            bar.update(len(answered))

        for video_id, qs in todo.items():
            mine = claims.take(qs)
            bar.update(len(qs) - len(mine))  # answered, or being answered by another worker
            if not mine:
                continue
            left_out, answered = answerer.add(videos[video_id], mine, errors)
            bar.update(left_out)
            write(answered)
        write(answerer.flush())


def questions_to_answer(questions: list[QAItem], out: RecordFile[Prediction]) -> dict[str, list[QAItem]]:
    """By video id, the ``questions`` ``out`` holds no answer to."""
    done = out.ids()
    todo: dict[str, list[QAItem]] = {}
    for q in questions:
        if q.id not in done:
            todo.setdefault(q.video_id, []).append(q)
    return todo


class Answerer:
    """The answering work of evaluation, the same for both engines: each video encoded once for its
    questions, greedy answers ``batch_size`` questions at a time (of one video or several)."""

    def __init__(self, encoder: VideoEncoder, cfg: EvaluateConfig):
        self.encoder, self.cfg = encoder, cfg
        self.pending: list[tuple[QAItem, EncodedVideo]] = []

    def add(self, video: Video, questions: list[QAItem], errors: ItemErrors,
            plan: list[QAItem] | None = None) -> tuple[int, list[Prediction]]:
        """Encode ``video`` for ``plan`` (default: ``questions``; a ray row holds part of a video's
        questions, the video planned for all of them as the local loop plans it) and queue
        ``questions``. Returns how many were left out (an unreadable video: recorded in ``errors``)
        and the answers given by now."""
        try:
            encoded = self.encoder.encode(video, [q.question for q in plan or questions], self.cfg.max_new_tokens)
        except ITEM_ERRORS as e:
            errors.record(video.id, e)
            return len(questions), []
        self.pending += [(q, encoded) for q in questions]
        answered = []
        while len(self.pending) >= self.cfg.batch_size:
            answered += self._answer()
        return 0, answered

    def flush(self) -> list[Prediction]:
        """The answers to the questions still queued."""
        answered = []
        while self.pending:
            answered += self._answer()
        return answered

    def _answer(self) -> list[Prediction]:
        batch, self.pending = self.pending[: self.cfg.batch_size], self.pending[self.cfg.batch_size:]
        policy = self.encoder.policy
        answers = policy.generate_batch([(video, q.question) for q, video in batch], temperature=0.0,
                                        max_new_tokens=self.cfg.max_new_tokens)
        return [Prediction(id=q.id, qa_id=q.id, video_id=q.video_id, answer=text, model=policy.name)
                for (q, _), [text] in zip(batch, answers)]


def summary_id(tag: str, dataset: str) -> str:
    """Summaries of the held-out questions keep the bare tag (``before``), suites ``<dataset>/<tag>``."""
    return tag if dataset == HELD_OUT else f"{dataset}/{tag}"


def accuracy_of(judgments: list[Judgment], protocol: str, pass_score: float) -> tuple[float | None, int]:
    """Accuracy over the judged answers and how many judged answers it leaves out (``undecided``:
    a video_chatgpt score whose yes/no votes tied). Failed judgments are never counted."""
    scored = [j for j in judgments if j.score is not None]
    if protocol == "video_chatgpt":
        verdicts = [j.verdict for j in scored if j.verdict in ("yes", "no")]
        return (verdicts.count("yes") / len(verdicts) if verdicts else None), len(scored) - len(verdicts)
    return (sum(j.score >= pass_score for j in scored) / len(scored) if scored else None), 0


def summarize(tag: str, model: str, questions: int, judgments: list[Judgment], judge: CaptionJudge | JudgeIdentity,
              pass_score: float, *, dataset: str = HELD_OUT, round_: int = 1, skipped: int = 0) -> EvalSummary:
    judge = judge if isinstance(judge, JudgeIdentity) else JudgeIdentity.of(judge)
    protocol = judge.protocol
    scores = [j.score for j in judgments if j.score is not None]
    accuracy, undecided = accuracy_of(judgments, protocol, pass_score)
    return EvalSummary(
        id=summary_id(tag, dataset), tag=tag, dataset=dataset, protocol=protocol, round=round_, model=model,
        questions=questions, judged=len(scores), failed=len(judgments) - len(scores), skipped=skipped, undecided=undecided,
        accuracy=accuracy, mean_score=statistics.fmean(scores) if scores else None, pass_score=pass_score,
        judge_backend=judge.backend, judge_model=judge.model, template=judge.template, template_hash=judge.template_hash,
    )


def format_summary(s: EvalSummary) -> str:
    """One line per evaluation, the judge and template hash beside the numbers they produced (a
    multiple-choice one: the extractor, prompt, frames and pixels)."""
    if s.protocol == "multiple_choice":
        return format_mc_summary(s)
    acc = "n/a" if s.accuracy is None else f"{s.accuracy:.1%}"
    score = "n/a" if s.mean_score is None else f"{s.mean_score:.2f}"
    rule = "yes/(yes+no)" if s.protocol == "video_chatgpt" else f"score>={s.pass_score:g}"
    extra = "".join(f", {n} {what}" for n, what in ((s.skipped, "skipped (missing media)"), (s.undecided, "undecided"))
                    if n)
    where = f"round {s.round} " if s.round > 1 else ""
    return (f"{where}{s.dataset}/{s.tag or s.id}: accuracy {acc} ({rule}), mean score {score}; {s.judged} judged, "
            f"{s.failed} failed of {s.questions} questions{extra} | judge {s.judge_backend}:{s.judge_model}, "
            f"template {s.template} {s.template_hash}")


def run_evaluate(tag: str, videos: dict[str, Video], questions: list[QAItem], policy: VideoPolicy, judge: CaptionJudge,
                 predictions: RecordFile[Prediction], judgments: RecordFile[Judgment], cfg: EvaluateConfig,
                 frames: FramesConfig, *, dataset: str = HELD_OUT, round_: int = 1, skipped: int = 0,
                 embed_cache: EmbeddingCache | None = None, fail_fast: bool = False,
                 summaries: RecordFile[EvalSummary] | None = None) -> EvalSummary:
    """Answer ``questions`` with ``policy`` (greedy) and judge the answers with ``judge``'s protocol.
    ``embed_cache``: the videos' embeddings come from (and go to) it, so evaluating before and
    after training (a frozen encoder) encodes each video once. The summary replaces any earlier
    one of the same id in ``summaries``, when given."""
    errors = ItemErrors(f"evaluate {dataset}", fail_fast)
    predict(videos, questions, VideoEncoder(policy, frames, embed_cache), predictions, cfg, errors)
    items = answers_to_judge(videos, questions, predictions)
    judge_items(judge, items, judgments, desc=f"evaluate: judge ({summary_id(tag, dataset)})")
    return summary_from_disk(tag, questions, predictions, judgments, judge, cfg, policy.name, dataset=dataset, round_=round_,
                             skipped=skipped, summaries=summaries)


def evaluate_on_ray(tag: str, videos: dict[str, Video], questions: list[QAItem], policy: PolicyConfig, cache_dir: str,
                    judge: JudgeConfig, reply_cache: Path | None, predictions: RecordFile[Prediction],
                    judgments: RecordFile[Judgment], cfg: EvaluateConfig, frames: FramesConfig, settings: RayConfig, *,
                    dataset: str = HELD_OUT, round_: int = 1, skipped: int = 0, embed_cache: EmbeddingCache | None = None,
                    fail_fast: bool = False, summaries: RecordFile[EvalSummary] | None = None) -> EvalSummary:
    """:func:`run_evaluate` as two Ray Data jobs (``engine: ray``): greedy answers from actors that
    load ``policy`` (a row: one generate call of the local loop's, ``cfg.batch_size`` questions with
    their videos), then their judgments from judge actors (``judge``: the settings of the protocol
    to judge with); this process writes both files and the summary, as the local engine does."""
    errors = ItemErrors(f"evaluate {dataset}", fail_fast)
    with predictions.claims() as claims:
        mine = {video_id: m for video_id, qs in questions_to_answer(questions, predictions).items() if (m := claims.take(qs))}
        rows = question_rows(mine, videos, cfg.batch_size)
        cache_root = str(embed_cache.root) if embed_cache is not None else None
        job = Job(f"evaluate: answer ({dataset})", rows, AnswerWorker, (policy, cache_dir, cfg, frames, cache_root), wants_gpu=True)
        run_job(job, settings, errors, predictions, claims)
    items = answers_to_judge(videos, questions, predictions)
    _, identity = judge_items_on_ray(judge, cache_dir, reply_cache, items, judgments, settings, fail_fast=fail_fast,
                                     desc=f"evaluate: judge ({summary_id(tag, dataset)})")
    return summary_from_disk(tag, questions, predictions, judgments, identity, cfg, policy.model, dataset=dataset,
                             round_=round_, skipped=skipped, summaries=summaries)


class AnswerWorker:
    """The ray engine's evaluation actor: the policy loaded once, then an :class:`Answerer` over each
    row (one generate call's questions), flushed at the row's end as the local loop's batch ends."""

    def __init__(self, policy: PolicyConfig, cache_dir: str, cfg: EvaluateConfig, frames: FramesConfig, embed_root: str | None):
        model = policy_from_config(policy, cache_dir)
        self.answerer = Answerer(VideoEncoder(model, frames, EmbeddingCache(embed_root) if embed_root else None), cfg)

    def __call__(self, rows: list[Row]) -> list[Output]:
        errors = ActorErrors("evaluate")
        answered: list[Prediction] = []
        for row in rows:
            for video, questions, plan in row_videos(row):
                answered += self.answerer.add(video, questions, errors, plan=plan)[1]
            answered += self.answerer.flush()
        return [Output(p.id, record=p.model_dump_json()) for p in answered] + errors.outputs


def answers_to_judge(videos: dict[str, Video], questions: list[QAItem], predictions: RecordFile[Prediction]) -> list[JudgeItem]:
    """The answers on disk to ``questions``, each with its question and video, for the judge."""
    qa = {q.id: q for q in questions}
    # the video through the question: a prediction of an older capdpo may carry a suite video's former id
    return [JudgeItem.for_answer(videos[qa[p.qa_id].video_id], qa[p.qa_id], p.answer, p.id)
            for p in predictions.read() if p.qa_id in qa]


def summary_from_disk(tag: str, questions: list[QAItem], predictions: RecordFile[Prediction], judgments: RecordFile[Judgment],
                      judge: CaptionJudge | JudgeIdentity, cfg: EvaluateConfig, model: str, *, dataset: str, round_: int,
                      skipped: int, summaries: RecordFile[EvalSummary] | None) -> EvalSummary:
    """The evaluation's summary from the files (``model``: the policy's name when no answer is on
    disk), kept in ``summaries`` when given.

    Read from disk, not from this worker's items, and under the summaries' lock: of concurrent
    workers, the one that summarizes last sees the most and its summary is the one kept."""
    qa = {q.id for q in questions}
    with summaries.lock() if summaries is not None else contextlib.nullcontext():
        answered = {p.id for p in predictions.read() if p.qa_id in qa}
        graded = [j for j in judgments.read() if j.target_id in answered]
        model = next((p.model for p in predictions.read()), model)
        summary = summarize(tag, model, len(questions), graded, judge, cfg.pass_score, dataset=dataset, round_=round_,
                            skipped=skipped)
        if summaries is not None:
            summaries.upsert(summary)
    return summary


# -- multiple-choice benchmarks -------------------------------------------------------------------

def answer_mc(bench: MCBench, policy: VideoPolicy, frames: FramesConfig, out: RecordFile[MCPrediction], *, extractor: str,
              batch_size: int, max_new_tokens: int, embed_cache: EmbeddingCache | None = None, fail_fast: bool = False) -> None:
    """Greedy answers of ``policy`` to the items ``out`` lacks, each in its benchmark's official
    prompt, each video encoded once for all its items (a video's items are claimed first, so
    concurrent workers never answer one twice). An item whose video cannot be read gets a row with
    the error; the rows are scored by the rules as they are written."""
    benchmark, errors = bench.benchmark.name, ItemErrors(f"evaluate {bench.dataset}", fail_fast)
    encoder = VideoEncoder(policy, frames, embed_cache)
    done = out.ids()
    todo = [item for item in bench.items if item.id not in done and item.id in bench.video_of]
    by_video: dict[str, list[MCItem]] = {}
    for item in todo:
        by_video.setdefault(bench.video_of[item.id].id, []).append(item)
    pending: list[tuple[MCItem, EncodedVideo]] = []

    def answer(pending: list[tuple[MCItem, EncodedVideo]]) -> list[tuple[MCItem, EncodedVideo]]:
        batch = pending[:batch_size]
        texts = policy.generate_batch([(video, mc_prompt(benchmark, item)) for item, video in batch], temperature=0.0,
                                      max_new_tokens=max_new_tokens)
        for (item, video), [text] in zip(batch, texts):
            extracted, correct = score_rules(benchmark, extractor, item, text)
            layout = video.layout
            out.append(MCPrediction(id=item.id, answer=text, extracted=extracted, correct=correct, categories=item.categories,
                                    model=policy.name, frames=layout.num_frames, pixels=layout.height * layout.width))
            bar.update()
        return pending[batch_size:]

    with out.claims() as claims, tqdm(total=len(todo), desc=f"evaluate {bench.dataset}: answer ({policy.name})",
                                      unit="item") as bar:
        for items in by_video.values():
            mine = claims.take(items)
            bar.update(len(items) - len(mine))  # answered, or being answered by another worker
            if not mine:
                continue
            video = bench.video_of[mine[0].id]
            try:
                encoded = encoder.encode(video, [mc_prompt(benchmark, item) for item in mine], max_new_tokens)
            except ITEM_ERRORS as e:
                errors.record(video.id, e)
                out.append([MCPrediction(id=item.id, categories=item.categories, error=str(e), model=policy.name)
                            for item in mine])
                bar.update(len(mine))
                continue
            pending += [(item, encoded) for item in mine]
            while len(pending) >= batch_size:
                pending = answer(pending)
        while pending:
            pending = answer(pending)


def _retry_errors(out: RecordFile[MCPrediction]) -> None:
    """Drop the rows of items that had no readable video, so this evaluation tries them again."""
    with out.lock():
        rows = out.all() if out.exists() else []
        if any(r.error is not None for r in rows):
            out.write([r for r in rows if r.error is None])


def record_missing(bench: MCBench, out: RecordFile[MCPrediction], fail_fast: bool = False) -> None:
    """A row with the error for each item whose video was not found (no model needed for them)."""
    errors, done = ItemErrors(f"evaluate {bench.dataset}", fail_fast), out.ids()
    for item in bench.items:
        if item.id in bench.missing and item.id not in done:
            errors.record(item.id, FileNotFoundError(bench.missing[item.id]))
            out.append(MCPrediction(id=item.id, categories=item.categories, error=bench.missing[item.id]))


def _rows_from(path: Path, bench: MCBench) -> list[MCPrediction]:
    """A predictions file's answers to ``bench``'s items (``--predictions``), with their categories;
    an answer to no item of the benchmark means the wrong file."""
    answers = read_answers(path)
    items = {item.id for item in bench.items}
    strangers = [i for i in answers if i not in items]
    if strangers:
        raise RecordError(f"{path}: {len(strangers)} prediction(s) answer no item of {bench.dataset} (e.g. {strangers[0]!r}); "
                          "is it the predictions file of this benchmark (and --data the same file)?")
    return [answers[item.id].model_copy(update={"categories": item.categories}) for item in bench.items if item.id in answers]


def run_multiple_choice(tag: str, bench: MCBench, out: RecordFile[MCPrediction], cfg: EvaluateConfig, frames: FramesConfig, *,
                        policy: Callable[[], VideoPolicy] | None = None, extractor: str = "official", judge=None,
                        answers_from: Path | None = None, max_new_tokens: int | None = None, round_: int = 1,
                        embed_cache: EmbeddingCache | None = None, fail_fast: bool = False,
                        summaries: RecordFile[EvalSummary] | None = None) -> EvalSummary:
    """Evaluate ``bench``: answer its items with ``policy()`` (called only when an item lacks an
    answer) - or take the answers of the predictions file ``answers_from``, no model at all - then
    score every answer with ``extractor`` (TempCompass: and ``judge``, a chat LLM, for what the rules
    cannot read), rewrite ``out`` scored, and summarize (the summary replaces any earlier one of
    the same id in ``summaries``)."""
    benchmark = bench.benchmark.name
    if not bench.items:
        raise ValueError(f"evaluate {bench.dataset}: no items to evaluate")
    if judge is None and any(item.task == "captioning" for item in bench.items):
        raise JudgeNeeded("TempCompass captioning is scored by an LLM answering multi-choice.json's question from the "
                          "model's caption (the official protocol has no rules for it): pass --llm-judge to use the run's judge")
    if answers_from is not None:
        out.write(_rows_from(answers_from, bench))
    else:
        _retry_errors(out)
        record_missing(bench, out, fail_fast)
        if any(item.id not in out.ids() for item in bench.items):
            if policy is None:
                raise ValueError(f"evaluate {bench.dataset}: items without an answer and no policy to answer them")
            answer_mc(bench, policy(), frames, out, extractor=extractor, batch_size=cfg.batch_size,
                      max_new_tokens=max_new_tokens or cfg.max_new_tokens, embed_cache=embed_cache, fail_fast=fail_fast)
    items = {item.id: item for item in bench.items}
    with out.lock():  # scored from disk, all at once: a resumed or re-scored file ends as one scoring made it
        rows = out.all()
        scored = {r.id: r for r in score_predictions(benchmark, extractor, items, [r for r in rows if r.id in items], judge)}
        merged = [scored.get(r.id, r) for r in rows]
        if merged != rows:
            out.write(merged)
    model = next((r.model for r in merged if r.id in items and r.model), "") or (answers_from.name if answers_from else "")
    with summaries.lock() if summaries is not None else contextlib.nullcontext():
        summary = summarize_mc(tag, bench.dataset, bench.items, scored, model=model, categories=bench.benchmark.categories,
                               extractor=extractor, prompt=PROMPT_SOURCES[benchmark],
                               prompt_hash=prompt_hash(benchmark, bench.items[0]),
                               scoring=scoring_name(judge) if benchmark == "tempcompass" else "rules", round_=round_)
        if summaries is not None:
            summaries.upsert(summary)
    return summary
