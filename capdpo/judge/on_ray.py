"""Judging many answers on the ray engine (``engine: ray``): :func:`judge_items_on_ray` is
:func:`~capdpo.judge.judge.judge_items` as one Ray Data job, for the judge stage and evaluation.

Each actor builds its own :class:`~capdpo.judge.judge.CaptionJudge` (its LLMs, the run's reply
cache, re-asks) and judges its batches with :func:`~capdpo.judge.judge.judge_affordable`, the
local loop's per-batch work, so both engines write the same judgments. A failed judge call is a
Judgment with its reason, as in the local loop. The budget's ceilings hold for the whole job:
every actor's judge counts its spend into one :class:`~capdpo.judge.budget.UsagePool` (a Ray
actor of its own), and the answers a ceiling kept back are reported by a
:class:`~capdpo.errors.BudgetExceeded` once everything judged is saved.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from capdpo.config import JudgeConfig, RayConfig
from capdpo.errors import BudgetExceeded, ItemErrors
from capdpo.judge.budget import JudgeBudget, PooledBudget, UsagePool
from capdpo.judge.judge import (
    CaptionJudge,
    JudgeIdentity,
    JudgeItem,
    check_evidence,
    check_same_judge,
    drop_failures,
    judge_affordable,
    judge_batch_size,
)
from capdpo.ray_engine import BUDGET_REFUSED, Job, Output, Row, Shared, batches, run_job, run_task
from capdpo.records import Judgment, RecordFile


def judge_items_on_ray(cfg: JudgeConfig, cache_dir: str | Path, reply_cache: Path | None, items: list[JudgeItem],
                       out: RecordFile[Judgment], settings: RayConfig, *, retry_failed: bool = False, desc: str = "judge",
                       fail_fast: bool = False) -> tuple[list[Judgment], JudgeIdentity]:
    """Judge every item not already judged in ``out`` on Ray, as ``judge_items`` does in one process
    (the same checks first, the same claims, so a local worker on the same file skips these ids).
    Returns the judgments of all ``items`` and the judge's identity."""
    check_evidence(cfg, items)
    out.drop_duplicates()
    forget = drop_failures(items, out) if retry_failed and out.exists() else []
    identity = run_task(settings, judge_identity, cfg, str(cache_dir), reply_cache, forget, wants_gpu=runs_a_model(cfg))
    check_same_judge(identity, out)
    pool = Shared(settings, UsagePool) if JudgeBudget(cfg).limited else None
    errors = ItemErrors(desc, fail_fast)
    with out.claims() as claims:
        mine = set(claims.claim([it.target_id for it in items]))
        rows = [Row(batch[0].target_id, json.dumps([dataclasses.asdict(it) for it in batch]))
                for batch in batches([it for it in items if it.target_id in mine], judge_batch_size(cfg))]
        job = Job(desc, rows, JudgeWorker, (cfg, str(cache_dir), reply_cache, pool), wants_gpu=runs_a_model(cfg))
        result = run_job(job, settings, errors, out, claims)
    if result.refused:
        raise BudgetExceeded(f"judge budget reached: {result.refused[0][1]}. {len(result.refused)} answer(s) not sent; "
                             f"everything judged is saved in {out.path}. Run again (with a larger limit) to go on.")
    wanted = {it.target_id for it in items}
    return [j for j in out.read() if j.target_id in wanted], identity


def runs_a_model(cfg: JudgeConfig) -> bool:
    """Whether the judge runs an LLM in its own process (hf, vllm), which then wants a GPU."""
    return any(llm.backend != "openai" for llm in (cfg.llm, *cfg.ensemble))


def judge_identity(cfg: JudgeConfig, cache_dir: str, reply_cache: Path | None, forget: list[JudgeItem]) -> JudgeIdentity:
    """Run once on the cluster before the job: the judge's identity (what its judgments record), and
    for ``--retry-failed`` the cached replies of ``forget`` removed, so those answers are asked again."""
    judge = CaptionJudge(cfg, cache_dir, reply_cache=reply_cache)
    judge.forget(forget)
    return JudgeIdentity.of(judge)


class JudgeWorker:
    """The ray engine's judge actor: a CaptionJudge whose budget is the job's pool; a row is one judge
    call's answers (``judge_batch_size``), as the local loop calls the judge."""

    def __init__(self, cfg: JudgeConfig, cache_dir: str, reply_cache: Path | None, pool: Shared | None):
        budget = PooledBudget(cfg, pool) if pool is not None else None
        self.judge = CaptionJudge(cfg, cache_dir, reply_cache=reply_cache, budget=budget)

    def __call__(self, rows: list[Row]) -> list[Output]:
        outputs = []
        for row in rows:  # one judge call's answers each, as the local loop's batches
            items = [JudgeItem(**fields) for fields in json.loads(row.payload)]
            judged = judge_affordable(self.judge, items)
            outputs += [Output(j.id, record=j.model_dump_json()) for j in judged]
            outputs += [Output(it.target_id, error=self.judge.budget.exhausted or "", kind=BUDGET_REFUSED)
                        for it in items[len(judged):]]
        return outputs
