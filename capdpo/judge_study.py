"""Judges against the oracle of synthetic clips: claim 1 of the miniature reproduction and the
figures of docs/judge-distill.md (``benchmarks/judge_distill.py``).

Two answer sets, each answer graded 0/1 by the oracle:

* ``policy``: a run's sampled answers (``candidates.jsonl``), optionally of a seeded subset of its
  questions;
* ``variants``: reference answers with swapped facts (``capdpo.media.answers``) to every question of
  some synthetic scenes, the ``detail`` kind included: the caption-matters questions whose extra
  details only the caption can confirm, which a weak policy rarely answers right.

Each scorer (a judge model with a template, read in ``expected`` mode, or MiniLM similarity) scores
every answer; per question kind the study gives AUROC of the score for the oracle's 0/1 and strict
pairwise agreement (pairs of answers to one question that both order), and the paired difference
of AUROC between two scorers with a percentile-bootstrap interval over questions.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from capdpo.distill import expected_scores, judge_item, run_items, synthetic_labels
from capdpo.evaluation.agreement import agreement, auroc
from capdpo.judge.judge import JudgeItem
from capdpo.media.synthetic import load_scenes
from capdpo.oracle import Answer, oracle_scores, run_scenes_path
from capdpo.rundir import RunPaths
from capdpo.stats import percentile_interval, resample_indices

MINILM = "minilm"  # the similarity baseline's scorer spec


@dataclass(frozen=True)
class AnswerSet:
    """Answers ready for a judge prompt, each with the oracle's 0/1 and its question's kind."""

    items: list[JudgeItem]
    truth: dict[str, float]
    kind: dict[str, str]

    @property
    def group(self) -> dict[str, str]:
        return {it.target_id: it.qa_id for it in self.items}


def policy_answers(paths: RunPaths, questions: int | None = None, seed: int = 0) -> AnswerSet:
    """A run's sampled answers graded by the oracle; with ``questions``, only the answers to that
    many of its questions (a seeded sample)."""
    items = run_items(paths)
    if questions is not None:
        qa_ids = sorted({it.qa_id for it in items})
        keep = set(random.Random(seed).sample(qa_ids, min(questions, len(qa_ids))))
        items = [it for it in items if it.qa_id in keep]
    scored = oracle_scores([Answer(it.target_id, it.qa_id, it.answer) for it in items], paths.qa.by_id(),
                           load_scenes(run_scenes_path(paths.top)))
    truth = {r["id"]: float(r["score"]) for r in scored.rows}
    return AnswerSet([it for it in items if it.target_id in truth], truth, {r["id"]: r["kind"] for r in scored.rows})


def variant_answers(seed: int, clips: int, per_question: int) -> AnswerSet:
    """Swapped-fact variants of every question of ``clips`` scenes of synthetic seed ``seed``."""
    labels = synthetic_labels(seed, clips, per_question)
    return AnswerSet([judge_item(lab) for lab in labels], {lab.id: lab.score for lab in labels},
                     {lab.id: lab.kind for lab in labels})


def score_answers(spec: str, items: Sequence[JudgeItem], cache_dir: str, batch_size: int = 16,
                  desc: str | None = None) -> tuple[dict[str, float | None], float]:
    """Scores of one scorer and its answers per second. ``spec``: ``MODEL`` or ``MODEL@TEMPLATE``
    (a local judge in expected mode; the judge's reply cache makes a repeat free), or ``minilm``."""
    from capdpo.similarity import MiniLM

    started = time.perf_counter()
    if spec == MINILM:
        sims = MiniLM().similarity([it.answer for it in items], [it.reference for it in items])
        scores = {it.target_id: s for it, s in zip(items, sims)}
    else:
        model, _, template = spec.partition("@")
        scores = expected_scores(model, items, cache_dir, template=template or None, batch_size=batch_size,
                                 desc=desc or spec)
    return scores, len(items) / max(time.perf_counter() - started, 1e-9)


def figures(scores: Mapping[str, float | None], answers: AnswerSet, ids: Sequence[str]) -> dict:
    """AUROC and strict pairwise agreement of ``scores`` with the oracle on ``ids``."""
    rep = agreement({i: scores.get(i) for i in ids}, {i: answers.truth[i] for i in ids}, group=answers.group)
    return {"answers": rep.n_common, "failed": rep.n_failed_a, "auroc": rep.auroc,
            "pairwise_strict": rep.pairwise_agreement_strict, "strict_pairs": rep.n_pairs_strict,
            "kendall_tau_b": rep.kendall_tau_b}


def ids_by_kind(answers: AnswerSet) -> dict[str, list[str]]:
    """``{"all": every id, kind: its ids, ...}``."""
    kinds = sorted(set(answers.kind.values()))
    return {"all": list(answers.truth), **{k: [i for i in answers.truth if answers.kind[i] == k] for k in kinds}}


def auroc_difference(a: Mapping[str, float | None], b: Mapping[str, float | None], answers: AnswerSet,
                     ids: Sequence[str], resamples: int = 1000, seed: int = 0) -> dict | None:
    """AUROC(a) - AUROC(b) on ``ids`` (answers both scored), with a 95% interval from resampling
    questions (paired: both scorers' scores of the same answers move together)."""
    ids = [i for i in ids if a.get(i) is not None and b.get(i) is not None]
    y = [int(answers.truth[i]) for i in ids]
    full_a, full_b = auroc([a[i] for i in ids], y), auroc([b[i] for i in ids], y)
    if full_a is None or full_b is None:
        return None
    by_question = defaultdict(list)
    for i in ids:
        by_question[answers.group[i]].append(i)
    questions = sorted(by_question)
    diffs = []
    for row in resample_indices(len(questions), np.random.default_rng(seed), resamples):
        picked = [i for q in row for i in by_question[questions[q]]]
        ys = [int(answers.truth[i]) for i in picked]
        ra, rb = auroc([a[i] for i in picked], ys), auroc([b[i] for i in picked], ys)
        if ra is not None and rb is not None:
            diffs.append(ra - rb)
    low, high = percentile_interval(np.array(diffs))
    return {"diff": full_a - full_b, "low": low, "high": high}


def study(answers: AnswerSet, scores: Mapping[str, Mapping[str, float | None]],
          differences: Sequence[tuple[str, str]], resamples: int = 1000, seed: int = 0) -> dict:
    """Every scorer's figures per kind, and the AUROC difference of each ``(a, b)`` scorer pair on
    all answers and per kind."""
    by_kind = ids_by_kind(answers)
    return {"answers": len(answers.items), "share_correct": float(np.mean(list(answers.truth.values()))) if answers.truth else None,
            "kinds": {k: len(ids) for k, ids in by_kind.items()},
            "figures": {name: {k: figures(s, answers, ids) for k, ids in by_kind.items()} for name, s in scores.items()},
            "auroc_differences": {f"{a} - {b}": {k: auroc_difference(scores[a], scores[b], answers, ids, resamples, seed)
                                                 for k, ids in by_kind.items()}
                                  for a, b in differences}}
