"""Stage 9: greedy answers on held-out questions, graded by the caption judge.

accuracy = share of judged answers scoring >= ``pass_score`` (paper: 3), plus the mean score.
Failed judgments are counted and shown apart, never folded in as wrong answers.
"""

from __future__ import annotations

import statistics

from tqdm import tqdm

from capdpo.config import EvaluateConfig, FramesConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.judge import CaptionJudge, JudgeItem, judge_items
from capdpo.policy import VideoPolicy
from capdpo.records import EvalSummary, Judgment, Prediction, QAItem, RecordFile, Video
from capdpo.sample import encode_video


def predict(videos: dict[str, Video], questions: list[QAItem], policy: VideoPolicy, out: RecordFile[Prediction],
            cfg: EvaluateConfig, frames: FramesConfig, errors: ItemErrors) -> None:
    done = out.ids()
    todo = [q for q in questions if q.id not in done]
    by_video: dict[str, list[QAItem]] = {}
    for q in todo:
        by_video.setdefault(q.video_id, []).append(q)
    with tqdm(total=len(todo), desc=f"evaluate: answer ({policy.name})", unit="question") as bar:
        for video_id, qs in by_video.items():
            try:
                video = encode_video(policy, videos[video_id], frames.num_frames)
            except ITEM_ERRORS as e:
                errors.record(video_id, e)
                bar.update(len(qs))
                continue
            for q in qs:
                [answer] = policy.generate(video, q.question, temperature=0.0, max_new_tokens=cfg.max_new_tokens)
                out.append(Prediction(id=q.id, qa_id=q.id, video_id=video_id, answer=answer, model=policy.name))
                bar.update()


def summarize(tag: str, model: str, questions: int, judgments: list[Judgment], judge: CaptionJudge, pass_score: float) -> EvalSummary:
    scores = [j.score for j in judgments if j.score is not None]
    return EvalSummary(
        id=tag, model=model, questions=questions, judged=len(scores), failed=len(judgments) - len(scores),
        accuracy=sum(s >= pass_score for s in scores) / len(scores) if scores else None,
        mean_score=statistics.fmean(scores) if scores else None, pass_score=pass_score,
        judge_backend=judge.llm.backend, judge_model=judge.model_id, template=judge.template.name,
        template_hash=judge.template.hash,
    )


def run_evaluate(tag: str, videos_file: RecordFile[Video], qa_file: RecordFile[QAItem], policy: VideoPolicy,
                 judge: CaptionJudge, predictions: RecordFile[Prediction], judgments: RecordFile[Judgment],
                 cfg: EvaluateConfig, frames: FramesConfig, *, fail_fast: bool = False) -> EvalSummary:
    """The ``evaluate`` stage for one policy (``tag``: before / after / round name)."""
    videos = videos_file.by_id()
    questions = [q for q in qa_file.read() if q.split == "test"]
    errors = ItemErrors("evaluate", fail_fast)
    predict(videos, questions, policy, predictions, cfg, frames, errors)
    qa = {q.id: q for q in questions}
    items = [JudgeItem(p.id, p.qa_id, videos[p.video_id].caption, qa[p.qa_id].question, qa[p.qa_id].answer, p.answer)
             for p in predictions.read() if p.qa_id in qa]
    graded = judge_items(judge, items, judgments, batch_size=judge.cfg.llm.batch_size, desc=f"evaluate: judge ({tag})")
    return summarize(tag, policy.name, len(questions), graded, judge, cfg.pass_score)
