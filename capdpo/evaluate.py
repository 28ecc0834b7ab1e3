"""Stage 9: greedy answers on held-out questions, graded by the LLM judge.

Two protocols (method.md, step 9), chosen by the judge's ``protocol``:

- ``caption_reward``: accuracy = share of judged answers scoring >= ``pass_score`` (paper: 3),
  plus the mean 1-5 score;
- ``video_chatgpt``: accuracy = yes / (yes + no), plus the mean 0-5 score.

Failed judgments are counted and shown apart, never folded in as wrong answers. Predictions and
judgments are resumable by id, so evaluating again costs nothing for what is already on disk.
Several processes may evaluate into one run folder at once: each claims a video's questions
(and the judge its batches) before doing them, and the summary is made from what is on disk, so
the worker that finishes last writes the complete one.
"""

from __future__ import annotations

import contextlib
import statistics

from tqdm import tqdm

from capdpo.config import EvaluateConfig, FramesConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.judge.judge import CaptionJudge, JudgeItem, judge_items
from capdpo.policy.base import EncodedVideo, VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.policy.video import VideoEncoder
from capdpo.records import EvalSummary, Judgment, Prediction, QAItem, RecordFile, Video
from capdpo.rundir import HELD_OUT


def predict(videos: dict[str, Video], questions: list[QAItem], encoder: VideoEncoder, out: RecordFile[Prediction],
            cfg: EvaluateConfig, errors: ItemErrors) -> None:
    """Greedy answers of ``encoder.policy`` to the ``questions`` ``out`` lacks, each video encoded
    once; a video's questions are claimed first, so concurrent workers never answer one twice."""
    policy = encoder.policy
    done = out.ids()
    todo = [q for q in questions if q.id not in done]
    if not todo:
        return  # nothing to answer: the policy need not even be loaded
    by_video: dict[str, list[QAItem]] = {}
    for q in todo:
        by_video.setdefault(q.video_id, []).append(q)
    pending: list[tuple[QAItem, EncodedVideo]] = []  # questions of one or several videos, answered batch_size at a time

    def answer(pending: list[tuple[QAItem, EncodedVideo]]) -> list[tuple[QAItem, EncodedVideo]]:
        batch = pending[: cfg.batch_size]
        answers = policy.generate_batch([(video, q.question) for q, video in batch], temperature=0.0,
                                        max_new_tokens=cfg.max_new_tokens)
        for (q, _), [text] in zip(batch, answers):
            out.append(Prediction(id=q.id, qa_id=q.id, video_id=q.video_id, answer=text, model=policy.name))
            bar.update()
        return pending[cfg.batch_size:]

    with out.claims() as claims, tqdm(total=len(todo), desc=f"evaluate: answer ({policy.name})", unit="question") as bar:
        for video_id, qs in by_video.items():
            mine = claims.take(qs)
            bar.update(len(qs) - len(mine))  # answered, or being answered by another worker
            if not mine:
                continue
            qs = mine
            try:
                video = encoder.encode(videos[video_id], [q.question for q in qs], cfg.max_new_tokens)
            except ITEM_ERRORS as e:
                errors.record(video_id, e)
                bar.update(len(qs))
                continue
            pending += [(q, video) for q in qs]
            while len(pending) >= cfg.batch_size:
                pending = answer(pending)
        while pending:
            pending = answer(pending)


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


def summarize(tag: str, model: str, questions: int, judgments: list[Judgment], judge: CaptionJudge, pass_score: float, *,
              dataset: str = HELD_OUT, round_: int = 1, skipped: int = 0) -> EvalSummary:
    protocol = judge.cfg.protocol
    scores = [j.score for j in judgments if j.score is not None]
    accuracy, undecided = accuracy_of(judgments, protocol, pass_score)
    return EvalSummary(
        id=summary_id(tag, dataset), tag=tag, dataset=dataset, protocol=protocol, round=round_, model=model,
        questions=questions, judged=len(scores), failed=len(judgments) - len(scores), skipped=skipped, undecided=undecided,
        accuracy=accuracy, mean_score=statistics.fmean(scores) if scores else None, pass_score=pass_score,
        judge_backend=judge.llm.backend, judge_model=judge.model_id, template=judge.template.name,
        template_hash=judge.template.hash,
    )


def format_summary(s: EvalSummary) -> str:
    """One line per evaluation, the judge and template hash beside the numbers they produced."""
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
    qa = {q.id: q for q in questions}
    # the video through the question: a prediction of an older capdpo may carry a suite video's former id
    items = [JudgeItem.for_answer(videos[qa[p.qa_id].video_id], qa[p.qa_id], p.answer, p.id)
             for p in predictions.read() if p.qa_id in qa]
    judge_items(judge, items, judgments, desc=f"evaluate: judge ({summary_id(tag, dataset)})")
    # Read from disk, not from this worker's items, and under the summaries' lock: of concurrent
    # workers, the one that summarizes last sees the most and its summary is the one kept.
    with summaries.lock() if summaries is not None else contextlib.nullcontext():
        answered = {p.id for p in predictions.read() if p.qa_id in qa}
        graded = [j for j in judgments.read() if j.target_id in answered]
        model = next((p.model for p in predictions.read()), policy.name)
        summary = summarize(tag, model, len(questions), graded, judge, cfg.pass_score, dataset=dataset, round_=round_,
                            skipped=skipped)
        if summaries is not None:
            summaries.upsert(summary)
    return summary
