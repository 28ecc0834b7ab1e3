"""The paper's two claims in miniature, on synthetic clips whose truth is known (docs/mini-repro.md).

    capdpo repro configs/mini-repro.yaml      # a run config with a ``repro`` section

Claim 1: a text-only judge that reads the caption scores answers in line with the truth. Claim 2:
DPO on pairs from that judge improves open-ended video QA (and, optionally, online GRPO with that
judge as its reward at the same number of judged answers). Synthetic clips make both checkable: the
oracle (``capdpo.oracle``) decides from the scene whether any free-form answer is correct.

The experiment composes the ordinary stages and writes everything under the run folder:

    videos.jsonl, qa.jsonl, media/        data: the run's train clips (DPO questions) and test clips
    sft/policy/                           the start, with repro.sft_videos > 0: policy.model after the run's sft phases on other clips
    candidates.jsonl, judgments.jsonl     N sampled answers per train question, the caption judge's scores
    claim1/                               the same answers scored without the caption, by MiniLM
                                          similarity and by the oracle; agreement of each with the oracle
    claim2/pairs-<source>.jsonl           pairs from the caption judge, the oracle and random pairing
    claim2/<source>-s<seed>/              DPO from the SFT start on those pairs
    claim2/grpo-s<seed>/                  online GRPO from the SFT start, the caption judge as reward (repro.grpo_seeds)
    claim2/eval/<policy>/                 greedy answers to the test questions and their oracle grades
    claim2/eval/judgments.jsonl           every policy's answers scored by the caption judge, in one pass
    mini-repro.md, mini-repro.json        both tables, with bootstrap confidence intervals
    repro_times.json                      seconds per stage, summed over interrupted and resumed invocations

Every step skips what is on disk, so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import TypeVar

import numpy as np

from capdpo.config import JudgeConfig, PairsConfig, RunConfig
from capdpo.evaluation.agreement import load_scores
from capdpo.pipeline import Run
from capdpo.records import (
    Candidate,
    Judgment,
    MCPrediction,
    Prediction,
    PreferencePair,
    QAItem,
    RecordFile,
    ReferenceLogps,
    Video,
    atomic_write_text,
)
from capdpo.rundir import RunPaths
from capdpo.stats import bootstrap_mean

log = logging.getLogger("capdpo")
TIMES_FILE = "repro_times.json"


T = TypeVar("T")


def run_repro(cfg: RunConfig) -> Path:
    """Both claims, then the report; returns ``mini-repro.md``."""
    if cfg.repro is None:
        raise ValueError("the miniature reproduction needs a `repro` section in the config (see configs/mini-repro.yaml)")
    run = Run(cfg)
    times = StageTimes(run.paths.top / TIMES_FILE)
    timed = times.timed
    timed("data", run.data)
    timed("qa", run.qa)
    sft = timed("sft", sft_start, run)
    run.use_policy(str(sft))
    timed("sample", run.sample)
    timed("judge (caption)", run.judge_candidates)
    claim1 = timed("claim 1 scorers", claim1_agreement, run)
    if cfg.repro.grpo_seeds:
        timed("claim 2 online (GRPO, evaluation)", claim2_grpo, run, sft)
    claim2 = timed("claim 2 (pairs, DPO, evaluation)", claim2_dpo, run, sft)
    results = {"claim1": claim1, "claim2": claim2, "data": data_summary(run.paths, cfg.repro.sft_videos), "timings_s": times.seconds,
               "run_time_s": sum(times.seconds.values()), "invocations": times.invocations}
    return write_report(run.paths.top, results)


class StageTimes:
    """Seconds spent per stage, summed over every invocation of the experiment.

    Kept on disk so that a run interrupted and resumed reports its whole cost: a finished stage's
    time is written when it ends, and a running stage's time so far every ``heartbeat_s`` seconds
    (and at once when it raises), so a stage killed part-way, even by SIGKILL, keeps its minutes up
    to the last heartbeat. Stages already on disk add only the time to find that out.
    """

    def __init__(self, path: Path, heartbeat_s: float = 15.0):
        self.path = path
        self.heartbeat_s = heartbeat_s
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.seconds: dict[str, float] = saved.get("seconds", {})
        if running := saved.get("running"):  # the stage an earlier invocation died in
            self.seconds[running["stage"]] = self.seconds.get(running["stage"], 0.0) + running["seconds"]
        self.invocations: int = saved.get("invocations", 0) + 1
        self._save()

    def timed(self, name: str, fn: Callable[..., T], *args) -> T:
        started = time.perf_counter()
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(self.heartbeat_s):
                self._save({"stage": name, "seconds": time.perf_counter() - started})

        beating = threading.Thread(target=heartbeat, name=f"stage-times-{name}", daemon=True)
        beating.start()
        try:
            out = fn(*args)
        except BaseException:
            stop.set()
            beating.join()
            self._save({"stage": name, "seconds": time.perf_counter() - started})
            raise
        stop.set()
        beating.join()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self._save()
        return out

    def _save(self, running: dict | None = None) -> None:
        state = {"seconds": self.seconds, "invocations": self.invocations} | ({"running": running} if running else {})
        atomic_write_text(self.path, json.dumps(state, indent=1))


# -- the starting policy ---------------------------------------------------------------------------------
def sft_start(run: Run) -> Path:
    """The policy DPO starts from and is compared to: ``policy.model``, or with ``repro.sft_videos``
    > 0, ``policy.model`` after the run's ``sft`` phases (``capdpo sft``'s machinery) on the
    captions and QA of that many synthetic clips drawn with their own seed (never the run's train
    or test clips)."""
    from capdpo.errors import ItemErrors
    from capdpo.media.synthetic import make_synthetic_dataset
    from capdpo.models.sft import RunRecords, run_examples, run_phases

    cfg = run.cfg.repro
    if cfg.sft_videos == 0:
        return Path(run.policy.path)
    clips = make_synthetic_dataset(run.paths.media / "sft", cfg.sft_videos, cfg.sft_seed)
    records = RunRecords.of_synthetic(clips)
    errors = ItemErrors("sft", run.cfg.fail_fast)
    return run_phases(run.policy, run.cfg.sft, run.cfg.frames, run.paths.top / "sft",
                      lambda source: run_examples(source, records, run.cfg.sft.seed, errors),
                      embed_cache=run.embedding_cache, errors=errors)


# -- claim 1 ------------------------------------------------------------------------------------------------
CAPTION_JUDGE, NO_CAPTION, MINILM_ROW = "caption judge", "judge without caption", "MiniLM similarity"


def claim1_agreement(run: Run) -> dict:
    """Grade every sampled answer by the oracle (claim 2's oracle pairs read it), then score the
    claim-1 answer sets with every scorer and compare each with the oracle, per question kind:

    * the run's judge with the caption (the paper's reward) and without it (its template's twin
      without the caption, or ``no_caption_template``);
    * each ``repro.claim1_judges`` model, with and without the caption (expected mode);
    * MiniLM similarity of answer and reference answer.

    Answer sets: ``policy`` (the sampled answers to at most ``claim1_questions`` train questions) and,
    with ``claim1_variant_clips``, ``variants`` (swapped-fact answers to every question of that many
    of the run's scenes, the caption-matters ``detail`` kind included)."""
    from capdpo.judge.judge import default_template
    from capdpo.judge_study import MINILM, policy_answers, score_answers, study, variant_answers
    from capdpo.oracle import load_answers, oracle_scores
    from capdpo.prompts import without_caption

    top, cfg, rc = run.paths.top, run.cfg, run.cfg.repro
    (top / "claim1").mkdir(exist_ok=True)
    oracle = oracle_scores(load_answers(run.paths.candidates.path), run.paths.qa.by_id(), scenes(run.paths))
    oracle.write(top / "claim1" / "oracle.jsonl")
    log.info("claim 1: oracle %s", oracle.summary())

    sets = {"policy": policy_answers(run.paths, rc.claim1_questions, rc.seeds[0])}
    if rc.claim1_variant_clips:
        sets["variants"] = variant_answers(cfg.data.synthetic_seed, rc.claim1_variant_clips, rc.claim1_variants_per_question)
    def without_caption_of(judge_cfg: JudgeConfig) -> str:  # the same prompt with the caption taken out
        return rc.no_caption_template or without_caption(judge_cfg.template or default_template(judge_cfg, cfg.cache_dir))

    judges = {CAPTION_JUDGE: cfg.judge, NO_CAPTION: cfg.judge.model_copy(update={"template": without_caption_of(cfg.judge)})}
    for model in rc.claim1_judges:
        llm = cfg.judge.llm.model_copy(update={"model": model})
        with_caption = JudgeConfig(llm=llm, mode="expected", max_answer_words=cfg.judge.max_answer_words)
        judges[f"{model} with caption"] = with_caption
        judges[f"{model} without caption"] = with_caption.model_copy(update={"template": without_caption_of(with_caption)})
    differences = [(CAPTION_JUDGE, NO_CAPTION), *((f"{m} with caption", f"{m} without caption") for m in rc.claim1_judges),
                   (CAPTION_JUDGE, MINILM_ROW)]
    results = {}
    for set_name, answers in sets.items():
        scores = {name: judged(run, judge, answers.items, top / "claim1" / f"{set_name}-{slug(name)}.jsonl",
                               f"claim 1: {name} ({set_name})") for name, judge in judges.items()}
        scores[MINILM_ROW], _ = score_answers(MINILM, answers.items, str(cfg.cache_dir))
        results[set_name] = study(answers, scores, differences, resamples=rc.bootstrap, seed=rc.seeds[0])
    return {"sets": results, "oracle_accuracy": float(np.mean([r["score"] for r in oracle.rows])),
            "answers": len(oracle.rows)}


def judged(run: Run, judge_cfg: JudgeConfig, items: Sequence, path: Path, desc: str) -> dict[str, float | None]:
    """``{answer id: score}`` of a judge on ``items``, kept in ``path`` (resumable); the run's own
    judgments are reused for the answers the run's judge already scored."""
    from capdpo.judge.judge import CaptionJudge, judge_items

    if judge_cfg == run.cfg.judge:
        done = {j.id: j.score for j in run.paths.judgments.read()} if run.paths.judgments.exists() else {}
        if all(it.target_id in done for it in items):
            return {it.target_id: done[it.target_id] for it in items}
    same_llm = judge_cfg.llm == run.cfg.judge.llm
    judge = CaptionJudge(judge_cfg, run.cfg.cache_dir, llm=run.judge.llm if same_llm else None)
    out = RecordFile(path, Judgment)
    judge_items(judge, list(items), out, desc=desc)
    return {j.target_id: j.score for j in out.read()}


def scenes(paths: RunPaths) -> dict:
    """The run's synthetic scenes by video id: the truth the oracle reads."""
    from capdpo.media.synthetic import load_scenes
    from capdpo.oracle import run_scenes_path

    return load_scenes(run_scenes_path(paths.top))


# -- claim 2 ------------------------------------------------------------------------------------------------
def claim2_dpo(run: Run, sft: Path) -> dict:
    """Pairs from each source, DPO on each (per seed), evaluation of SFT and every DPO policy."""
    from capdpo.models.load import policy_from_config
    from capdpo.train import run_train

    cfg = run.cfg.repro
    out = run.paths.top / "claim2"
    out.mkdir(exist_ok=True)
    oracle = load_scores(run.paths.top / "claim1" / "oracle.jsonl")
    available = make_pairs(run.paths, run.cfg, cfg.pair_sources, oracle)
    pairs = {s: p for s, p in available.items() if p}
    for source in available.keys() - pairs.keys():
        log.warning("claim 2: no %s pairs (no question had two answers that source tells apart): not trained", source)
    if cfg.equal_pairs and pairs:  # the same number of pairs for every source: the comparison is of pair quality
        n = min(len(p) for p in pairs.values())
        pairs = {s: sorted(random.Random(cfg.seeds[0]).sample(p, n), key=lambda x: x.id) for s, p in pairs.items()}
    pair_files = {}
    for source, rows in pairs.items():
        pair_files[source] = RecordFile(out / f"pairs-{source}.jsonl", PreferencePair)
        pair_files[source].write(rows)

    # seed by seed, each policy answers the held-out questions as soon as it is trained: the first
    # seed's oracle grades are on disk (claim2/eval/) long before the last seed has trained; the
    # caption judge scores every policy's answers together at the end
    room = headroom(run, sft)
    evals = {"SFT": evaluate_policy(run, "SFT", sft)}
    # the reference (the SFT start) scores a source's pairs the same for every seed: computed once per source
    references = {source: RecordFile(out / f"reference-{source}.jsonl", ReferenceLogps) for source in pairs}
    for seed in cfg.seeds:
        for source in pairs:
            name = policy_name(source, seed)
            policy = policy_from_config(run.cfg.policy.model_copy(update={"model": str(sft)}), run.cfg.cache_dir)
            trained = run_train(pair_files[source], run.paths.videos, policy, run.cfg.train.model_copy(update={"seed": seed}),
                                run.cfg.frames, out / f"{source}-s{seed}", embed_cache=run.embedding_cache,
                                reference_file=references[source], fail_fast=run.cfg.fail_fast)
            evals[name] = evaluate_policy(run, name, trained)
    evals |= claim2_grpo(run, sft)
    judge_evaluations(run, evals)
    arms = {f"DPO ({source} pairs, {len(cfg.seeds)} seeds pooled)": [policy_name(source, seed) for seed in cfg.seeds]
            for source in pairs}
    arms[f"GRPO (judge reward, {len(cfg.grpo_seeds)} seeds pooled)"] = [grpo_name(seed) for seed in cfg.grpo_seeds]
    evals |= pooled_over_seeds(evals, arms)
    rows = compare_to(evals, "SFT", cfg.bootstrap, cfg.seeds[0])
    for name, row in rows.items():
        source = next((s for s in pairs if f"({s} pairs" in name), None)
        row["pairs"] = len(pairs[source]) if source else None
        row["headroom_closed"] = headroom_closed(row, rows["SFT"], room)
    likelihood = {policy_name(source, seed): chosen_likelihood(out / f"{source}-s{seed}" / "metrics.jsonl")
                  for seed in cfg.seeds for source in pairs}
    return {"policies": rows, "headroom": room, "accuracy_by_kind": accuracy_by_kind(evals), "likelihood": likelihood,
            "multiple_choice": mc_accuracy(run, list(evals), "SFT", cfg.bootstrap, cfg.seeds[0]),
            "pairs_available": {s: len(p) for s, p in available.items()},
            "pair_orientation": {s: pair_orientation(p, oracle) for s, p in pairs.items()},
            "test_questions": len(held_out_questions(run.paths)),
            "answers_judged": answers_judged(run, cfg.grpo_seeds)}


def chosen_likelihood(metrics: Path, window: int = 3) -> dict[str, float] | None:
    """The policy's mean log-prob of the chosen and the rejected answers over the first and the last
    ``window`` logged steps of a DPO run: whether training raised p(chosen) or only widened the margin
    while both fell (likelihood displacement)."""
    if not metrics.exists():
        return None
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "logps/chosen" in r]
    if not rows:
        return None
    mean = lambda part, key: float(np.mean([r[key] for r in part]))  # noqa: E731
    first, last = rows[:window], rows[-window:]
    return {"chosen_first": mean(first, "logps/chosen"), "chosen_last": mean(last, "logps/chosen"),
            "rejected_first": mean(first, "logps/rejected"), "rejected_last": mean(last, "logps/rejected"), "steps": len(rows)}


def answers_judged(run: Run, grpo_seeds: Sequence[int]) -> dict[str, int]:
    """Answers the caption judge scored for each judge-fed arm: the judge pairs' sampled candidates,
    and GRPO's G = ``sample.n`` answers to each train question, once per seed."""
    out = {"DPO (judge pairs)": sum(1 for c in run.paths.candidates.read())}
    if grpo_seeds:
        out["GRPO (judge reward), per seed"] = sum(q.split == "train" for q in run.paths.qa.read()) * run.cfg.sample.n
    return out


def policy_name(source: str, seed: int) -> str:
    return f"DPO ({source} pairs, seed {seed})"


def grpo_name(seed: int) -> str:
    return f"GRPO (judge reward, seed {seed})"


def claim2_grpo(run: Run, sft: Path) -> dict[str, dict]:
    """The online arm, per ``repro.grpo_seeds``: GRPO from the SFT start, then its held-out
    evaluation (both resume from disk, so claim 2 collects them again at no cost)."""
    out = run.paths.top / "claim2"
    out.mkdir(exist_ok=True)
    return {grpo_name(seed): evaluate_policy(run, grpo_name(seed), online_grpo(run, sft, seed, out / f"grpo-s{seed}"))
            for seed in run.cfg.repro.grpo_seeds}


def online_grpo(run: Run, sft: Path, seed: int, out_dir: Path) -> Path:
    """GRPO from the SFT start on the run's train questions, rewarded by the run's caption judge
    (``train.grpo``'s other settings): one epoch with G = ``sample.n`` answers a question, so it
    judges as many answers as the DPO arm's sampling did, but each from the policy being trained."""
    from capdpo.grpo import run_grpo
    from capdpo.models.load import policy_from_config

    g = run.cfg.train.grpo.model_copy(update={"num_generations": run.cfg.sample.n})
    train = run.cfg.train.model_copy(update={"algorithm": "grpo", "seed": seed, "epochs": 1, "grpo": g})
    policy = policy_from_config(run.cfg.policy.model_copy(update={"model": str(sft)}), run.cfg.cache_dir)
    return run_grpo(run.paths.qa, run.paths.videos, policy, train, run.cfg.frames, out_dir, judge=run.judge,
                    embed_cache=run.embedding_cache, fail_fast=run.cfg.fail_fast)


def pooled_over_seeds(evals: Mapping[str, Mapping[str, dict]], arms: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """Per arm trained with several seeds (``{pooled row's name: the seeds' policy names}``), one
    more row: each held-out question's oracle and judge score averaged over the seeds, so its
    bootstrap interval (over questions) covers the seeds together."""
    pooled = {}
    for pooled_name, names in arms.items():
        if len(names) < 2:
            continue
        common = set.intersection(*(set(evals[n]) for n in names))
        pooled[pooled_name] = {
            q: {"oracle": float(np.mean([evals[n][q]["oracle"] for n in names])),
                "judge": None if any(evals[n][q]["judge"] is None for n in names) else float(np.mean([evals[n][q]["judge"] for n in names])),
                "kind": evals[names[0]][q]["kind"]} for q in sorted(common)}
    return pooled


def accuracy_by_kind(evals: Mapping[str, Mapping[str, dict]]) -> dict[str, dict[str, float]]:
    """Oracle accuracy of each policy per question kind (point estimates)."""
    out = {}
    for name, scores in evals.items():
        kinds: dict[str, list[float]] = {}
        for row in scores.values():
            kinds.setdefault(row["kind"] or "?", []).append(row["oracle"])
        out[name] = {k: float(np.mean(v)) for k, v in sorted(kinds.items())}
    return out


def pair_orientation(pairs: Sequence[PreferencePair], oracle: Mapping[str, float | None]) -> dict[str, int]:
    """How the oracle grades the pairs DPO trains on: ``right`` (chosen correct, rejected wrong),
    ``reversed``, or ``tied`` (both correct or both wrong: a pair that teaches nothing about correctness)."""
    counts = {"right": 0, "reversed": 0, "tied": 0}
    for pair in pairs:
        chosen, rejected = oracle[pair.chosen_id], oracle[pair.rejected_id]
        counts["right" if chosen > rejected else "reversed" if chosen < rejected else "tied"] += 1
    return counts


def make_pairs(paths: RunPaths, cfg: RunConfig, sources: Sequence[str],
               oracle: Mapping[str, float | None]) -> dict[str, list[PreferencePair]]:
    """Per source, at most ``pairs.per_question`` pairs per train question:

    * ``judge``: best vs worst caption-judge score, with the run's ``pairs`` thresholds;
    * ``oracle``: a correct vs a wrong answer (first of each in sampling order), the upper bound;
    * ``random``: two different answers drawn at random, in random order (the control)."""
    from capdpo.pairs import build_pairs

    videos, qa, candidates = paths.videos.by_id(), paths.qa.by_id(), paths.candidates.all()
    out = {}
    for source in sources:
        if source == "judge":
            scores = {j.id: j.score for j in paths.judgments.read()}
            out[source], _ = build_pairs(videos, qa, candidates, scores, cfg.pairs)
        elif source == "oracle":
            out[source], _ = build_pairs(videos, qa, candidates, oracle, PairsConfig(min_gap=1, min_chosen=1, max_rejected=0,
                                                                                   per_question=cfg.pairs.per_question))
        elif source == "random":
            out[source] = random_pairs(videos, qa, candidates, cfg.repro.seeds[0], cfg.pairs.per_question)
        else:
            raise ValueError(f"repro.pair_sources: unknown source {source!r} (judge, oracle, random)")
    return out


def random_pairs(videos: Mapping[str, Video], qa: Mapping[str, QAItem], candidates: Sequence[Candidate],
                 seed: int, per_question: int = 1) -> list[PreferencePair]:
    """Up to ``per_question`` pairs of two different answers per train question, chosen and rejected
    at random (scores 0: unscored); no two pairs of a question hold the same two answers."""
    from capdpo.pairs import pair_id

    by_question: dict[str, list] = {}
    for c in candidates:
        if qa[c.qa_id].split == "train":
            by_question.setdefault(c.qa_id, []).append(c)
    pairs = []
    for qa_id, cands in sorted(by_question.items()):
        distinct = list({c.answer: c for c in cands}.values())
        if len(distinct) < 2:
            continue
        rng = random.Random(f"{seed}:{qa_id}")
        drawn = [rng.sample(distinct, 2)]  # the first pair is what one pair per question draws
        if per_question > 1:
            others = [list(two) for two in combinations(distinct, 2) if {c.id for c in two} != {c.id for c in drawn[0]}]
            rng.shuffle(others)
            drawn += [rng.sample(two, 2) for two in others[: per_question - 1]]
        q = qa[qa_id]
        pairs.extend(PreferencePair(id=pair_id(qa_id, k), qa_id=qa_id, video_id=q.video_id, video=videos[q.video_id].video,
                                    prompt=q.question, answer=q.answer, chosen=chosen.answer, rejected=rejected.answer,
                                    chosen_score=0.0, rejected_score=0.0, chosen_id=chosen.id, rejected_id=rejected.id)
                     for k, (chosen, rejected) in enumerate(drawn))
    return pairs


def held_out_questions(paths: RunPaths) -> list[QAItem]:
    return [q for q in paths.qa.read() if q.split == "test"]


def headroom(run: Run, sft: Path) -> dict:
    """pass@n of the SFT start on the held-out questions: the share of them on which at least one of
    its ``sample.n`` sampled answers is right (oracle). A policy that always gave its best sampled
    answer would score that much, so it is roughly what sharpening the policy on its own answers
    (DPO on pairs of them) can reach; each DPO row reports the share of the gap to it that it closes."""
    from capdpo.oracle import load_answers, oracle_scores
    from capdpo.sample import run_sample

    out = RecordFile(run.paths.top / "claim2" / "headroom" / "candidates.jsonl", Candidate)
    out.path.parent.mkdir(parents=True, exist_ok=True)
    run.use_policy(str(sft))
    run_sample(run.paths.videos, run.paths.qa, out, run.policy, run.cfg.sample, run.cfg.frames, split="test",
               fail_fast=run.cfg.fail_fast)
    questions = {q.id: q for q in held_out_questions(run.paths)}
    right: dict[str, int] = {}
    for r in oracle_scores(load_answers(out.path), questions, scenes(run.paths)).rows:
        right[r["qa_id"]] = right.get(r["qa_id"], 0) + r["score"]
    solved = [float(right[q] > 0) for q in sorted(right)]
    return {"n": run.cfg.sample.n, "questions": len(solved),
            "pass_at_n": bootstrap_mean(solved, run.cfg.repro.bootstrap, run.cfg.repro.seeds[0]) if solved else None}


def headroom_closed(row: dict, sft: dict, room: dict) -> float | None:
    """(DPO accuracy - SFT accuracy) / (SFT pass@n - SFT accuracy), from the point estimates."""
    if row["vs_base"] is None or room["pass_at_n"] is None:
        return None
    gap = room["pass_at_n"][0] - sft["oracle_accuracy"][0]
    return row["vs_base"][0] / gap if gap > 0 else None


def evaluate_policy(run: Run, name: str, model_dir: Path) -> dict[str, dict]:
    """Greedy answers of one policy to the test questions, graded by the oracle: ``{qa id: {"oracle":
    0/1, "kind": kind}}``. The caption judge scores them later, with every other policy's
    (``judge_evaluations``)."""
    from capdpo.errors import ItemErrors
    from capdpo.evaluation.stage import predict
    from capdpo.oracle import load_answers, oracle_scores
    from capdpo.policy.video import VideoEncoder

    d = eval_dir(run, name)
    d.mkdir(parents=True, exist_ok=True)
    questions = held_out_questions(run.paths)
    run.use_policy(str(model_dir))
    predict(run.paths.videos.by_id(), questions, VideoEncoder(run.policy, run.cfg.frames, run.embedding_cache),
            RecordFile(d / "predictions.jsonl", Prediction), run.cfg.evaluate, ItemErrors(f"evaluate {name}", run.cfg.fail_fast))
    oracle = oracle_scores(load_answers(d / "predictions.jsonl"), {q.id: q for q in questions}, scenes(run.paths))
    oracle.write(d / "oracle.jsonl")
    evaluate_mc(run, d)
    return {r["qa_id"]: {"oracle": r["score"], "kind": r.get("kind")} for r in oracle.rows}


def evaluate_mc(run: Run, d: Path) -> None:
    """The current policy on the multiple-choice versions of the held-out questions (judge-free),
    into ``d/mc_predictions.jsonl``, when ``evaluate.suites`` lists synthetic_mc."""
    from capdpo.evaluation.mc.synthetic import synthetic_bench
    from capdpo.evaluation.stage import run_multiple_choice

    suite = next((s for s in run.cfg.evaluate.suites if s.name == "synthetic_mc"), None)
    if suite is not None:
        bench = synthetic_bench(held_out_questions(run.paths), run.paths.videos.by_id(), scenes(run.paths), suite.max_questions)
        run_multiple_choice("repro", bench, RecordFile(d / "mc_predictions.jsonl", MCPrediction), run.cfg.evaluate,
                            run.cfg.frames, policy=lambda: run.policy, extractor=suite.extractor,
                            max_new_tokens=suite.max_new_tokens, embed_cache=run.embedding_cache, fail_fast=run.cfg.fail_fast)


def mc_accuracy(run: Run, names: Sequence[str], base: str, rounds: int, seed: int) -> dict[str, dict]:
    """Per evaluated policy: multiple-choice accuracy with its bootstrap CI, and the paired
    difference to ``base`` on the same items (none when synthetic_mc was not evaluated)."""
    right = {}
    for name in names:
        rows = RecordFile(eval_dir(run, name) / "mc_predictions.jsonl", MCPrediction)
        if rows.exists():
            right[name] = {r.id: float(r.correct) for r in rows.read() if r.error is None}
    out = {}
    for name, scores in right.items():
        common = sorted(scores.keys() & right.get(base, {}).keys())
        out[name] = {"items": len(scores), "accuracy": bootstrap_mean(list(scores.values()), rounds, seed),
                     "vs_base": bootstrap_mean([scores[q] - right[base][q] for q in common], rounds, seed)
                     if name != base and common else None}
    return out


def judge_evaluations(run: Run, evals: Mapping[str, dict[str, dict]]) -> None:
    """Every evaluated policy's held-out answers scored by the caption judge in one pass, ordered by
    question: the policies' answers to one question then share one prompt prefix (instructions,
    caption, question, reference), run once in the judge's prefix tree, and equal answers are
    judged once - several times cheaper than judging policy by policy. Adds each row's "judge"
    score (None when the judge failed on it)."""
    from capdpo.judge.judge import JudgeItem, judge_items

    questions = {q.id: q for q in held_out_questions(run.paths)}
    videos = run.paths.videos.by_id()
    items = [JudgeItem.for_answer(videos[p.video_id], questions[p.qa_id], p.answer, f"{slug(name)}/{p.qa_id}")
             for name in evals for p in RecordFile(eval_dir(run, name) / "predictions.jsonl", Prediction).read()
             if p.qa_id in questions]
    items.sort(key=lambda item: item.qa_id)  # stable: question by question, the policies in order
    out = RecordFile(run.paths.top / "claim2" / "eval" / "judgments.jsonl", Judgment)
    judge_items(run.eval_judge(run.cfg.judge.protocol), items, out, desc="claim 2: caption judge on the held-out answers")
    scores = {j.target_id: j.score for j in out.read()}
    for name, rows in evals.items():
        for qa_id, row in rows.items():
            row["judge"] = scores.get(f"{slug(name)}/{qa_id}")


def eval_dir(run: Run, name: str) -> Path:
    return run.paths.top / "claim2" / "eval" / slug(name)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# -- statistics ---------------------------------------------------------------------------------------------
def compare_to(evals: Mapping[str, Mapping[str, dict]], base: str, rounds: int, seed: int) -> dict[str, dict]:
    """Per policy: oracle accuracy and mean judge score with bootstrap CIs, and the paired difference
    of oracle accuracy to ``base`` on the same questions (resampled together)."""
    rows = {}
    for name, scores in evals.items():
        common = sorted(scores.keys() & evals[base].keys())
        acc = [scores[q]["oracle"] for q in common]
        judge = [scores[q]["judge"] for q in common if scores[q]["judge"] is not None]
        diff = [scores[q]["oracle"] - evals[base][q]["oracle"] for q in common]
        rows[name] = {"questions": len(common), "oracle_accuracy": bootstrap_mean(acc, rounds, seed),
                      "judge_score": bootstrap_mean(judge, rounds, seed) if judge else None,
                      "vs_base": bootstrap_mean(diff, rounds, seed) if name != base else None}
    return rows


def data_summary(paths: RunPaths, sft_videos: int) -> dict:
    videos, qa = paths.videos.all(), paths.qa.all()
    return {"train_videos": sum(v.split == "train" for v in videos), "test_videos": sum(v.split == "test" for v in videos),
            "train_questions": sum(q.split == "train" for q in qa), "test_questions": sum(q.split == "test" for q in qa),
            "candidates": len(paths.candidates.all()), "sft_videos": sft_videos}


# -- report -------------------------------------------------------------------------------------------------
def _f(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _ci(t, fmt=".3f", signed=False) -> str:
    if t is None:
        return "-"
    mean, lo, hi = t
    f = ("+" if signed else "") + fmt
    return f"{format(mean, f)} [{format(lo, f)}, {format(hi, f)}]"


CLAIM1_SETS = {"policy": "The SFT policy's sampled answers", "variants": "Swapped-fact answers to every question of the run's first scenes"}


def write_report(top: Path, results: dict) -> Path:
    """``mini-repro.json`` (every figure) and ``mini-repro.md`` (the two tables)."""
    atomic_write_text(top / "mini-repro.json", json.dumps(results, indent=1))
    d, c1, c2 = results["data"], results["claim1"], results["claim2"]
    lines = [
        "# Miniature reproduction",
        "",
        f"{d['train_videos']} train clips ({d['train_questions']} questions, {d['candidates']} sampled answers), "
        f"{d['test_videos']} held-out clips ({d['test_questions']} questions); "
        + (f"SFT start on {d['sft_videos']} other clips. " if d["sft_videos"] else "SFT start: the policy as configured (no further SFT). ")
        + f"Run time {results['run_time_s'] / 60:.1f} min"
        + (f" over {results['invocations']} invocations (resumed)." if results["invocations"] > 1 else "."),
        "",
        f"## Claim 1: scorers against the oracle ({c1['oracle_accuracy']:.1%} of the {c1['answers']} sampled answers correct)",
    ]
    for set_name, st in c1["sets"].items():
        kinds = [k for k in st["kinds"] if k != "all"]
        lines += ["", f"{CLAIM1_SETS.get(set_name, set_name)}: {st['answers']} answers, {st['share_correct']:.1%} correct "
                  "(" + ", ".join(f"{k} {st['kinds'][k]}" for k in kinds) + ").", "",
                  "| scorer | AUROC | pairwise agreement, strict (pairs) | Kendall tau-b | " + " | ".join(f"AUROC {k}" for k in kinds) + " |",
                  "|---|---|---|---|" + "---|" * len(kinds)]
        for name, by_kind in st["figures"].items():
            r = by_kind["all"]
            lines.append(f"| {name} | {_f(r['auroc'])} | {_f(r['pairwise_strict'])} ({r['strict_pairs']}) | {_f(r['kendall_tau_b'])} | "
                         + " | ".join(_f(by_kind[k]["auroc"]) for k in kinds) + " |")
        lines += [""] + [f"- AUROC {pair}: " + "; ".join(f"{k} {x['diff']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"
                                                          for k, x in by_kind.items() if x is not None)
                         for pair, by_kind in st["auroc_differences"].items()]
    lines += [
        "",
        (f"## Claim 2: DPO{' and online GRPO' if any(n.startswith('GRPO') for n in c2['policies']) else ''} from the SFT start, "
         f"held-out questions ({c2['test_questions']}), 95% bootstrap CIs"),
        "",
        "| policy | pairs | oracle accuracy | vs SFT (paired) | share of headroom closed | judge score (1-5) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in c2["policies"].items():
        lines.append(f"| {name} | {r['pairs'] if r['pairs'] is not None else '-'} | {_ci(r['oracle_accuracy'])} | "
                     f"{_ci(r['vs_base'], signed=True)} | {_f(r.get('headroom_closed'), '+.2f')} | {_ci(r['judge_score'], '.2f')} |")
    kinds = sorted({k for by_kind in c2["accuracy_by_kind"].values() for k in by_kind})
    lines += ["", "Oracle accuracy per question kind:", "", "| policy | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {name} | " + " | ".join(_f(by_kind.get(k)) for k in kinds) + " |" for name, by_kind in c2["accuracy_by_kind"].items()]
    room = c2["headroom"]
    lines += ["", (f"Headroom: the SFT start's pass@{room['n']} on the {room['questions']} held-out questions (at least one "
                   f"of {room['n']} sampled answers right) is {_ci(room['pass_at_n'])}, against its greedy accuracy "
                   f"{_ci(c2['policies']['SFT']['oracle_accuracy'])}; a DPO row's share of headroom closed is its gain over "
                   "the gap between the two.")]
    lines += ["", "Training pairs graded by the oracle (right: chosen correct and rejected wrong; tied: both "
              "correct or both wrong): " + "; ".join(
                  f"{s} {o['right']} right, {o['reversed']} reversed, {o['tied']} tied"
                  for s, o in c2["pair_orientation"].items()) + "."]
    if any(c2.get("likelihood", {}).values()):
        lines += ["", "Log-probs of the training pairs' answers under the policy being trained (mean of the first and last "
                  "3 logged steps): a chosen log-prob that falls while the margin grows is likelihood displacement.", "",
                  "| policy | log p(chosen) first -> last | log p(rejected) first -> last | steps logged |", "|---|---|---|---|"]
        lines += [f"| {name} | {x['chosen_first']:.2f} -> {x['chosen_last']:.2f} | {x['rejected_first']:.2f} -> "
                  f"{x['rejected_last']:.2f} | {x['steps']} |" for name, x in c2["likelihood"].items() if x]
    if c2.get("multiple_choice"):
        lines += ["", "Judge-free multiple-choice accuracy (the held-out questions with options from the generator's vocabulary, "
                  "Video-MME's prompt and official extractor; docs/evaluation.md), 95% bootstrap CIs:", "",
                  "| policy | items | MC accuracy | vs SFT (paired) |", "|---|---|---|---|"]
        lines += [f"| {name} | {m['items']} | {_ci(m['accuracy'])} | {_ci(m['vs_base'], signed=True)} |"
                  for name, m in c2["multiple_choice"].items()]
    lines += ["", "Answers scored by the caption judge: " + ", ".join(f"{arm} {n}" for arm, n in c2.get("answers_judged", {}).items()) + "."]
    lines += ["", "Pairs available before equalising: " +
              ", ".join(f"{s} {n}" for s, n in c2["pairs_available"].items()) + ".",
              "", "Stage times (min): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in results["timings_s"].items()) + "."]
    path = top / "mini-repro.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
