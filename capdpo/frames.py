"""Stage 2: paper-style frame folders (``frames/<video id>/00001.jpg ...``, method.md step 1).

Each video becomes a folder of JPEGs at ``frames.fps`` and ``frames.width``: the layout the paper's
released data uses, which the report's thumbnails and external tools read. A video given as a
frame folder has every frame resized and written as JPEG. A finished folder
carries a ``.done`` marker with its settings and is skipped by a re-run. With ``engine: ray``
(:func:`frames_on_ray`) Ray actors write the folders.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image
from tqdm import tqdm

from capdpo.config import FramesConfig, RayConfig
from capdpo.errors import ITEM_ERRORS, FrameError, ItemErrors
from capdpo.media.frames import DONE_MARKER, check_exists, list_frame_files, load_frame_image, open_video, read_done_marker
from capdpo.ray_engine import ActorErrors, Job, Output, Row, run_job
from capdpo.records import RecordFile, Video, atomic_dir
from capdpo.rundir import inside


def run_frames(videos: RecordFile[Video], out_dir: Path, cfg: FramesConfig, *, fail_fast: bool = False) -> ItemErrors:
    """The ``frames`` stage: one frame folder per video under ``out_dir``; a bad video is recorded
    (or raised with ``fail_fast``) and the others go on."""
    errors = ItemErrors("frames", fail_fast)
    for v in tqdm(videos.all(), desc="frames", unit="video"):
        video_frames(v, out_dir, cfg, errors)
    return errors


def frames_on_ray(videos: RecordFile[Video], out_dir: Path, cfg: FramesConfig, settings: RayConfig, *,
                  fail_fast: bool = False) -> ItemErrors:
    """:func:`run_frames` as one Ray Data job (``engine: ray``): every video goes to the actors, which
    skip the finished folders as the local loop does (their ``.done`` markers)."""
    errors = ItemErrors("frames", fail_fast)
    rows = [Row(v.id, v.model_dump_json()) for v in videos.all()]
    run_job(Job("frames", rows, FramesWorker, (str(out_dir), cfg)), settings, errors)
    return errors


def video_frames(video: Video, out_dir: Path, cfg: FramesConfig, errors: ItemErrors) -> None:
    """The stage's work on one video, whichever engine runs it: its frame folder, or its error in ``errors``."""
    try:
        extract_frame_folder(video.video, inside(out_dir, video.id), fps=cfg.fps, width=cfg.width)
    except ITEM_ERRORS as e:
        errors.record(video.id, e)


class FramesWorker:
    """The ray engine's frames actor; a row is a video record."""

    def __init__(self, out_dir: str, cfg: FramesConfig):
        self.out_dir, self.cfg = Path(out_dir), cfg

    def __call__(self, rows: list[Row]) -> list[Output]:
        errors = ActorErrors("frames")
        for row in rows:
            video_frames(Video.model_validate_json(row.payload), self.out_dir, self.cfg, errors)
        return errors.outputs


def extract_frame_folder(
    video_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    fps: float = 2.0,
    width: int = 336,
    quality: int = 90,
) -> int:
    """Write the paper-style frame folder ``out_dir/00001.jpg ...`` and return its frame count.

    Keeps the first frame at or after each tick ``k / fps`` seconds from the stream start, resized
    to ``width`` keeping the aspect ratio. Frames go to a temporary sibling folder that is renamed
    into place at the end, so ``out_dir`` is either absent or complete; a finished folder (its
    ``.done`` marker holds the same settings) is left as is, and a folder capdpo did not make is
    never replaced (:class:`~capdpo.records.ForeignFolderError`). A frame folder as ``video_path`` has
    no timestamps to pick frames by: every frame is kept, resized and written as JPEG.
    """
    video_path, out_dir = Path(video_path), Path(out_dir)
    settings = {"fps": fps, "width": width, "quality": quality}
    done = read_done_marker(out_dir)
    if done is not None and done.get("settings") == settings:
        return int(done["frames"])
    check_exists(video_path)
    if fps <= 0 or width < 1:
        raise ValueError(f"fps and width must be positive, got fps={fps}, width={width}")

    # replaces a folder capdpo made with other settings (.done: a frame folder made before atomic_dir's own marker)
    with atomic_dir(out_dir, proof=(DONE_MARKER,)) as tmp:
        if video_path.is_dir():
            count = _write_folder_frames(video_path, tmp, width, quality)
        else:
            count = _write_frames(video_path, tmp, Fraction(fps).limit_denominator(1000), width, quality)
        (tmp / DONE_MARKER).write_text(json.dumps({"frames": count, "settings": settings}))
    return count


def _write_folder_frames(folder: Path, out: Path, width: int, quality: int) -> int:
    """Every frame of a frame folder, in order, resized to ``width`` as ``out/00001.jpg ...``."""
    files = list_frame_files(folder)
    for count, file in enumerate(files, start=1):
        _save_resized(load_frame_image(file), out / f"{count:05d}.jpg", width, quality)
    return len(files)


def _save_resized(img: Image.Image, path: Path, width: int, quality: int) -> None:
    """``img`` at ``width`` pixels wide, keeping the aspect ratio, as a JPEG."""
    height = max(1, round(img.height * width / img.width))
    img.resize((width, height), Image.Resampling.BICUBIC).save(path, quality=quality)


def _write_frames(path: Path, out: Path, fps: Fraction, width: int, quality: int) -> int:
    """Decode ``path`` and write one JPEG per ``1/fps`` seconds of stream time into ``out``."""
    container = open_video(path)
    count = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        start, tick = None, 0  # the next frame kept is the first at or after tick / fps
        for i, frame in enumerate(container.decode(stream)):
            # Exact rational timestamps avoid float drift deciding which frame hits a tick.
            t = frame.pts * frame.time_base if frame.pts is not None else Fraction(i) / rate
            start = t if start is None else start
            if t - start < tick / fps:
                continue
            while tick / fps <= t - start:  # a source slower than fps skips ticks, never repeats frames
                tick += 1
            _save_resized(frame.to_image().convert("RGB"), out / f"{count + 1:05d}.jpg", width, quality)
            count += 1
    except av.FFmpegError as e:
        raise FrameError(f"{path}: cannot decode video ({e})") from None
    finally:
        container.close()
    if count == 0:
        raise FrameError(f"{path}: video stream has no frames")
    return count
