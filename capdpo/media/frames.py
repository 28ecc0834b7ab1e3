"""Frame decoding: uniform frame sampling from videos or frame folders.

A "video" is either a file PyAV can decode (mp4, webm, avi, mkv...) or a folder of image files
(jpg/jpeg/png/webp) whose natural sort order is the frame order. Both are sampled the same way:
``numpy.linspace(0, n-1, num_frames).round()`` over all ``n`` frames, as in the paper (method.md,
step 1). Videos are decoded in one pass that keeps only the frames it needs.

A :class:`~capdpo.records.ClipWindow` (MVBench's time bounds) restricts the sampling to the frames
between its ``start`` and ``end`` seconds: ``round(start * fps)`` to ``round(end * fps)``, clipped
to the video, as MVBench's own loader bounds it; the same linspace then runs over those frames.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from capdpo.errors import FrameError
from capdpo.records import ClipWindow

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DONE_MARKER = ".done"  # written last into a finished frame folder; its JSON holds the settings


def _natural_key(name: str) -> list[int | str]:
    """Sort key that orders digit runs by value, so ``frame_10`` comes after ``frame_9``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a frame folder in frame order (hidden files such as markers ignored)."""
    folder = Path(folder)
    files = [
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]
    if not files:
        raise FrameError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in frame folder")
    return sorted(files, key=lambda p: _natural_key(p.name))


def check_exists(path: Path) -> None:
    if not path.exists():
        raise FrameError(f"{path}: no such file or folder")


def open_video(path: Path) -> av.container.InputContainer:
    """Open a video container, turning PyAV's errors into a FrameError naming the file."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise FrameError(f"{path}: cannot decode video ({e})") from None
    if not container.streams.video:
        container.close()
        raise FrameError(f"{path}: no video stream")
    return container


def _decode(path: Path, wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode the first video stream once, keeping frames whose index is in ``wanted`` as RGB images.

    Returns those frames and the number of frames actually decoded (the true frame count).
    """
    kept: dict[int, Image.Image] = {}
    n = 0
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-threaded decoding: same frames, faster
        for frame in container.decode(stream):
            if n in wanted:
                kept[n] = frame.to_image().convert("RGB")
            n += 1
    except av.FFmpegError as e:
        raise FrameError(f"{path}: cannot decode video ({e})") from None
    finally:
        container.close()
    return kept, n


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames of a video file or frame folder.

    Uses the container's frame count when it has one, else decodes the stream to count.
    """
    path = Path(path)
    check_exists(path)
    if path.is_dir():
        return len(list_frame_files(path))
    return _declared_frames(path) or _decode(path, set())[1]


def _declared_frames(path: Path) -> int:
    """The frame count in the container header; 0 when it has none (webm, mkv)."""
    container = open_video(path)
    try:
        return max(0, container.streams.video[0].frames)
    finally:
        container.close()


def read_done_marker(out_dir: Path) -> dict | None:
    """The settings and frame count a finished frame folder (``capdpo frames``) was written with."""
    marker = out_dir / DONE_MARKER
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None  # a marker we cannot read is not proof of a finished folder


def sample_indices(n: int, num_frames: int) -> list[int]:
    """Uniform frame indices over ``n`` frames, as in the paper; repeats when ``n < num_frames``."""
    return [int(i) for i in np.linspace(0, n - 1, num_frames).round()]


def window_bounds(n: int, fps: float, window: ClipWindow, where: str | os.PathLike) -> tuple[int, int]:
    """First and last frame index of ``window`` in a video of ``n`` frames at ``fps``; a window
    wholly outside the video is a FrameError naming ``where``."""
    first, last = max(0, round(window.start * fps)), min(round(window.end * fps), n - 1)
    if first > last:
        raise FrameError(f"{where}: time window {window.start:g}-{window.end:g} s lies outside the video "
                         f"({n} frames at {fps:g} fps, {n / fps:.1f} s)")
    return first, last


def frame_indices(n: int, num_frames: int, fps: float | None = None, window: ClipWindow | None = None,
                  where: str | os.PathLike = "video") -> list[int]:
    """The ``num_frames`` indices sampled from ``n`` frames: uniform over all of them, or over the
    frames of ``window`` (which needs the frame rate ``fps``)."""
    if window is None:
        return sample_indices(n, num_frames)
    if not fps:
        raise FrameError(f"{where}: frame rate unknown, so the time window {window.start:g}-{window.end:g} s cannot be "
                         "placed (a frame folder needs capdpo's marker or the window's fps)")
    first, last = window_bounds(n, fps, window, where)
    return [first + i for i in sample_indices(last - first + 1, num_frames)]


def frame_rate(path: str | os.PathLike) -> float | None:
    """Frames per second of a video file, or of a frame folder written by ``extract_frame_folder``
    (read from its marker); None when unknown."""
    path = Path(path)
    if path.is_dir():
        done = read_done_marker(path)
        return float(done["settings"]["fps"]) if done else None
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return float(rate) if rate else None
    finally:
        container.close()


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size``, then crop the centre ``size`` x ``size`` square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_frame_image(path: Path) -> Image.Image:
    """One frame file of a frame folder as RGB (raises FrameError naming it when unreadable)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise FrameError(f"{path}: cannot read image ({e})") from None


def _sample_video(path: Path, num_frames: int, window: ClipWindow | None) -> list[Image.Image]:
    # Some containers (webm, mkv) carry no frame count: count by decoding first.
    n = _declared_frames(path) or _decode(path, set())[1]
    if n == 0:
        raise FrameError(f"{path}: video stream has no frames")
    fps = frame_rate(path) if window is not None else None
    idx = frame_indices(n, num_frames, fps, window, path)
    kept, decoded = _decode(path, set(idx))
    if decoded != n:
        # The header's count was wrong (edit lists, dropped frames): resample on the true count.
        if decoded == 0:
            raise FrameError(f"{path}: video stream has no frames")
        idx = frame_indices(decoded, num_frames, fps, window, path)
        kept, _ = _decode(path, set(idx))
    return [kept[i] for i in idx]


def folder_frame_rate(folder: Path, window: ClipWindow | None) -> float | None:
    """A frame folder's frame rate: the window's ``fps`` when given, else capdpo's marker's."""
    return window.fps if window is not None and window.fps else frame_rate(folder)


def sample_frames(path: str | os.PathLike, num_frames: int = 8, size: int | None = None,
                  window: ClipWindow | None = None) -> list[Image.Image]:
    """Sample ``num_frames`` RGB frames uniformly over a video file or a frame folder, or over
    the part of it ``window`` names.

    With ``size``, each frame is resized to short side ``size`` and centre-cropped to a square.
    Raises :class:`FrameError` (message starting with the path) for anything unreadable.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    path = Path(path)
    check_exists(path)
    if path.is_dir():
        files = list_frame_files(path)
        idx = frame_indices(len(files), num_frames, folder_frame_rate(path, window), window, path)
        frames = [load_frame_image(files[i]) for i in idx]
    else:
        frames = _sample_video(path, num_frames, window)
    if size is not None:
        frames = [resize_center_crop(f, size) for f in frames]
    return frames
