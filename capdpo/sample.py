"""Stage 5: N candidate answers per training question, sampled from the policy.

Every video is decoded once and its frames fitted to the policy's token budget (``policy.video.VideoEncoder``).
Two backends sample from them:

* ``hf``: the video is encoded once; ``batch_size`` questions (of one or several videos) go into
  one generate call of N rows each, the rows of a video sharing its encoding. A question's seed
  derives from the base seed and its id, and each row samples from its own generator
  (``capdpo.policy.sampling``), so a resumed, re-ordered, re-batched or sharded run samples what an
  uninterrupted one would.
* ``vllm``: an offline vLLM engine gets ``{"prompt", "multi_modal_data": {"video": (T, H, W, 3)}}``
  requests with ``SamplingParams(n=N, seed=<question seed>)``, ``batch_size`` questions per call.

Sharding (``--shard i/n``) keeps the questions whose id hashes to shard ``i`` and writes
``candidates.shard-i-of-n.jsonl``; ``merge_shards`` joins the shards into ``candidates.jsonl``.
With ``engine: ray`` (:func:`sample_on_ray`) the same :class:`Sampler` runs in Ray actors, one
generate call of the local loop's per row.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from capdpo.config import FramesConfig, PolicyConfig, RayConfig, SampleConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors, OverBudgetError
from capdpo.models.load import policy_from_config
from capdpo.policy.base import EncodedVideo, VideoLayout, VideoPolicy
from capdpo.policy.video import PlannedVideo, VideoEncoder
from capdpo.ray_engine import ActorErrors, Job, Output, Row, question_rows, row_videos, run_job
from capdpo.records import Candidate, QAItem, RecordFile, Video
from capdpo.shards import read_shards, shard_file, shard_of

R = TypeVar("R")


def question_seed(base: int, qa_id: str) -> int:
    return (base * 1_000_003 + zlib.crc32(qa_id.encode())) % 2**31


def candidate_id(qa_id: str, k: int) -> str:
    return f"{qa_id}#{k}"


# -- backends ----------------------------------------------------------------------------------------
class HFBackend:
    """transformers in process: one encoding per video; ``batch_size`` questions (``n`` rows each,
    every row with its own seed) per generate call."""

    name = "hf"

    def __init__(self, policy: VideoPolicy, cfg: SampleConfig):
        self.policy, self.cfg = policy, cfg
        self.pending: list[tuple[QAItem, int, EncodedVideo]] = []

    def prepare(self, encoder: VideoEncoder, video: Video, questions: list[str]) -> EncodedVideo:
        return encoder.encode(video, questions, self.cfg.max_new_tokens)

    def submit(self, video: EncodedVideo, questions: list[QAItem]) -> Iterator[tuple[QAItem, int, list[str]]]:
        self.pending += [(q, question_seed(self.cfg.seed, q.id), video) for q in questions]
        while len(self.pending) >= self.cfg.batch_size:
            yield from self._generate(self.cfg.batch_size)

    def flush(self) -> Iterator[tuple[QAItem, int, list[str]]]:
        while self.pending:
            yield from self._generate(self.cfg.batch_size)

    def _generate(self, k: int) -> Iterator[tuple[QAItem, int, list[str]]]:
        batch, self.pending = self.pending[:k], self.pending[k:]
        answers = self.policy.generate_batch([(video, q.question) for q, _, video in batch], n=self.cfg.n,
                                             temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                             max_new_tokens=self.cfg.max_new_tokens, seeds=[seed for _, seed, _ in batch])
        for (q, seed, _), rows in zip(batch, answers):
            yield q, seed, rows


def vllm_request(policy: VideoPolicy, question: str, images: Sequence[Image.Image], layout: VideoLayout) -> dict:
    """vLLM's multimodal prompt: the chat text with one unexpanded video placeholder, and the frames
    (at the size capdpo planned, so vLLM's processor keeps the budget) as a (T, H, W, 3) uint8 array."""
    video = np.stack([np.asarray(f) for f in policy.sized_frames(images, layout)])
    return {"prompt": policy.prompt_text(question), "multi_modal_data": {"video": video}}


class VllmBackend:
    """An offline vLLM engine on the policy's checkpoint; ``batch_size`` questions per engine call."""

    name = "vllm"

    def __init__(self, policy: VideoPolicy, cfg: SampleConfig, dtype: str = "auto"):
        import vllm

        self.vllm, self.policy, self.cfg = vllm, policy, cfg
        self.engine = vllm.LLM(model=str(policy.path), dtype=dtype, max_model_len=policy.max_tokens, seed=cfg.seed,
                               limit_mm_per_prompt={"video": 1})
        self.pending: list[tuple[QAItem, int, dict]] = []

    def prepare(self, encoder: VideoEncoder, video: Video, questions: list[str]) -> PlannedVideo:
        return encoder.plan(video, questions, self.cfg.max_new_tokens)

    def submit(self, video: PlannedVideo, questions: list[QAItem]) -> Iterator[tuple[QAItem, int, list[str]]]:
        for q in questions:
            request = vllm_request(self.policy, q.question, video.images, video.layout)
            self.pending.append((q, question_seed(self.cfg.seed, q.id), request))
        if len(self.pending) >= self.cfg.batch_size:
            yield from self.flush()

    def flush(self) -> Iterator[tuple[QAItem, int, list[str]]]:
        batch, self.pending = self.pending, []
        if not batch:
            return
        params = [self.vllm.SamplingParams(n=self.cfg.n, temperature=self.cfg.temperature, top_p=self.cfg.top_p, seed=seed,
                                           max_tokens=self.cfg.max_new_tokens) for _, seed, _ in batch]
        outputs = self.engine.generate([request for _, _, request in batch], sampling_params=params)
        for (q, seed, _), out in zip(batch, outputs):
            yield q, seed, [c.text.strip() for c in out.outputs]


# -- the stage's work, the same for both engines ------------------------------------------------------
class Sampler:
    """The sample stage's work on videos and their questions: each video prepared once for its
    questions, the questions sampled ``batch_size`` at a time (of one video or several), every answer
    a Candidate. The local loop feeds it every video, a ray actor the videos of each row (one of the
    local loop's generate calls); each question's seed comes from its id (:func:`question_seed`) and
    each of its rows samples from its own generator, so both engines write the same answers."""

    def __init__(self, policy: VideoPolicy, cfg: SampleConfig, frames: FramesConfig, dtype: str = "auto"):
        self.policy, self.cfg = policy, cfg
        self.backend = VllmBackend(policy, cfg, dtype) if cfg.backend == "vllm" else HFBackend(policy, cfg)
        self.encoder = VideoEncoder(policy, frames)
        self.layouts: dict[str, VideoLayout] = {}

    def add(self, video: Video, questions: list[QAItem], errors: ItemErrors,
            plan: list[QAItem] | None = None) -> tuple[int, list[list[Candidate]]]:
        """Prepare ``video`` for ``plan`` (default: ``questions``; a ray row holds part of a video's
        questions, the video planned for all of them as the local loop plans it) and queue
        ``questions``. Returns how many of them were left out (an unreadable video, a question over
        the token budget: recorded in ``errors``) and the candidates of the questions sampled by now,
        one list per question."""
        try:
            prepared, fitting = prepare_questions(self.backend, self.encoder, video, plan or questions, self.cfg.max_new_tokens,
                                                  errors)
        except ITEM_ERRORS as e:
            errors.record(video.id, e)
            return len(questions), []
        self.layouts[video.id] = prepared.layout
        fits = {q.id for q in fitting}
        kept = [q for q in questions if q.id in fits]
        return len(questions) - len(kept), self._candidates(self.backend.submit(prepared, kept))

    def flush(self) -> list[list[Candidate]]:
        """The candidates of the questions still queued."""
        return self._candidates(self.backend.flush())

    def _candidates(self, results: Iterator[tuple[QAItem, int, list[str]]]) -> list[list[Candidate]]:
        cfg = self.cfg
        return [[Candidate(id=candidate_id(q.id, k), qa_id=q.id, video_id=q.video_id, answer=a, model=self.policy.name,
                           seed=seed, temperature=cfg.temperature, top_p=cfg.top_p, backend=self.backend.name,
                           num_frames=self.layouts[q.video_id].num_frames,
                           frame_size=(self.layouts[q.video_id].height, self.layouts[q.video_id].width))
                 for k, a in enumerate(answers)] for q, seed, answers in results]


# -- the stage ---------------------------------------------------------------------------------------
def run_sample(videos_file: RecordFile[Video], qa_file: RecordFile[QAItem], out: RecordFile[Candidate],
               policy: VideoPolicy, cfg: SampleConfig, frames: FramesConfig, *, split: str = "train",
               fail_fast: bool = False, shard: tuple[int, int] | None = None, dtype: str = "auto") -> ItemErrors:
    """The ``sample`` stage: append ``cfg.n`` candidates for every question of ``split`` (and of
    ``shard``, when given) lacking them. Several processes may sample into one ``out`` at once:
    each claims a video's questions before sampling them, so every candidate is written once."""
    videos = videos_file.by_id()
    out.drop_duplicates()  # repeated rows left by older concurrent runs; a conflicting one raises
    todo = _questions_to_sample(qa_file, out.ids(), cfg.n, split, shard)
    errors = ItemErrors("sample", fail_fast)
    if not todo:
        return errors
    sampler = Sampler(policy, cfg, frames, dtype)
    with out.claims() as claims, tqdm(total=sum(map(len, todo.values())), desc=f"sample ({cfg.backend})",
                                      unit="question") as bar:

        def write(sampled: list[list[Candidate]]) -> None:
            for candidates in sampled:
                on_disk = claims.done_ids()
                out.append(c for c in candidates if c.id not in on_disk)
                bar.update()

        for video_id, questions in todo.items():
            mine = claims.take(questions, is_done=_sampled(cfg.n))
            bar.update(len(questions) - len(mine))  # done, or being done by another worker
            if not mine:
                continue
            left_out, sampled = sampler.add(videos[video_id], mine, errors)
            bar.update(left_out)
            write(sampled)
        write(sampler.flush())
    return errors


def sample_on_ray(videos_file: RecordFile[Video], qa_file: RecordFile[QAItem], out: RecordFile[Candidate],
                  policy: PolicyConfig, cache_dir: str, cfg: SampleConfig, frames: FramesConfig, settings: RayConfig, *,
                  split: str = "train", fail_fast: bool = False, shard: tuple[int, int] | None = None,
                  dtype: str = "auto") -> ItemErrors:
    """:func:`run_sample` as one Ray Data job (``engine: ray``): a row is one generate call of the
    local loop's (``batch_size`` questions in its order, with their videos and each video's questions
    to plan it for), each actor loads ``policy`` once and runs a :class:`Sampler` on its rows; this
    process writes the candidates into ``out``."""
    videos = videos_file.by_id()
    out.drop_duplicates()
    todo = _questions_to_sample(qa_file, out.ids(), cfg.n, split, shard)
    errors = ItemErrors("sample", fail_fast)
    with out.claims() as claims:
        mine = {video_id: m for video_id, questions in todo.items() if (m := claims.take(questions, is_done=_sampled(cfg.n)))}
        rows = question_rows(mine, videos, cfg.batch_size)
        job = Job(f"sample ({cfg.backend})", rows, SampleWorker, (policy, cache_dir, cfg, frames, dtype), wants_gpu=True)
        run_job(job, settings, errors, out, claims)
    return errors


class SampleWorker:
    """The ray engine's sample actor: the policy loaded once, then a :class:`Sampler` over each row
    (one generate call's questions), flushed at the row's end as the local loop's batch ends."""

    def __init__(self, policy: PolicyConfig, cache_dir: str, cfg: SampleConfig, frames: FramesConfig, dtype: str):
        # vLLM runs the weights itself: load only tokenizer, config and preprocessing
        self.sampler = Sampler(policy_from_config(policy, cache_dir, weights=cfg.backend != "vllm"), cfg, frames, dtype)

    def __call__(self, rows: list[Row]) -> list[Output]:
        errors = ActorErrors("sample")
        sampled: list[list[Candidate]] = []
        for row in rows:
            for video, questions, plan in row_videos(row):
                sampled += self.sampler.add(video, questions, errors, plan=plan)[1]
            sampled += self.sampler.flush()
        return [Output(c.id, record=c.model_dump_json()) for candidates in sampled for c in candidates] + errors.outputs


def _sampled(n: int) -> Callable[[str, set[str]], bool]:
    """Whether a question's ``n`` candidates are all on disk (``WorkClaims.take``'s ``is_done``)."""
    return lambda qa_id, on_disk: all(candidate_id(qa_id, k) in on_disk for k in range(n))


def _questions_to_sample(qa_file: RecordFile[QAItem], done: set[str], n: int, split: str,
                         shard: tuple[int, int] | None) -> dict[str, list[QAItem]]:
    """By video id, the questions of ``split`` (and ``shard``) still lacking one of their ``n`` candidates."""
    todo: dict[str, list[QAItem]] = defaultdict(list)
    for q in qa_file.read():
        mine = shard is None or shard_of(q.id, shard[1]) == shard[0]
        if q.split == split and mine and any(candidate_id(q.id, k) not in done for k in range(n)):
            todo[q.video_id].append(q)
    return todo


def prepare_questions(backend: HFBackend | VllmBackend, encoder: VideoEncoder, video: Video, questions: list[QAItem],
                      new_tokens: int, errors: ItemErrors) -> tuple[EncodedVideo | PlannedVideo, list[QAItem]]:
    """``backend.prepare`` for a video's questions; when they do not fit together, each question
    that does not fit on its own is recorded in ``errors`` (named) and left out, so one over-long
    question does not cost its siblings their candidates. Returns the prepared video and the
    questions kept; raises when none fits (or the video itself is unreadable)."""
    try:
        return backend.prepare(encoder, video, [q.question for q in questions]), questions
    except OverBudgetError:
        if len(questions) == 1:
            raise
        too_long: list[tuple[QAItem, OverBudgetError]] = []
        for q in questions:
            try:
                encoder.plan(video, [q.question], new_tokens)
            except OverBudgetError as alone:
                too_long.append((q, alone))
        if len(too_long) == len(questions):
            raise  # the video itself does not fit: one error for it, as for a single question
    for q, error in too_long:
        errors.record(q.id, OverBudgetError(f"question {q.id}: {error}"))
    dropped = {q.id for q, _ in too_long}
    fitting = [q for q in questions if q.id not in dropped]
    return backend.prepare(encoder, video, [q.question for q in fitting]), fitting


def merge_shards(out: RecordFile[Candidate], shards: int, qa_file: RecordFile[QAItem] | None = None) -> dict[str, int]:
    """Merge the ``shards`` shard files of ``out`` (and what ``out`` holds already) into ``out``.

    Verifies that every shard file exists, that each candidate sits in its question's shard and
    that an id seen twice holds the same answer (a re-run shard repeats itself exactly); exact
    duplicates are dropped. Records are written in question order (``qa_file``), else by id."""
    parts = [shard_file(out, (i, shards)) for i in range(shards)]
    missing = [str(p.path) for p in parts if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing shard file(s): {', '.join(missing)}")
    merged, duplicates = read_shards([(None, out), *enumerate(parts)], shards, lambda c: c.qa_id,
                                     lambda a, b: a.answer == b.answer)
    order = {q.id: i for i, q in enumerate(qa_file.read())} if qa_file is not None else {}

    out.write(sorted(merged.values(), key=lambda c: (order.get(c.qa_id, len(order)), c.qa_id, int(c.id.rpartition("#")[2]))))
    return {"shards": shards, "candidates": len(merged), "duplicates_dropped": duplicates}
