"""The orchestrator: a run folder and the stages that fill it, composed by ``capdpo run``.

    data -> frames -> qa -> sample -> judge -> pairs -> evaluate(before) -> train -> evaluate(after) -> report

Each stage reads and writes the files below, skips work already on disk, and can be run alone
(``capdpo <stage> --run-dir DIR``). Killing a run at any point and starting it again ends with
the same records as an uninterrupted run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from capdpo.config import RunConfig, save_config
from capdpo.records import (Candidate, EvalSummary, Judgment, PreferencePair, Prediction, QAItem, RecordFile, Video,
                            write_jsonl)

log = logging.getLogger("capdpo")
STAGES = ("data", "frames", "qa", "sample", "judge", "pairs", "evaluate", "train", "report")


@dataclass(frozen=True)
class RunPaths:
    """Where each stage's output lives inside a run folder."""

    root: Path

    @property
    def videos(self) -> RecordFile[Video]:
        return RecordFile(self.root / "videos.jsonl", Video)

    @property
    def qa_given(self) -> RecordFile[QAItem]:
        return RecordFile(self.root / "qa_given.jsonl", QAItem)

    @property
    def qa(self) -> RecordFile[QAItem]:
        return RecordFile(self.root / "qa.jsonl", QAItem)

    @property
    def candidates(self) -> RecordFile[Candidate]:
        return RecordFile(self.root / "candidates.jsonl", Candidate)

    @property
    def judgments(self) -> RecordFile[Judgment]:
        return RecordFile(self.root / "judgments.jsonl", Judgment)

    @property
    def pairs(self) -> RecordFile[PreferencePair]:
        return RecordFile(self.root / "pairs.jsonl", PreferencePair)

    def predictions(self, tag: str) -> RecordFile[Prediction]:
        return RecordFile(self.root / "eval" / f"{tag}_predictions.jsonl", Prediction)

    def eval_judgments(self, tag: str) -> RecordFile[Judgment]:
        return RecordFile(self.root / "eval" / f"{tag}_judgments.jsonl", Judgment)

    @property
    def eval_summary(self) -> RecordFile[EvalSummary]:
        return RecordFile(self.root / "eval" / "summary.jsonl", EvalSummary)

    frames = property(lambda self: self.root / "frames")
    media = property(lambda self: self.root / "media")
    train = property(lambda self: self.root / "train")
    report = property(lambda self: self.root / "report.html")
    config = property(lambda self: self.root / "config.yaml")


class Run:
    """A run folder plus lazily loaded models, shared by the stages of one process."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.paths = RunPaths(Path(cfg.run_dir))
        self.paths.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.paths.config)

    @cached_property
    def policy(self):
        from capdpo.policy import VideoPolicy

        p = self.cfg.policy
        return VideoPolicy.load(p.model, self.cfg.cache_dir, p.device, p.dtype)

    @cached_property
    def judge(self):
        from capdpo.judge import CaptionJudge

        return CaptionJudge(self.cfg.judge, self.cfg.cache_dir)

    # -- stages -----------------------------------------------------------------------------
    def data(self) -> None:
        from capdpo.data import run_data

        n = run_data(self.cfg.data, self.paths.media, self.paths.videos, self.paths.qa_given)
        log.info("data: %d videos", n)

    def frames(self) -> None:
        from capdpo.errors import ITEM_ERRORS, ItemErrors
        from capdpo.frames import extract_frame_folder
        from tqdm import tqdm

        errors = ItemErrors("frames", self.cfg.fail_fast)
        for v in tqdm(self.paths.videos.all(), desc="frames", unit="video"):
            try:
                extract_frame_folder(v.video, self.paths.frames / v.id, fps=self.cfg.frames.fps, width=self.cfg.frames.width)
            except ITEM_ERRORS as e:
                errors.record(v.id, e)

    def qa(self) -> None:
        from capdpo.qa import run_qa

        log.info("qa: %s", run_qa(self.paths.videos, self.paths.qa_given, self.paths.qa, self.cfg.qa, self.cfg.cache_dir))

    def sample(self) -> None:
        from capdpo.sample import run_sample

        run_sample(self.paths.videos, self.paths.qa, self.paths.candidates, self.policy, self.cfg.sample, self.cfg.frames,
                   fail_fast=self.cfg.fail_fast)

    def judge_candidates(self, retry_failed: bool = False) -> None:
        from capdpo.judge import candidate_items, judge_items

        items = list(candidate_items(self.paths.videos.by_id(), self.paths.qa.by_id(), self.paths.candidates.read()))
        done = judge_items(self.judge, items, self.paths.judgments, batch_size=self.cfg.judge.llm.batch_size,
                           retry_failed=retry_failed)
        failed = sum(j.failure is not None for j in done)
        log.info("judge: %d judged, %d failed (kept with their reason)", len(done) - failed, failed)

    def pairs(self) -> None:
        from capdpo.formats import paper_dpo_rows, trl_rows
        from capdpo.pairs import run_pairs

        stats = run_pairs(self.paths.videos, self.paths.qa, self.paths.candidates, self.paths.judgments,
                          self.paths.pairs, self.cfg.pairs)
        pairs = self.paths.pairs.all()
        write_jsonl(self.paths.root / "pairs_trl.jsonl", trl_rows(pairs))
        write_jsonl(self.paths.root / "pairs_paper.jsonl", paper_dpo_rows(pairs))
        log.info("pairs: %s", stats)

    def evaluate(self, tag: str) -> EvalSummary:
        from capdpo.evaluate import run_evaluate

        summary = run_evaluate(tag, self.paths.videos, self.paths.qa, self.policy, self.judge, self.paths.predictions(tag),
                               self.paths.eval_judgments(tag), self.cfg.evaluate, self.cfg.frames, fail_fast=self.cfg.fail_fast)
        others = [s for s in self.paths.eval_summary.read() if s.id != tag]
        self.paths.eval_summary.write(others + [summary])
        acc = "n/a" if summary.accuracy is None else f"{summary.accuracy:.1%}"
        log.info("evaluate[%s]: accuracy %s, mean score %s, %d judged, %d failed (judge %s, template %s)", tag, acc,
                 summary.mean_score, summary.judged, summary.failed, summary.judge_model, summary.template_hash)
        return summary

    def train(self) -> Path:
        from capdpo.policy import VideoPolicy
        from capdpo.train import run_train

        out = run_train(self.paths.pairs, self.paths.videos, self.policy, self.cfg.train, self.cfg.frames,
                        self.paths.train, fail_fast=self.cfg.fail_fast)
        p = self.cfg.policy
        # the next stages use the trained checkpoint, loaded as any user checkpoint would be
        self.__dict__["policy"] = VideoPolicy.load(str(out), self.cfg.cache_dir, p.device, p.dtype)
        return out

    def report(self) -> Path:
        from capdpo.report import write_report

        return write_report(self.paths, self.cfg)

    def run_all(self) -> None:
        """Every stage in order; each skips what is already done."""
        self.data()
        self.frames()
        self.qa()
        self.sample()
        self.judge_candidates()
        self.pairs()
        self.evaluate("before")
        self.train()
        self.evaluate("after")
        path = self.report()
        log.info("report: %s", path)
