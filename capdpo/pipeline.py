"""The orchestrator: a run folder and the stages that fill it, composed by ``capdpo run``.

    data -> frames -> qa [-> sft] -> sample -> judge -> pairs -> evaluate(before) -> train -> evaluate(after) -> report

With ``sft.enabled`` the policy is first trained on the run's captions and QA (``capdpo sft``), and
every later stage starts from that checkpoint.

With ``train.algorithm: grpo`` the round is evaluate(before) -> grpo -> evaluate(after): online GRPO
samples and judges the train questions' answers inside its loop.

With ``rounds: k`` (iterative DPO) the part from ``sample`` to ``evaluate(after)`` runs k times, each
round starting from the policy the previous round trained. Round 1 fills the run folder itself
(the layout of a one-round run); round k >= 2 fills ``round-k/`` with its own candidates,
judgments, pairs, train/ and eval/, reading videos, QA and frames from the run folder.

Each stage reads and writes the files below, skips work already on disk, and can be run alone
(``capdpo <stage> --run-dir DIR``). Killing a run at any point and starting it again ends with
the same records as an uninterrupted run.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

from capdpo.config import PolicyConfig, RunConfig, SuiteConfig, save_config
from capdpo.records import EvalSummary, check_writable
from capdpo.rundir import HELD_OUT, RunPaths, require

log = logging.getLogger("capdpo")


class Run:
    """A run folder plus lazily loaded models, shared by the stages of one process."""

    def __init__(self, cfg: RunConfig, *, save: bool = True):
        self.cfg = cfg
        self.paths = RunPaths(Path(cfg.run_dir))  # round 1's; enter_round moves the round stages elsewhere
        self.checkpoint: str | None = None  # the policy's checkpoint once use_policy named one
        check_writable(self.paths.root)  # a read-only or immutable run folder stops here, before any model loads
        if save:
            self.save_config()

    def save_config(self) -> None:
        """Write the config into the run folder (the CLI does it once a command succeeded, so a
        failing ``--set`` is not repeated by the next plain run)."""
        save_config(self.cfg, self.paths.config)

    def enter_round(self, k: int) -> None:
        """Point the round stages (sample .. evaluate) at round ``k``'s folder."""
        self.paths = self.paths.round(k)
        check_writable(self.paths.root)

    def use_policy(self, model: str) -> None:
        """Evaluate (or go on with) another checkpoint than ``policy.model``, leaving the run's
        config.yaml as it is. It is loaded when a stage first needs it (with ``engine: ray``, by the actors)."""
        self.checkpoint = model
        self.__dict__.pop("policy", None)

    def policy_settings(self) -> PolicyConfig:
        """The ``policy`` section, its model the checkpoint :meth:`use_policy` named, else the run's
        SFT result (``sft/policy``) once `capdpo sft` has finished and ``sft.enabled`` is on: every
        stage after sft starts from it."""
        from capdpo.training import DONE

        if self.checkpoint is not None:
            return self.cfg.policy.model_copy(update={"model": self.checkpoint})
        tuned = self.paths.sft / "policy"
        if self.cfg.sft.enabled and (tuned / DONE).exists():
            return self.cfg.policy.model_copy(update={"model": str(tuned)})
        return self.cfg.policy

    @cached_property
    def policy(self):
        from capdpo.models.load import policy_from_config

        return policy_from_config(self.policy_settings(), self.cfg.cache_dir)

    @cached_property
    def embedding_cache(self):
        """Encoded videos on disk, shared by every run on this machine (``cache_dir/embeddings``);
        None when ``train.embedding_cache`` is off."""
        from capdpo.policy.embed_cache import EmbeddingCache

        return EmbeddingCache(Path(self.cfg.cache_dir) / "embeddings") if self.cfg.train.embedding_cache else None

    @property
    def reply_cache(self) -> Path | None:
        """The judge's reply cache (``judge.cache``), one for every round of the run."""
        return self.paths.llm_cache if self.cfg.judge.cache else None

    @cached_property
    def judge(self):
        from capdpo.judge.judge import CaptionJudge

        return CaptionJudge(self.cfg.judge, self.cfg.cache_dir, reply_cache=self.reply_cache)

    def eval_judge(self, protocol: str):
        """The evaluation judge for ``protocol``: the run's judge, sharing its LLMs and budget."""
        return self.judge.for_protocol(protocol)

    # -- stages -----------------------------------------------------------------------------
    def data(self) -> None:
        from capdpo.data import run_data
        from capdpo.errors import ItemErrors

        errors = ItemErrors("data", self.cfg.fail_fast)
        n = run_data(self.cfg.data, self.paths.media, self.paths.videos, self.paths.qa_given, errors)
        log.info("data: %d videos%s", n, f" ({errors.summary()})" if errors.errors else "")

    def frames(self) -> None:
        from capdpo.frames import frames_on_ray, run_frames

        require("frames", self.paths.videos)
        if self.cfg.engine == "ray":
            frames_on_ray(self.paths.videos, self.paths.frames, self.cfg.frames, self.cfg.ray, fail_fast=self.cfg.fail_fast)
            return
        run_frames(self.paths.videos, self.paths.frames, self.cfg.frames, fail_fast=self.cfg.fail_fast)

    def qa(self) -> None:
        from capdpo.qa import run_qa

        require("qa", self.paths.videos)
        log.info("qa: %s", run_qa(self.paths.videos, self.paths.qa_given, self.paths.qa, self.cfg.qa, self.cfg.cache_dir))

    def sample(self, shard: tuple[int, int] | None = None) -> None:
        from capdpo.models.load import policy_from_config
        from capdpo.sample import run_sample, sample_on_ray
        from capdpo.shards import shard_file

        require("sample", self.paths.videos, self.paths.qa)
        out = shard_file(self.paths.candidates, shard) if shard else self.paths.candidates
        if self.cfg.engine == "ray":  # the actors load the policy
            sample_on_ray(self.paths.videos, self.paths.qa, out, self.policy_settings(), self.cfg.cache_dir, self.cfg.sample,
                          self.cfg.frames, self.cfg.ray, fail_fast=self.cfg.fail_fast, shard=shard, dtype=self.cfg.policy.dtype)
            return
        # vLLM runs the weights itself: load only tokenizer, config and preprocessing
        policy = (policy_from_config(self.policy_settings(), self.cfg.cache_dir, weights=False)
                  if self.cfg.sample.backend == "vllm" else self.policy)
        run_sample(self.paths.videos, self.paths.qa, out, policy, self.cfg.sample, self.cfg.frames,
                   fail_fast=self.cfg.fail_fast, shard=shard, dtype=self.cfg.policy.dtype)

    def merge_samples(self, shards: int) -> dict[str, int]:
        from capdpo.sample import merge_shards

        stats = merge_shards(self.paths.candidates, shards, self.paths.qa)
        log.info("sample merge: %s", stats)
        return stats

    def judge_candidates(self, retry_failed: bool = False, dry_run: bool = False) -> dict | None:
        """The judge stage; ``dry_run`` returns the request/token/cost estimate and sends nothing."""
        from capdpo.judge.stage import dry_run_judge, judge_on_ray, run_judge

        require("judge", self.paths.candidates)
        files = (self.paths.videos, self.paths.qa, self.paths.candidates, self.paths.judgments)
        if dry_run:
            return dry_run_judge(*files, self.judge)
        if self.cfg.engine == "ray":  # the actors load the judge
            done = judge_on_ray(*files, self.cfg.judge, self.cfg.cache_dir, self.reply_cache, self.cfg.ray, retry_failed=retry_failed)
        else:
            done = run_judge(*files, self.judge, retry_failed=retry_failed)
        failed = sum(j.failure is not None for j in done)
        log.info("judge: %d judged, %d failed (kept with their reason)", len(done) - failed, failed)
        return None

    def pairs(self) -> None:
        from capdpo.formats import write_pair_exports
        from capdpo.pairs import run_pairs

        require("pairs", self.paths.judgments)
        stats = run_pairs(self.paths.videos, self.paths.qa, self.paths.candidates, self.paths.judgments,
                          self.paths.pairs, self.cfg.pairs, judge=self.judge if self.cfg.pairs.pairwise_check else None)
        write_pair_exports(self.paths.pairs.all(), self.paths.root)
        log.info("pairs: %s", stats)

    def reference(self, shard: tuple[int, int] | None = None, recompute: bool = False) -> None:
        """Reference log-probs of the pairs (of ``shard``), from the current policy: run before ``train``."""
        from capdpo.reference import precompute_reference, reference_on_ray
        from capdpo.shards import shard_file

        require("reference", self.paths.pairs)
        out = shard_file(self.paths.reference, shard) if shard else self.paths.reference
        if self.cfg.engine == "ray":  # the actors load the reference model
            errors = reference_on_ray(self.paths.pairs.all(), self.paths.videos.by_id(), self.policy_settings(), self.cfg.cache_dir,
                                      self.cfg.train, self.cfg.frames, out, self.cfg.ray, embed_cache=self.embedding_cache,
                                      shard=shard, fail_fast=self.cfg.fail_fast, recompute=recompute)
            log.info("reference: %s%s", out.path, f" ({errors.summary()})" if errors.errors else "")
            return
        errors = precompute_reference(self.paths.pairs.all(), self.paths.videos.by_id(), self.policy, self.cfg.train,
                                      self.cfg.frames, out, embed_cache=self.embedding_cache, shard=shard,
                                      fail_fast=self.cfg.fail_fast, recompute=recompute)
        log.info("reference: %s%s", out.path, f" ({errors.summary()})" if errors.errors else "")

    def merge_reference(self, shards: int) -> dict[str, int]:
        from capdpo.reference import merge_reference_shards

        stats = merge_reference_shards(self.paths.reference, shards, self.paths.pairs.all())
        log.info("reference merge: %s", stats)
        return stats

    def evaluate(self, tag: str, suite: SuiteConfig | None = None) -> EvalSummary:
        """Evaluate the current policy on the run's held-out questions, or on a benchmark suite
        (judged with the suite's protocol); the summary replaces any earlier one of the same id."""
        from capdpo.evaluation.mc.items import is_mc
        from capdpo.evaluation.stage import format_summary, run_evaluate
        from capdpo.evaluation.suites import load_configured_suite

        if suite is not None and is_mc(suite.name):
            return self.evaluate_mc(tag, suite)
        if suite is None:
            require("evaluate", self.paths.videos, self.paths.qa)
            videos, questions, skipped = self.paths.videos.by_id(), [q for q in self.paths.qa.read() if q.split == "test"], 0
            dataset, protocol = HELD_OUT, self.cfg.judge.protocol
        else:
            bench = load_configured_suite(suite, self.paths.suite_videos(suite.name), self.paths.suite_questions(suite.name))
            videos, questions, skipped = bench.videos, bench.questions, bench.skipped
            dataset, protocol = suite.name, bench.suite.protocol
        # the tag's files first: a tag that cannot name a file inside the run stops before the policy loads
        predictions, judgments = self.paths.predictions(tag, dataset), self.paths.eval_judgments(tag, dataset)
        if self.cfg.engine == "ray":  # the actors load the policy and the judge
            from capdpo.evaluation.stage import evaluate_on_ray
            from capdpo.judge.judge import protocol_config

            summary = evaluate_on_ray(tag, videos, questions, self.policy_settings(), self.cfg.cache_dir,
                                      protocol_config(self.cfg.judge, protocol), self.reply_cache, predictions, judgments,
                                      self.cfg.evaluate, self.cfg.frames, self.cfg.ray, dataset=dataset,
                                      round_=self.paths.round_number, skipped=skipped, embed_cache=self.embedding_cache,
                                      fail_fast=self.cfg.fail_fast, summaries=self.paths.eval_summary)
            log.info("evaluate: %s", format_summary(summary))
            return summary
        summary = run_evaluate(tag, videos, questions, self.policy, self.eval_judge(protocol), predictions, judgments,
                               self.cfg.evaluate, self.cfg.frames, dataset=dataset, round_=self.paths.round_number,
                               skipped=skipped, embed_cache=self.embedding_cache, fail_fast=self.cfg.fail_fast,
                               summaries=self.paths.eval_summary)
        log.info("evaluate: %s", format_summary(summary))
        return summary

    def evaluate_mc(self, tag: str, suite: SuiteConfig) -> EvalSummary:
        """A multiple-choice benchmark, scored by its rules: the policy answers only what is not on
        disk (with ``suite.predictions``, nothing: that file's answers are scored), and the judge
        is loaded only for TempCompass with ``suite.llm_judge``."""
        from capdpo.evaluation.mc.items import load_benchmark
        from capdpo.evaluation.mc.synthetic import synthetic_bench
        from capdpo.evaluation.stage import format_summary, run_multiple_choice
        from capdpo.media.synthetic import load_scenes
        from capdpo.oracle import run_scenes_path

        if suite.name == "synthetic_mc":
            require("evaluate", self.paths.videos, self.paths.qa)
            scenes = run_scenes_path(self.paths.top)
            bench = synthetic_bench(self.paths.qa.read(), self.paths.videos.by_id(), load_scenes(scenes) if scenes.exists() else {},
                                    suite.max_questions)
        else:
            bench = load_benchmark(suite.name, suite.data, video_root=suite.video_root, max_items=suite.max_questions)
        out = self.paths.mc_predictions(tag, bench.dataset)  # the tag names a file: refused before any model loads
        summary = run_multiple_choice(
            tag, bench, out, self.cfg.evaluate, self.cfg.frames, policy=lambda: self.policy, extractor=suite.extractor,
            judge=self.judge.llm if suite.llm_judge else None, answers_from=Path(suite.predictions) if suite.predictions else None,
            max_new_tokens=suite.max_new_tokens, round_=self.paths.round_number, embed_cache=self.embedding_cache,
            fail_fast=self.cfg.fail_fast, summaries=self.paths.eval_summary)
        log.info("evaluate: %s", format_summary(summary))
        return summary

    def evaluate_all(self, tag: str) -> list[EvalSummary]:
        """The held-out questions, then every suite of ``evaluate.suites``."""
        return [self.evaluate(tag)] + [self.evaluate(tag, suite) for suite in self.cfg.evaluate.suites]

    def sft(self) -> Path:
        """Caption pretraining and instruction tuning of the policy (``sft.phases``); the stages
        after it use the result, as any user checkpoint would be used."""
        from capdpo.sft import run_sft

        kinds = {source.kind for phase in self.cfg.sft.phases for source in phase.sources}
        if kinds & {"captions", "qa"}:
            require("sft", self.paths.videos, *([self.paths.qa] if "qa" in kinds else []))
        out = run_sft(self.policy, self.cfg.sft, self.cfg.frames, self.paths.sft, videos_file=self.paths.videos,
                      qa_file=self.paths.qa, embed_cache=self.embedding_cache, fail_fast=self.cfg.fail_fast)
        self.use_policy(str(out))
        return out

    def train(self) -> Path:
        """DPO on the round's pairs, or online GRPO on the train questions (``train.algorithm``)."""
        if self.cfg.train.algorithm == "grpo":
            from capdpo.grpo import run_grpo

            require("train", self.paths.videos, self.paths.qa)
            needs_judge = any(r.name == "caption_judge" for r in self.cfg.train.grpo.rewards)
            out = run_grpo(self.paths.qa, self.paths.videos, self.policy, self.cfg.train, self.cfg.frames, self.paths.train,
                           judge=self.judge if needs_judge else None, embed_cache=self.embedding_cache,
                           fail_fast=self.cfg.fail_fast)
        else:
            from capdpo.train import run_train

            require("train", self.paths.pairs)
            out = run_train(self.paths.pairs, self.paths.videos, self.policy, self.cfg.train, self.cfg.frames,
                            self.paths.train, embed_cache=self.embedding_cache, reference_file=self.paths.reference,
                            fail_fast=self.cfg.fail_fast)
        self.use_policy(str(out))  # the next stages use the trained checkpoint, loaded as any user checkpoint would be
        return out

    def report(self) -> Path:
        from capdpo.report import write_report

        require("report", self.paths.videos)
        return write_report(self.paths, self.cfg)

    def run_all(self) -> None:
        """Every stage in order, the round stages ``rounds`` times; each skips what is already done."""
        self.data()
        self.frames()
        self.qa()
        if self.cfg.sft.enabled:
            self.sft()
        for k in range(1, self.cfg.rounds + 1):
            self.run_round(k)
        path = self.report()
        log.info("report: %s", path)

    def run_round(self, k: int) -> None:
        """One DPO round in its folder, from the current policy (round k >= 2: the previous
        round's trained checkpoint, which that round's ``train`` loaded). Only round 1 evaluates
        "before": a later round starts where the previous round's "after" was measured."""
        self.enter_round(k)
        log.info("round %d of %d: %s", k, self.cfg.rounds, self.paths.root)
        if self.cfg.train.algorithm == "dpo":  # GRPO samples and judges inside its training loop
            self.sample()
            self.judge_candidates()
            self.pairs()
        if k == 1:
            self.evaluate_all("before")
        self.train()
        self.evaluate_all("after")
