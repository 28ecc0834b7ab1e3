"""Stage 5: N candidate answers per training question, sampled from the policy.

Every video is decoded once and its frames fitted to the policy's token budget (``policy.video.VideoEncoder``).
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
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from capdpo.config import FramesConfig, SampleConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.policy.base import EncodedVideo, VideoLayout, VideoPolicy
from capdpo.policy.video import PlannedVideo, VideoEncoder
from capdpo.records import Candidate, QAItem, RecordFile, Video
from capdpo.shards import read_shards, shard_file, shard_of

R = TypeVar("R")


def question_seed(base: int, qa_id: str) -> int:
    return (base * 1_000_003 + zlib.crc32(qa_id.encode())) % 2**31


def candidate_id(qa_id: str, k: int) -> str:
    return f"{qa_id}#{k}"


# -- backends ----------------------------------------------------------------------------------------
class HFBackend:
    """transformers in process: one encoding per video, one generate of ``n`` rows per question."""

    name = "hf"

    def __init__(self, policy: VideoPolicy, cfg: SampleConfig):
        self.policy, self.cfg = policy, cfg

    def prepare(self, encoder: VideoEncoder, video: Video, questions: list[str]) -> EncodedVideo:
        return encoder.encode(video, questions, self.cfg.max_new_tokens)

    def submit(self, video: EncodedVideo, questions: list[QAItem]) -> Iterator[tuple[QAItem, int, list[str]]]:
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


# -- the stage ---------------------------------------------------------------------------------------
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
    encoder = VideoEncoder(policy, frames)
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
                video = backend.prepare(encoder, videos[video_id], [q.question for q in questions])
            except ITEM_ERRORS as e:
                errors.record(video_id, e)
                bar.update(len(questions))
                continue
            layouts[video_id] = video.layout
            write(backend.submit(video, questions))
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
