"""Stage 7: preference pairs from judged candidates.

Per question: chosen = the best-scoring candidate, rejected = the worst, kept only when the
chosen scores at least ``min_chosen``, the rejected at most ``max_rejected`` and they differ by
at least ``min_gap`` (ties are always dropped). With ``per_question`` > 1 the next pairs that meet
the same thresholds follow, widest gap first, each answer text used once before any is used
again, so a question with several right and wrong answers gives several different pairs. Failed
judgments take no part: a candidate whose judge failed is neither good nor bad, just unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

from capdpo.config import PairsConfig
from capdpo.records import Candidate, Judgment, PreferencePair, QAItem, RecordFile, Video

if TYPE_CHECKING:
    from capdpo.judge.judge import CaptionJudge


@dataclass
class PairStats:
    questions: int = 0
    pairs: int = 0
    no_scored_candidates: int = 0
    ties: int = 0
    below_thresholds: int = 0
    pairwise_rejected: int = 0
    pairwise_failed: int = 0

    def __str__(self) -> str:
        pairwise = (f", {self.pairwise_rejected} not confirmed by the pairwise check, {self.pairwise_failed} pairwise failures"
                    if self.pairwise_rejected or self.pairwise_failed else "")
        return (f"{self.pairs} pairs from {self.questions} questions "
                f"(dropped: {self.ties} all tied, {self.below_thresholds} outside score thresholds, "
                f"{self.no_scored_candidates} without 2 scored candidates{pairwise})")


def select_pair(scored: list[tuple[Candidate, float]], cfg: PairsConfig) -> tuple[tuple[Candidate, float], tuple[Candidate, float]] | str:
    """Best and worst candidate, or the reason there is no pair. Among equal scores the earliest
    sample wins, so the choice is deterministic."""
    if len(scored) < 2:
        return "no_scored_candidates"
    best = max(scored, key=lambda cs: cs[1])
    worst = min(scored, key=lambda cs: cs[1])
    if best[1] == worst[1]:
        return "ties"
    if best[1] - worst[1] < cfg.min_gap or best[1] < cfg.min_chosen or worst[1] > cfg.max_rejected:
        return "below_thresholds"
    return best, worst


Scored = tuple[Candidate, float]


def select_pairs(scored: list[Scored], cfg: PairsConfig) -> list[tuple[Scored, Scored]] | str:
    """Up to ``cfg.per_question`` (chosen, rejected) pairs, the first being :func:`select_pair`'s;
    or the reason there is none. Deterministic: among equal gaps the earlier samples come first."""
    first = select_pair(scored, cfg)
    if isinstance(first, str):
        return first
    picked = [first]
    options = sorted(((c, r) for c in scored for r in scored
                      if c[1] > r[1] and c[1] - r[1] >= cfg.min_gap and c[1] >= cfg.min_chosen and r[1] <= cfg.max_rejected),
                     key=lambda pair: pair[1][1] - pair[0][1])  # stable: sampling order breaks ties
    texts = {(first[0][0].answer, first[1][0].answer)}  # (chosen, rejected) texts already paired
    used = {first[0][0].answer, first[1][0].answer}
    for fresh_only in (True, False):  # answers not yet in a pair first, so pairs differ as much as they can
        for c, r in options:
            if len(picked) == cfg.per_question:
                return picked
            key = (c[0].answer, r[0].answer)
            if key in texts or (fresh_only and (key[0] in used or key[1] in used)):
                continue
            picked.append((c, r))
            texts.add(key)
            used.update(key)
    return picked


def pair_id(qa_id: str, k: int) -> str:
    """The first pair of a question keeps the question's id (as with one pair per question)."""
    return qa_id if k == 0 else f"{qa_id}/{k}"


def build_pairs(videos: dict[str, Video], qa: dict[str, QAItem], candidates: list[Candidate],
                scores: Mapping[str, float | None], cfg: PairsConfig) -> tuple[list[PreferencePair], PairStats]:
    """Pairs from ``{candidate id: score}`` (a judge's, or any scorer's: the oracle, a similarity);
    ``None`` or a missing id is an unscored candidate."""
    by_question: dict[str, list[tuple[Candidate, float]]] = {}
    for c in candidates:
        if qa[c.qa_id].split != "train":
            continue  # a held-out question never feeds training, whatever was sampled for it
        scored = by_question.setdefault(c.qa_id, [])  # a question with no scored candidate still counts
        score = scores.get(c.id)
        if score is not None:
            scored.append((c, score))
    stats, pairs = PairStats(questions=len(by_question)), []
    for qa_id, scored in by_question.items():
        picked = select_pairs(scored, cfg)
        if isinstance(picked, str):
            setattr(stats, picked, getattr(stats, picked) + 1)
            continue
        q = qa[qa_id]
        pairs.extend(PreferencePair(
            id=pair_id(qa_id, k), qa_id=qa_id, video_id=q.video_id, video=videos[q.video_id].video, prompt=q.question,
            answer=q.answer, chosen=chosen.answer, rejected=rejected.answer, chosen_score=cs, rejected_score=rs,
            chosen_id=chosen.id, rejected_id=rejected.id,
        ) for k, ((chosen, cs), (rejected, rs)) in enumerate(picked))
    stats.pairs = len(pairs)
    return pairs, stats


def confirm_pairwise(pairs: list[PreferencePair], videos: dict[str, Video], qa: dict[str, QAItem], judge: CaptionJudge,
                     stats: PairStats) -> list[PreferencePair]:
    """Keep the pairs whose chosen answer the judge prefers in both presentation orders."""
    from capdpo.judge.judge import JudgeItem  # the judge and its LLM backends load only for the pairwise check

    kept = []
    for p in tqdm(pairs, desc="pairs: pairwise check", unit="pair"):
        video, q = videos[p.video_id], qa[p.qa_id]
        result = judge.pairwise_preference(JudgeItem.for_answer(video, q, p.chosen, p.chosen_id),
                                           JudgeItem.for_answer(video, q, p.rejected, p.rejected_id))
        if result.preference == 1:
            kept.append(p)
        elif result.preference is None:
            stats.pairwise_failed += 1
        else:
            stats.pairwise_rejected += 1
    stats.pairs = len(kept)
    return kept


def run_pairs(videos_file: RecordFile[Video], qa_file: RecordFile[QAItem], candidates_file: RecordFile[Candidate],
              judgments_file: RecordFile[Judgment], out: RecordFile[PreferencePair], cfg: PairsConfig,
              judge: CaptionJudge | None = None) -> PairStats:
    """The ``pairs`` stage. Pairs are a function of the judgments, so the file is rewritten
    whole (atomically) rather than appended. With ``cfg.pairwise_check``, ``judge`` confirms each."""
    videos, qa = videos_file.by_id(), qa_file.by_id()
    scores = {j.id: j.score for j in judgments_file.read()}
    pairs, stats = build_pairs(videos, qa, candidates_file.all(), scores, cfg)
    if cfg.pairwise_check:
        pairs = confirm_pairwise(pairs, videos, qa, judge, stats)
    out.write(pairs)
    return stats
