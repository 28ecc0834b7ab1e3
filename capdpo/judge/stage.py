"""Stage 6: judge the sampled candidates (``capdpo judge``).

Every candidate answer becomes a :class:`~capdpo.judge.judge.JudgeItem` and is judged into
``judgments.jsonl``, resumably, in this process or, with ``engine: ray``, by Ray actors
(:func:`judge_on_ray`); ``--dry-run`` (:func:`dry_run_judge`) sizes what would be sent instead of
sending it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from capdpo.config import JudgeConfig, RayConfig
from capdpo.judge.budget import Usage
from capdpo.judge.judge import CaptionJudge, JudgeItem, judge_items
from capdpo.judge.on_ray import judge_items_on_ray
from capdpo.records import Candidate, Judgment, QAItem, RecordFile, Video


def candidate_items(videos: dict[str, Video], qa: dict[str, QAItem], candidates: Iterable[Candidate]) -> Iterator[JudgeItem]:
    """Each candidate as the answer to grade, with its question and video."""
    for c in candidates:
        q = qa[c.qa_id]
        yield JudgeItem.for_answer(videos[q.video_id], q, c.answer, c.id)


def estimate(judge: CaptionJudge, items: list[JudgeItem]) -> dict:
    """What judging ``items`` would send, without sending anything (``judge --dry-run``).

    Requests = items x samples x judges; prompt tokens by :func:`~capdpo.judge.budget.count_tokens`;
    completion tokens at each judge's ``max_new_tokens`` (an upper bound); cost from
    ``price_per_million`` (None when a judge model has no price). Re-asks depend on the replies and
    are not included, nor are image tokens (``images`` counts the frames that would be sent).
    ``over_budget`` says which ceiling the whole run would pass, if any.
    """
    per_judge: dict[str, Usage] = {jl.key: Usage() for jl in judge.judges}
    for item in items:
        for key, usage in judge.plan_item(item).items():
            per_judge[key] += usage
    total = sum(per_judge.values(), Usage())
    images = len(items) * judge.cfg.samples * len(judge.judges) * judge.cfg.frames_num if judge.cfg.evidence == "frames" else 0
    return {"items": len(items), **total.as_dict(), "images": images,
            "judges": {key: u.as_dict() for key, u in per_judge.items()}, "over_budget": judge.budget.over(total)}


def run_judge(videos: RecordFile[Video], qa: RecordFile[QAItem], candidates: RecordFile[Candidate],
              out: RecordFile[Judgment], judge: CaptionJudge, *, retry_failed: bool = False) -> list[Judgment]:
    """The ``judge`` stage: every candidate not yet in ``out`` judged into it; returns the
    judgments of all candidates (failures kept, with their reason)."""
    return judge_items(judge, _items(videos, qa, candidates), out, retry_failed=retry_failed)


def judge_on_ray(videos: RecordFile[Video], qa: RecordFile[QAItem], candidates: RecordFile[Candidate],
                 out: RecordFile[Judgment], cfg: JudgeConfig, cache_dir: str | Path, reply_cache: Path | None,
                 settings: RayConfig, *, retry_failed: bool = False) -> list[Judgment]:
    """:func:`run_judge` as one Ray Data job (``engine: ray``): each actor holds its own judge."""
    return judge_items_on_ray(cfg, cache_dir, reply_cache, _items(videos, qa, candidates), out, settings,
                              retry_failed=retry_failed)[0]


def dry_run_judge(videos: RecordFile[Video], qa: RecordFile[QAItem], candidates: RecordFile[Candidate],
            out: RecordFile[Judgment], judge: CaptionJudge) -> dict:
    """:func:`estimate` of what :func:`run_judge` would send now: the candidates not yet in ``out``."""
    done = out.ids()
    return estimate(judge, [it for it in _items(videos, qa, candidates) if it.target_id not in done])


def _items(videos: RecordFile[Video], qa: RecordFile[QAItem], candidates: RecordFile[Candidate]) -> list[JudgeItem]:
    return list(candidate_items(videos.by_id(), qa.by_id(), candidates.read()))
