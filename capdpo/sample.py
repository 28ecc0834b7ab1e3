"""Stage 5: N candidate answers per training question, sampled from the policy.

Every video is decoded once and its frames fitted to the policy's token budget (``plan_video``).
Two backends sample from them:

* ``hf``: the video is encoded once; a question's N samples come from one generate call of N rows
  sharing that encoding. A question's seed derives from the base seed and its id, so a resumed,
  re-ordered or sharded run samples exactly what an uninterrupted one would.
* ``vllm``: an offline vLLM engine gets ``{"prompt", "multi_modal_data": {"video": (T, H, W, 3)}}``
  requests with ``SamplingParams(n=N, seed=<question seed>)``, ``batch_size`` questions per call.

Sharding (``--shard i/n``) keeps the questions whose id hashes to shard ``i`` and writes
``candidates.shard-i-of-n.jsonl``; ``merge_shards`` joins the shards into ``candidates.jsonl``.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from capdpo.config import FramesConfig, SampleConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors, OverBudgetError
from capdpo.frames import count_frames, frame_rate, sample_frames, sample_indices
from capdpo.policy import EncodedVideo, VideoLayout, VideoPolicy
from capdpo.records import Candidate, QAItem, RecordFile, Video

R = TypeVar("R")


def question_seed(base: int, qa_id: str) -> int:
    return (base * 1_000_003 + zlib.crc32(qa_id.encode())) % 2**31


def candidate_id(qa_id: str, k: int) -> str:
    return f"{qa_id}#{k}"


# -- frames and the token budget ------------------------------------------------------------------
def plan_video(policy: VideoPolicy, video: Video, frames: FramesConfig, prompts: Sequence[str] = (),
               new_tokens: int = 0) -> tuple[list[Image.Image], VideoLayout]:
    """Frames of ``video`` and the layout they take, within ``policy.max_tokens`` for the longest of
    ``prompts`` plus ``new_tokens``. Over budget: OverBudgetError naming the video, or with
    ``frames.on_over_budget == "reduce"`` the first cheaper setting that fits (lower resolution for
    Qwen, then fewer frames, re-sampled uniformly over the whole clip)."""
    images = sample_frames(video.video, frames.num_frames)
    height, width = images[0].height, images[0].width
    cap = frames.image_size**2 if frames.image_size else None
    item = f"video {video.id} ({video.video})"
    if policy.uses_frame_times:  # when the sampled frames were taken: Qwen models encode it
        total, fps = count_frames(video.video), frame_rate(video.video) or frames.fps
    first_error = None
    for k, max_pixels in policy.reductions(frames.num_frames, height, width, cap):
        timing = {}
        if policy.uses_frame_times:
            timing = {"frame_times": [i / fps for i in sample_indices(total, k)], "seconds_per_frame": total / fps / k}
        layout = policy.layout(k, height, width, max_pixels=max_pixels, **timing)
        try:
            policy.check_budget(layout, prompts, new_tokens, item)
        except OverBudgetError as e:
            if frames.on_over_budget == "error":
                raise
            first_error = first_error or e
            continue
        return (images if k == len(images) else sample_frames(video.video, k)), layout
    raise OverBudgetError(f"{first_error} (still over budget at the fewest frames and lowest resolution)")


def encode_video(policy: VideoPolicy, video: Video, frames: FramesConfig, prompts: Sequence[str] = (),
                 new_tokens: int = 0) -> EncodedVideo:
    """One video encoded within the token budget (raises FrameError / OverBudgetError naming it)."""
    images, layout = plan_video(policy, video, frames, prompts, new_tokens)
    with torch.inference_mode():
        return policy.encode(policy.preprocess(images, layout))


# -- backends ----------------------------------------------------------------------------------------
class HFBackend:
    """transformers in process: one encoding per video, one generate of ``n`` rows per question."""

    name = "hf"

    def __init__(self, policy: VideoPolicy, cfg: SampleConfig):
        self.policy, self.cfg = policy, cfg

    def submit(self, images, layout, questions: list[QAItem]) -> Iterator[tuple[QAItem, int, list[str]]]:
        with torch.inference_mode():
            video = self.policy.encode(self.policy.preprocess(images, layout))
        for q in questions:
            seed = question_seed(self.cfg.seed, q.id)
            yield q, seed, self.policy.generate(video, q.question, n=self.cfg.n, temperature=self.cfg.temperature,
                                                top_p=self.cfg.top_p, max_new_tokens=self.cfg.max_new_tokens, seed=seed)

    def flush(self) -> Iterator[tuple[QAItem, int, list[str]]]:
        return iter(())


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

    def submit(self, images, layout, questions: list[QAItem]) -> Iterator[tuple[QAItem, int, list[str]]]:
        for q in questions:
            self.pending.append((q, question_seed(self.cfg.seed, q.id), vllm_request(self.policy, q.question, images, layout)))
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


# -- the stage ---------------------------------------------------------------------------------------
def shard_of(qa_id: str, shards: int) -> int:
    """Stable shard of a question: the same on every machine and run, whatever the question order."""
    return zlib.crc32(f"shard:{qa_id}".encode()) % shards


def read_shards(parts: Sequence[tuple[int | None, RecordFile[R]]], shards: int, shard_key: Callable[[R], str],
                same: Callable[[R, R], bool]) -> tuple[dict[str, R], int]:
    """The rows of shard files by id, and how many repeated ids were dropped. ``parts`` pairs each
    file with the shard index its rows must belong to (``shard_of(shard_key(row), shards)``; None =
    any). An id seen twice must be the ``same`` row (a re-run shard repeats itself exactly)."""
    merged: dict[str, R] = {}
    duplicates = 0
    for i, part in parts:
        for row in part.read():
            if i is not None and shard_of(shard_key(row), shards) != i:
                raise ValueError(f"{part.path}: {row.id} belongs to shard {shard_of(shard_key(row), shards)}, not {i}")
            if row.id in merged:
                if not same(merged[row.id], row):
                    raise ValueError(f"{part.path}: {row.id} appears twice with different content")
                duplicates += 1
                continue
            merged[row.id] = row
    return merged, duplicates


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    i, sep, n = text.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit()) or not 0 <= int(i) < int(n):
        raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(i), int(n)


def shard_file(candidates: RecordFile[Candidate], shard: tuple[int, int]) -> RecordFile[Candidate]:
    path = candidates.path
    return RecordFile(path.with_name(f"{path.stem}.shard-{shard[0]}-of-{shard[1]}{path.suffix}"), Candidate)


def run_sample(videos_file: RecordFile[Video], qa_file: RecordFile[QAItem], out: RecordFile[Candidate],
               policy: VideoPolicy, cfg: SampleConfig, frames: FramesConfig, *, split: str = "train",
               fail_fast: bool = False, shard: tuple[int, int] | None = None, dtype: str = "auto") -> ItemErrors:
    """The ``sample`` stage: append ``cfg.n`` candidates for every question of ``split`` (and of
    ``shard``, when given) lacking them."""
    videos = videos_file.by_id()
    done = out.ids()
    todo: dict[str, list[QAItem]] = defaultdict(list)
    for q in qa_file.read():
        mine = shard is None or shard_of(q.id, shard[1]) == shard[0]
        if q.split == split and mine and any(candidate_id(q.id, k) not in done for k in range(cfg.n)):
            todo[q.video_id].append(q)
    errors = ItemErrors("sample", fail_fast)
    if not todo:
        return errors
    backend = VllmBackend(policy, cfg, dtype) if cfg.backend == "vllm" else HFBackend(policy, cfg)
    layouts: dict[str, VideoLayout] = {}
    with tqdm(total=sum(map(len, todo.values())), desc=f"sample ({cfg.backend})", unit="question") as bar:

        def write(results) -> None:
            for q, seed, answers in results:
                layout = layouts[q.video_id]
                out.append(Candidate(id=candidate_id(q.id, k), qa_id=q.id, video_id=q.video_id, answer=a, model=policy.name,
                                     seed=seed, temperature=cfg.temperature, top_p=cfg.top_p, backend=backend.name,
                                     num_frames=layout.num_frames, frame_size=(layout.height, layout.width))
                           for k, a in enumerate(answers) if candidate_id(q.id, k) not in done)
                bar.update()

        for video_id, questions in todo.items():
            try:
                images, layouts[video_id] = plan_video(policy, videos[video_id], frames, [q.question for q in questions],
                                                       cfg.max_new_tokens)
            except ITEM_ERRORS as e:
                errors.record(video_id, e)
                bar.update(len(questions))
                continue
            write(backend.submit(images, layouts[video_id], questions))
        write(backend.flush())
    return errors


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
