"""Stage 5: N candidate answers per training question, sampled from the policy.

Each video is decoded and encoded once; its N samples per question come from one generate call
on the shared prompt. A question's seed derives from the base seed and its id, so a resumed or
re-ordered run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import zlib
from collections import defaultdict

import torch
from tqdm import tqdm

from capdpo.config import FramesConfig, SampleConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.frames import sample_frames
from capdpo.policy import VideoPolicy
from capdpo.records import Candidate, QAItem, RecordFile, Video


def question_seed(base: int, qa_id: str) -> int:
    return (base * 1_000_003 + zlib.crc32(qa_id.encode())) % 2**31


def candidate_id(qa_id: str, k: int) -> str:
    return f"{qa_id}#{k}"


def encode_video(policy: VideoPolicy, video: Video, num_frames: int) -> torch.Tensor:
    """``(n_visual, hidden)`` embeddings of one video (raises FrameError naming a bad file)."""
    with torch.inference_mode():
        return policy.video_embeds(policy.pixel_values(sample_frames(video.video, num_frames)).unsqueeze(0))[0]


def run_sample(videos_file: RecordFile[Video], qa_file: RecordFile[QAItem], out: RecordFile[Candidate],
               policy: VideoPolicy, cfg: SampleConfig, frames: FramesConfig, *, split: str = "train",
               fail_fast: bool = False) -> ItemErrors:
    """The ``sample`` stage: append ``cfg.n`` candidates for every question of ``split`` lacking them."""
    videos = videos_file.by_id()
    done = out.ids()
    todo: dict[str, list[QAItem]] = defaultdict(list)
    for q in qa_file.read():
        if q.split == split and any(candidate_id(q.id, k) not in done for k in range(cfg.n)):
            todo[q.video_id].append(q)
    errors = ItemErrors("sample", fail_fast)
    with tqdm(total=sum(map(len, todo.values())), desc="sample", unit="question") as bar:
        for video_id, questions in todo.items():
            try:
                video = encode_video(policy, videos[video_id], frames.num_frames)
            except ITEM_ERRORS as e:
                errors.record(video_id, e)
                bar.update(len(questions))
                continue
            for q in questions:
                seed = question_seed(cfg.seed, q.id)
                answers = policy.generate(video, q.question, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                          max_new_tokens=cfg.max_new_tokens, seed=seed)
                out.append(Candidate(id=candidate_id(q.id, k), qa_id=q.id, video_id=video_id, answer=a, model=policy.name,
                                     seed=seed, temperature=cfg.temperature, top_p=cfg.top_p, backend="hf")
                           for k, a in enumerate(answers) if candidate_id(q.id, k) not in done)
                bar.update()
    return errors
