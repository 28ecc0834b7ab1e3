"""Frame I/O: uniform frame sampling from videos or frame folders, and paper-style frame folders.

A "video" is either a file PyAV can decode (mp4, webm, avi, mkv...) or a folder of image files
(jpg/jpeg/png/webp) whose natural sort order is the frame order. Both are sampled the same way:
``numpy.linspace(0, n-1, num_frames).round()`` over all ``n`` frames, as in the paper (method.md,
step 1). Videos are decoded in one pass that keeps only the frames it needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DONE_MARKER = ".done"  # written last into a finished frame folder; its JSON holds the settings


class FrameError(ValueError):
    """A video or frame folder that cannot be read; the message starts with its path."""


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


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FrameError(f"{path}: no such file or folder")


def _open_video(path: Path) -> av.container.InputContainer:
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
    container = _open_video(path)
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
    _check_exists(path)
    if path.is_dir():
        return len(list_frame_files(path))
    return _declared_frames(path) or _decode(path, set())[1]


def _declared_frames(path: Path) -> int:
    """The frame count in the container header; 0 when it has none (webm, mkv)."""
    container = _open_video(path)
    try:
        return max(0, container.streams.video[0].frames)
    finally:
        container.close()


def sample_indices(n: int, num_frames: int) -> list[int]:
    """Uniform frame indices over ``n`` frames, as in the paper; repeats when ``n < num_frames``."""
    return [int(i) for i in np.linspace(0, n - 1, num_frames).round()]


def frame_rate(path: str | os.PathLike) -> float | None:
    """Frames per second of a video file, or of a frame folder written by ``extract_frame_folder``
    (read from its marker); None when unknown."""
    path = Path(path)
    if path.is_dir():
        done = _read_done(path)
        return float(done["settings"]["fps"]) if done else None
    container = _open_video(path)
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


def _load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise FrameError(f"{path}: cannot read image ({e})") from None


def _sample_video(path: Path, num_frames: int) -> list[Image.Image]:
    # Some containers (webm, mkv) carry no frame count: count by decoding first.
    n = _declared_frames(path) or _decode(path, set())[1]
    if n == 0:
        raise FrameError(f"{path}: video stream has no frames")
    idx = sample_indices(n, num_frames)
    kept, decoded = _decode(path, set(idx))
    if decoded != n:
        # The header's count was wrong (edit lists, dropped frames): resample on the true count.
        if decoded == 0:
            raise FrameError(f"{path}: video stream has no frames")
        idx = sample_indices(decoded, num_frames)
        kept, _ = _decode(path, set(idx))
    return [kept[i] for i in idx]


def sample_frames(path: str | os.PathLike, num_frames: int = 8, size: int | None = None) -> list[Image.Image]:
    """Sample ``num_frames`` RGB frames uniformly over a video file or a frame folder.

    With ``size``, each frame is resized to short side ``size`` and centre-cropped to a square.
    Raises :class:`FrameError` (message starting with the path) for anything unreadable.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        files = list_frame_files(path)
        frames = [_load_image(files[i]) for i in sample_indices(len(files), num_frames)]
    else:
        frames = _sample_video(path, num_frames)
    if size is not None:
        frames = [resize_center_crop(f, size) for f in frames]
    return frames


def _read_done(out_dir: Path) -> dict | None:
    marker = out_dir / DONE_MARKER
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None  # a marker we cannot read is not proof of a finished folder


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
    ``.done`` marker holds the same settings) is left as is.
    """
    video_path, out_dir = Path(video_path), Path(out_dir)
    settings = {"fps": fps, "width": width, "quality": quality}
    done = _read_done(out_dir)
    if done is not None and done.get("settings") == settings:
        return int(done["frames"])
    _check_exists(video_path)
    if fps <= 0 or width < 1:
        raise ValueError(f"fps and width must be positive, got fps={fps}, width={width}")

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        count = _write_frames(video_path, tmp, Fraction(fps).limit_denominator(1000), width, quality)
        (tmp / DONE_MARKER).write_text(json.dumps({"frames": count, "settings": settings}))
        shutil.rmtree(out_dir, ignore_errors=True)  # an unfinished or differently-made folder
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def _write_frames(path: Path, out: Path, fps: Fraction, width: int, quality: int) -> int:
    """Decode ``path`` and write one JPEG per ``1/fps`` seconds of stream time into ``out``."""
    container = _open_video(path)
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
            img = frame.to_image().convert("RGB")
            height = max(1, round(img.height * width / img.width))
            img.resize((width, height), Image.Resampling.BICUBIC).save(out / f"{count + 1:05d}.jpg", quality=quality)
            count += 1
    except av.FFmpegError as e:
        raise FrameError(f"{path}: cannot decode video ({e})") from None
    finally:
        container.close()
    if count == 0:
        raise FrameError(f"{path}: video stream has no frames")
    return count


def video_fingerprint(path: str | os.PathLike) -> str:
    """Short sha256 hex (16 chars) identifying a video's content, for caches.

    Hashes the file's bytes, or for a frame folder its frame files' names, sizes and mtimes
    (cheap, and any re-extraction changes it).
    """
    path = Path(path)
    _check_exists(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in list_frame_files(path):
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]
